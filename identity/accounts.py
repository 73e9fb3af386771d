"""Accounts: email normalisation, roles, registration and the changes admins make (API, CLI and seed share these).

Emails are normalised before they are stored or looked up: surrounding white space removed, Unicode NFKC,
lower-cased. ``Alice@Example.COM`` and ``alice@example.com`` are one account. (The local part is
case-sensitive in theory; no mail provider that matters treats it so, and two accounts differing only in case
are a support and phishing hazard.)
"""

from __future__ import annotations

import re
import secrets
import unicodedata
import uuid
from collections.abc import Collection

from identity.passwords import Passwords, check_password_policy
from identity.repository import Repository, User
from runtime.errors import ValidationProblem
from runtime.store import utcnow

ROLES = ("customer", "admin")
CUSTOMER_ROLES = ("customer",)
ADMIN_EMAIL = "admin@example.com"
MAX_EMAIL_LENGTH = 254  # RFC 5321 path limit
MAX_NAME_LENGTH = 200

# Deliberately simple: one @, no white space or control characters, a dotted domain. Whether the mailbox
# exists is for a confirmation mail to find out, not a regular expression.
_EMAIL = re.compile(r"^[^@\s\x00-\x1f\x7f]{1,64}@[^@\s\x00-\x1f\x7f]+\.[^@\s\x00-\x1f\x7f.]+$")


def normalize_email(email: str) -> str:
    return unicodedata.normalize("NFKC", email).strip().lower()


def email_problem(email: str) -> str | None:
    """None if ``email`` (normalised) is acceptable, else what is wrong with it."""
    if not email:
        return "Enter an email address."
    if len(email) > MAX_EMAIL_LENGTH:
        return f"The email address must be at most {MAX_EMAIL_LENGTH} characters long."
    if not _EMAIL.match(email) or ".." in email.partition("@")[2]:
        return "Enter a valid email address, like name@example.com."
    return None


def name_problem(name: str) -> str | None:
    if not name:
        return "Enter a name."
    if len(name) > MAX_NAME_LENGTH:
        return f"The name must be at most {MAX_NAME_LENGTH} characters long."
    if any(unicodedata.category(c) == "Cc" for c in name):
        return "The name must not contain control characters."
    return None


def check_roles(roles: Collection[str]) -> tuple[str, ...]:
    """The roles, sorted and de-duplicated; ValueError naming an unknown one."""
    unknown = sorted(set(roles) - set(ROLES))
    if unknown:
        raise ValueError(f"unknown role {unknown[0]!r}: roles are {', '.join(ROLES)}")
    if not roles:
        raise ValueError(f"give at least one role ({', '.join(ROLES)})")
    return tuple(sorted(set(roles)))


def validate_registration(email: str, password: str, name: str) -> tuple[str, str]:
    """The normalised email and name, or a 422 :class:`ValidationProblem` naming every bad field."""
    email = normalize_email(email)
    name = unicodedata.normalize("NFC", name).strip()
    errors: dict[str, str] = {}
    for field, message in (
        ("email", email_problem(email)),
        ("password", check_password_policy(password, email)),
        ("name", name_problem(name)),
    ):
        if message is not None:
            errors[field] = message
    if errors:
        raise ValidationProblem(errors)
    return email, name


async def register_user(
    repo: Repository,
    passwords: Passwords,
    *,
    email: str,
    password: str,
    name: str,
    roles: Collection[str] = CUSTOMER_ROLES,
) -> User:
    """Validate, hash and store a new account. Raises :class:`ValidationProblem` (422) or
    :class:`identity.repository.EmailTaken`."""
    email, name = validate_registration(email, password, name)
    now = utcnow()
    user = User(
        id=str(uuid.uuid4()),
        email=email,
        name=name,
        password_hash=await passwords.hash(password),
        roles=check_roles(roles),
        disabled=False,
        created_at=now,
    )
    await repo.create_user(user)
    return user


def generate_password() -> str:
    """A random password that passes the policy (about 140 bits)."""
    while True:
        candidate = secrets.token_urlsafe(24)
        if check_password_policy(candidate) is None:
            return candidate


async def set_roles(repo: Repository, email: str, roles: Collection[str]) -> User | None:
    user = await repo.user_by_email(normalize_email(email))
    if user is None:
        return None
    await repo.update_user(user.id, utcnow(), roles=list(check_roles(roles)))
    return await repo.user_by_id(user.id)


async def set_disabled(repo: Repository, email: str, disabled: bool) -> User | None:
    """Lock (or unlock) an account. Locking also revokes its refresh tokens, so its sessions end when their
    access tokens expire (at most ``access_token_ttl`` later)."""
    user = await repo.user_by_email(normalize_email(email))
    if user is None:
        return None
    now = utcnow()
    await repo.update_user(user.id, now, disabled=disabled)
    if disabled:
        await repo.revoke_user_tokens(user.id, now)
    return await repo.user_by_id(user.id)
