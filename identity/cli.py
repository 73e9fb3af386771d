"""``ecom users``, ``ecom keys`` and ``ecom clients``: identity administration from the command line.

    ecom users add EMAIL [--name NAME] [--role admin] [--password-stdin]
    ecom users list
    ecom users set-role EMAIL ROLE [ROLE ...]
    ecom users lock EMAIL [--unlock]
    ecom users set-password EMAIL [--password-stdin]
    ecom keys rotate [--alg ES256|Ed25519|RS256] [--immediately]
    ecom keys list
    ecom keys revoke KID
    ecom keys rekey
    ecom clients add CLIENT_ID [--public] [--name N] [--redirect-uri URI ...] [--scope S ...] [--role R ...]
    ecom clients list
    ecom clients set-redirect-uris CLIENT_ID URI [URI ...]

Each command works on identity's database (``ECOM_IDENTITY_DATABASE_URL`` or ``<data_dir>/identity.db``), migrating
it first. A running identity service picks key changes up within a minute; a revocation is announced to every
verifier through identity's outbox at once (the running service's relay sends it within a second or so). The
private keys are stored encrypted under the key-encryption key file (``<data_dir>/identity.kek`` or
``ECOM_IDENTITY_KEK_FILE``), which the commands need as well; ``ecom keys rekey`` replaces it. Passwords are read from a terminal
prompt or ``--password-stdin``, never from the command line (it shows in process lists and shell history);
without either, a strong one is generated and printed once. Secrets and private keys are never printed
except a new client's secret, once.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from config import Settings
from identity.accounts import (
    ROLES,
    change_password,
    generate_password,
    normalize_email,
    register_user,
    set_disabled,
    set_roles,
)
from identity.keys import SIGNING_ALGORITHMS
from identity.keystore import KeyManager
from identity.oauth import GRANT_TYPES, SCOPES, build_client, check_redirect_uri
from identity.passwords import Passwords
from identity.repository import ClientExists, EmailTaken, KeyConflict, Repository
from identity.seed import open_repository
from runtime.errors import ValidationProblem
from runtime.store import utcnow

Work = Callable[[Repository], Awaitable[int]]


class CliError(Exception):
    """A problem the user can fix; printed as one line, exit status 1."""


def _run(settings: Settings, work: Work) -> int:
    async def main() -> int:
        async with open_repository(settings) as repo:
            return await work(repo)

    from runtime.cli import with_database

    try:
        return asyncio.run(with_database(settings, "identity", main()))
    except CliError as exc:
        print(f"ecom: {exc}", file=sys.stderr)
        return 1


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


# ---------------------------------------------------------------------------------------------------
# users


def _read_password(args: argparse.Namespace) -> tuple[str, bool]:
    """(password, generated?)"""
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise CliError("--password-stdin: no password on standard input")
        return password, False
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if first != getpass.getpass("Repeat the password: "):
            raise CliError("the passwords differ")
        return first, False
    return generate_password(), True


def users_add(settings: Settings, args: argparse.Namespace) -> int:
    async def work(repo: Repository) -> int:
        password, generated = _read_password(args)
        try:
            user = await register_user(
                repo,
                Passwords.from_settings(settings.auth),
                email=args.email,
                password=password,
                name=args.name or args.email.partition("@")[0],
                roles=args.role or ("customer",),
            )
        except ValidationProblem as exc:
            raise CliError("; ".join(f"{f}: {m}" for f, m in exc.errors.items())) from None
        except EmailTaken:
            raise CliError(f"an account with the email {normalize_email(args.email)} exists already") from None
        print(f"created {user.email} ({user.id}) with roles {', '.join(user.roles)}")
        if generated:
            print(f"generated password (shown only now): {password}")
        return 0

    return _run(settings, work)


def users_set_password(settings: Settings, args: argparse.Namespace) -> int:
    """Set an account's password (the admin's, say, when the generated one is lost): prompted for, or read from
    ``--password-stdin``; the same password policy as registration, with the account's email and name."""

    async def work(repo: Repository) -> int:
        user = await repo.user_by_email(normalize_email(args.email))
        if user is None:
            raise CliError(f"no account has the email {normalize_email(args.email)}")
        if not args.password_stdin and not sys.stdin.isatty():
            raise CliError(
                "set-password: give the new password on standard input with --password-stdin, "
                "or run it in a terminal to be prompted"
            )
        password, _ = _read_password(args)
        try:
            await change_password(repo, Passwords.from_settings(settings.auth), user, password, field="password")
        except ValidationProblem as exc:
            raise CliError("; ".join(f"{f}: {m}" for f, m in exc.errors.items())) from None
        print(f"{user.email}: password changed (sign in again with it; existing tokens stay valid until they expire)")
        return 0

    return _run(settings, work)


def users_list(settings: Settings, args: argparse.Namespace) -> int:
    async def work(repo: Repository) -> int:
        rows, offset = [], 0
        while True:
            page, total = await repo.list_users(offset=offset, limit=500)
            rows += [[u.id, u.email, u.name, ",".join(u.roles), "locked" if u.disabled else "active"] for u in page]
            offset += len(page)
            if not page or offset >= total:
                break
        _table(rows, ["ID", "EMAIL", "NAME", "ROLES", "STATUS"])
        return 0

    return _run(settings, work)


