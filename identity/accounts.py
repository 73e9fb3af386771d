"""Accounts: email normalisation and validation, roles, registration and the changes admins make (API, CLI and
seed share these).

Emails are validated with ``email-validator`` (syntax only: ``check_deliverability=False``, no DNS) and
normalised before they are stored or looked up: surrounding white space removed, Unicode NFKC, the library's
normal form (IDNA domain in Unicode), lower-cased. ``Alice@Example.COM`` and ``alice@example.com`` are one
account. (The local part is case-sensitive in theory; no mail provider that matters treats it so, and two
accounts differing only in case are a support and phishing hazard.)

Look-alike addresses are refused (UTS #39 §5.2 "highly restrictive" mixed-script detection): invisible
characters (Unicode category Cf: zero-width spaces and joiners, bidi controls) anywhere, and a local part or a
domain label mixing scripts — ``аdmin@example.com`` with a Cyrillic ``а``, ``admin@еxample.com`` with a
Cyrillic ``е``. Characters common to all scripts (digits, ``.``, ``-``, ``+``, ``_``) and combining marks do
not count; an address in one non-Latin script (``пример@пример.рф``) passes, as do the combinations UTS #39
allows (Han with Hiragana and Katakana, Han with Bopomofo, Han with Hangul, each with Latin).
"""

from __future__ import annotations

import logging
import secrets
import unicodedata
import uuid
from collections.abc import Collection

from confusable_homoglyphs import categories as unicode_scripts
from email_validator import EmailNotValidError, validate_email

from identity.passwords import Passwords, check_password_policy
from identity.repository import EmailTaken, Repository, User
from runtime.errors import ValidationProblem
from runtime.store import utcnow

log = logging.getLogger(__name__)

ROLES = ("customer", "admin")
CUSTOMER_ROLES = ("customer",)
ADMIN_EMAIL = "admin@example.com"
MAX_EMAIL_LENGTH = 254  # RFC 5321 path limit
MAX_NAME_LENGTH = 200

# UTS #39 §5.2 highly restrictive: one script, or one of these sets (scripts common to all do not count).
_NEUTRAL_SCRIPTS = frozenset({"COMMON", "INHERITED"})
_ALLOWED_SCRIPT_MIXES = (
    frozenset({"LATIN", "HAN", "HIRAGANA", "KATAKANA"}),
    frozenset({"LATIN", "HAN", "BOPOMOFO"}),
    frozenset({"LATIN", "HAN", "HANGUL"}),
)


def _fold(email: str) -> str:
    return unicodedata.normalize("NFKC", email).strip().lower()


def normalize_email(email: str) -> str:
    """The stored form of an email: NFKC, trimmed, email-validator's normal form, lower-cased. Never raises:
    an address that is not valid is only folded (look-ups with it find nothing)."""
    folded = _fold(email)
    try:
        return validate_email(folded, check_deliverability=False).normalized.lower()
    except (EmailNotValidError, ValueError, TypeError):
        return folded


def mixed_scripts(text: str) -> frozenset[str]:
    """The scripts of ``text`` when they mix in a way UTS #39 (highly restrictive) refuses, else empty."""
    scripts = frozenset(unicode_scripts.unique_aliases(text)) - _NEUTRAL_SCRIPTS
    if len(scripts) <= 1 or any(scripts <= allowed for allowed in _ALLOWED_SCRIPT_MIXES):
        return frozenset()
    return scripts


def _scripts_named(scripts: frozenset[str]) -> str:
    return " and ".join(s.title() for s in sorted(scripts))


def email_problem(email: str) -> str | None:
    """None if ``email`` (as typed or normalised) is acceptable, else what is wrong with it."""
    if not isinstance(email, str) or not email.strip():
        return "Enter an email address."
    if any(unicodedata.category(c) == "Cf" for c in email):
        return "The email address contains invisible characters (such as zero-width or direction marks); type it again."
    folded = _fold(email)
    if len(folded) > MAX_EMAIL_LENGTH:
        return f"The email address must be at most {MAX_EMAIL_LENGTH} characters long."
    try:
        valid = validate_email(folded, check_deliverability=False)
    except EmailNotValidError as exc:
        return f"Enter a valid email address, like name@example.com: {exc}"
    if len(valid.normalized) > MAX_EMAIL_LENGTH:
        return f"The email address must be at most {MAX_EMAIL_LENGTH} characters long."
    parts = [("the part before the @", valid.local_part)] + [
        (f"the domain part {label!r}", label) for label in valid.domain.split(".")
    ]
    for where, text in parts:
        scripts = mixed_scripts(text)
        if scripts:
            return (
                f"The email address mixes look-alike letters of different scripts ({_scripts_named(scripts)}) in "
                f"{where}; type it in one script."
            )
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
    """The normalised email and name, or a 422 :class:`ValidationProblem` naming every bad field. The password
    is judged with the email and the name as context (see :mod:`identity.passwords`)."""
    raw_email = email if isinstance(email, str) else ""
    email = normalize_email(raw_email)
    name = unicodedata.normalize("NFC", name).strip() if isinstance(name, str) else ""
    errors: dict[str, str] = {}
    for field, message in (
        ("email", email_problem(raw_email)),
        ("password", check_password_policy(password, email, name)),
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


async def register_customer(
    repo: Repository, passwords: Passwords, *, email: str, password: str, name: str
) -> User | None:
    """Registration through the API: the new account, or None when the email already has one. Nothing tells the
    caller which (the answer is the same and costs the same argon2 hash): the attempt is logged and recorded as
    :class:`identity.messages.RegistrationAttempted` in the outbox, for a mailer to tell the owner."""
    try:
        return await register_user(repo, passwords, email=email, password=password, name=name)
    except EmailTaken as taken:
        existing = await repo.user_by_email(str(taken))
        if existing is not None:
            log.warning(
                "registration attempt for existing account %s: nothing created, owner to be notified", existing.id
            )
            await repo.record_registration_attempt(existing.id, existing.email, utcnow())
        return None


async def change_password(
    repo: Repository, passwords: Passwords, user: User, new_password: str, *, field: str = "new_password"
) -> None:
    """Set a new password (checked against the policy with the user's email and name) and clear
    ``password_change_required``. The caller has checked the current password."""
    problem = check_password_policy(new_password, user.email, user.name)
    if problem is not None:
        raise ValidationProblem.field(field, problem)
    await repo.update_user(
        user.id, utcnow(), password_hash=await passwords.hash(new_password), password_change_required=False
    )


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
    """Lock (or unlock) an account. Locking also revokes its refresh tokens and, in the same transaction,
    announces :class:`runtime.revocation.AccessRevoked` (reason ``locked``) through the outbox: every verifier
    that hears it refuses the account's access tokens at once instead of at their expiry."""
    user = await repo.user_by_email(normalize_email(email))
    if user is None:
        return None
    await repo.update_user(user.id, utcnow(), disabled=disabled, revoke="locked" if disabled else None)
    return await repo.user_by_id(user.id)