def users_set_role(settings: Settings, args: argparse.Namespace) -> int:
    async def work(repo: Repository) -> int:
        try:
            user = await set_roles(repo, args.email, args.roles)
        except ValueError as exc:
            raise CliError(str(exc)) from None
        if user is None:
            raise CliError(f"no account has the email {normalize_email(args.email)}")
        print(f"{user.email}: roles {', '.join(user.roles)}")
        print("(new tokens carry them; tokens already issued keep theirs until they expire)")
        return 0

    return _run(settings, work)


def users_lock(settings: Settings, args: argparse.Namespace) -> int:
    async def work(repo: Repository) -> int:
        user = await set_disabled(repo, args.email, not args.unlock)
        if user is None:
            raise CliError(f"no account has the email {normalize_email(args.email)}")
        if args.unlock:
            print(f"{user.email}: unlocked")
        else:
            print(
                f"{user.email}: locked; its refresh tokens are revoked, access tokens expire within "
                f"{settings.auth.access_token_ttl} s"
            )
        return 0

    return _run(settings, work)


# ---------------------------------------------------------------------------------------------------
# keys


def _iso(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts))


def keys_list(settings: Settings, args: argparse.Namespace) -> int:
    async def work(repo: Repository) -> int:
        keys = KeyManager.from_settings(repo, settings)
        await keys.load()
        rows = [
            [k["kid"], k["alg"], k["state"], _iso(k["not_before"]), _iso(k["retired_at"]), _iso(k["expires_at"])]
            for k in keys.describe()
        ]
        _table(rows, ["KID", "ALG", "STATE", "SIGNS FROM", "RETIRED", "LEAVES JWKS"])
        return 0

    return _run(settings, work)


def keys_rotate(settings: Settings, args: argparse.Namespace) -> int:
    async def work(repo: Repository) -> int:
        keys = KeyManager.from_settings(repo, settings)
        try:
            key = await keys.rotate(args.alg, immediately=args.immediately)
        except KeyConflict:
            raise CliError("another process changed the keys at the same moment; run the command again") from None
        print(f"new {key.alg} key {key.kid}: published now, signs from {_iso(key.not_before)}")
        return 0

    return _run(settings, work)


def keys_revoke(settings: Settings, args: argparse.Namespace) -> int:
    async def work(repo: Repository) -> int:
        keys = KeyManager.from_settings(repo, settings)
        try:
            await keys.revoke(args.kid)
        except LookupError as exc:
            raise CliError(str(exc.args[0])) from None
        except KeyConflict:
            raise CliError("another process changed the keys at the same moment; run the command again") from None
        print(
            f"key {args.kid} revoked: gone from the JWKS; the revocation is announced to every verifier through "
            "identity's outbox (sent by the running identity service)"
        )
        return 0

    return _run(settings, work)


def keys_rekey(settings: Settings, args: argparse.Namespace) -> int:
    async def work(repo: Repository) -> int:
        keys = KeyManager.from_settings(repo, settings)
        old, new, count = await keys.rekey()
        was = ", ".join(old) or "none"
        print(
            f"key-encryption key {keys.kek.path} replaced: {was} -> {new}; {count} signing key(s) re-encrypted; "
            "the old key-encryption key is gone from the file"
        )
        return 0

    return _run(settings, work)


# ---------------------------------------------------------------------------------------------------
# clients


def clients_add(settings: Settings, args: argparse.Namespace) -> int:
    async def work(repo: Repository) -> int:
        try:
            client, secret = build_client(
                args.client_id,
                name=args.name,
                public=args.public,
                audience=settings.general.audience,
                redirect_uris=tuple(args.redirect_uri or ()),
                post_logout_redirect_uris=tuple(args.post_logout_redirect_uri or ()),
                grant_types=tuple(args.grant) if args.grant else None,
                scopes=tuple(args.scope) if args.scope else None,
                roles=tuple(args.role or ()),
                roles_allowed=True if args.roles_allowed else None,
            )
            await repo.create_client(client, utcnow())
        except ValueError as exc:
            raise CliError(str(exc)) from None
        except ClientExists:
            raise CliError(f"a client {args.client_id!r} exists already") from None
        kind = "public" if client.is_public else "confidential"
        grants, scopes = ", ".join(client.grant_types), " ".join(client.scopes)
        print(f"created {kind} client {client.client_id}: grants {grants}; scopes {scopes}")
        if secret is not None:
            print(f"client secret (shown only now; only its hash is stored): {secret}")
        return 0

    return _run(settings, work)


def clients_list(settings: Settings, args: argparse.Namespace) -> int:
    async def work(repo: Repository) -> int:
        rows = [
            [
                c.client_id,
                "public" if c.is_public else "confidential",
                ",".join(c.grant_types),
                " ".join(c.scopes),
                ",".join(c.roles) or "-",
                " ".join(c.redirect_uris) or "-",
            ]
            for c in await repo.list_clients()
        ]
        _table(rows, ["CLIENT", "TYPE", "GRANTS", "SCOPES", "ROLES", "REDIRECT URIS"])
        return 0

    return _run(settings, work)


def clients_set_roles_allowed(settings: Settings, args: argparse.Namespace) -> int:
    async def work(repo: Repository) -> int:
        if not await repo.set_roles_allowed(args.client_id, not args.off):
            raise CliError(f"no client {args.client_id!r}")
        print(f"{args.client_id}: user roles {'not ' if args.off else ''}carried in its tokens")
        return 0

    return _run(settings, work)


def clients_set_redirect_uris(settings: Settings, args: argparse.Namespace) -> int:
    async def work(repo: Repository) -> int:
        for uri in args.uris:
            problem = check_redirect_uri(uri)
            if problem is not None:
                raise CliError(f"redirect URI {uri!r}: {problem}")
        if not await repo.set_redirect_uris(args.client_id, tuple(args.uris)):
            raise CliError(f"no client {args.client_id!r}")
        print(f"{args.client_id}: redirect URIs {' '.join(args.uris)}")
        return 0

    return _run(settings, work)


# ---------------------------------------------------------------------------------------------------
# registration with the ecom command


def register(subparsers: Any) -> None:
    users = subparsers.add_parser("users", help="identity accounts").add_subparsers(dest="users_command", required=True)
    p = users.add_parser("add", help="create an account")
    p.add_argument("email")
    p.add_argument("--name", help="display name (default: the email's local part)")
    p.add_argument("--role", action="append", choices=ROLES, help="repeat for several (default: customer)")
    p.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    p.set_defaults(handler=users_add)
    users.add_parser("list", help="list accounts").set_defaults(handler=users_list)
    p = users.add_parser("set-password", help="set an account's password (prompted, or --password-stdin)")
    p.add_argument("email")
    p.add_argument("--password-stdin", action="store_true", help="read the new password from standard input")
    p.set_defaults(handler=users_set_password)
    p = users.add_parser("set-role", help="replace an account's roles")
    p.add_argument("email")
    p.add_argument("roles", nargs="+", choices=ROLES)
    p.set_defaults(handler=users_set_role)
    p = users.add_parser("lock", help="lock an account (it cannot sign in; refresh tokens revoked)")
    p.add_argument("email")
    p.add_argument("--unlock", action="store_true", help="unlock instead")
    p.set_defaults(handler=users_lock)

    keys = subparsers.add_parser("keys", help="token signing keys").add_subparsers(dest="keys_command", required=True)
    p = keys.add_parser("rotate", help="add a new signing key (published now, signs in 10 minutes)")
    p.add_argument("--alg", choices=list(SIGNING_ALGORITHMS), help="default: settings auth.signing_alg")
    p.add_argument("--immediately", action="store_true", help="sign with it at once (after a compromise)")
    p.set_defaults(handler=keys_rotate)
    keys.add_parser("list", help="list keys and their states").set_defaults(handler=keys_list)
    p = keys.add_parser(
        "revoke",
        help="remove a compromised key from the JWKS now",
        # kids are RFC 7638 thumbprints (base64url): one in 64 starts with "-", which argparse reads as an option
        usage="ecom keys revoke [-h] [--] KID   (write `-- KID` when the kid starts with '-')",
    )
    p.add_argument("kid", metavar="KID")
    p.set_defaults(handler=keys_revoke)
    keys.add_parser(
        "rekey", help="replace the key-encryption key (identity.kek) and re-encrypt every signing key under it"
    ).set_defaults(handler=keys_rekey)

    clients_parser = subparsers.add_parser("clients", help="OAuth clients")
    clients = clients_parser.add_subparsers(dest="clients_command", required=True)
    p = clients.add_parser("add", help="register a client (a confidential one gets a secret, printed once)")
    p.add_argument("client_id")
    p.add_argument("--name")
    p.add_argument("--public", action="store_true", help="no secret: browser/mobile app using PKCE")
    p.add_argument("--redirect-uri", action="append")
    p.add_argument("--post-logout-redirect-uri", action="append")
    p.add_argument("--grant", action="append", choices=GRANT_TYPES)
    p.add_argument("--scope", action="append", choices=SCOPES)
    p.add_argument("--role", action="append", help="roles of its client_credentials tokens, e.g. service")
    p.add_argument(
        "--roles-allowed",
        action="store_true",
        help="let its tokens carry the signed-in user's roles (first-party apps only)",
    )
    p.set_defaults(handler=clients_add)
    p = clients.add_parser("set-roles-allowed", help="let a client's tokens carry users' roles, or stop it (--off)")
    p.add_argument("client_id")
    p.add_argument("--off", action="store_true")
    p.set_defaults(handler=clients_set_roles_allowed)
    clients.add_parser("list", help="list clients").set_defaults(handler=clients_list)
    p = clients.add_parser("set-redirect-uris", help="replace a client's redirect URIs")
    p.add_argument("client_id")
    p.add_argument("uris", nargs="+")
    p.set_defaults(handler=clients_set_redirect_uris)
