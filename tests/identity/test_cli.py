"""``ecom users|keys|clients`` and the first-run seed, on SQLite and PostgreSQL. The handlers are called as
``ecom`` calls them (parsed by the real parser; in a thread, since each runs its own event loop); one test runs
the real command in a subprocess."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
from typing import Any

import pytest

from config import ConfigError, Settings, load_settings
from identity.keystore import KeyManager
from identity.seed import open_repository, seed
from identity.tokens import hash_token
from runtime.cli import build_parser
from tests.identity.conftest import CHEAP_PASSWORDS


@pytest.fixture
def settings(db_url: str, tmp_path: Any) -> Settings:
    return load_settings({"ECOM_DATA_DIR": str(tmp_path), "ECOM_IDENTITY_DATABASE_URL": db_url})


async def ecom(settings: Settings, *argv: str, stdin: str | None = None, monkeypatch: Any = None) -> int:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    args = build_parser().parse_args(list(argv))
    return await asyncio.to_thread(args.handler, settings, args)


async def test_users_commands(settings: Settings, capsys: Any, monkeypatch: Any) -> None:
    assert (
        await ecom(
            settings,
            "users",
            "add",
            "Ann@Example.com",
            "--name",
            "Ann",
            "--password-stdin",
            stdin="Correct-Horse-9\n",
            monkeypatch=monkeypatch,
        )
        == 0
    )
    assert "created ann@example.com" in capsys.readouterr().out
    assert (
        await ecom(
            settings,
            "users",
            "add",
            "ann@example.com",
            "--password-stdin",
            stdin="Correct-Horse-9\n",
            monkeypatch=monkeypatch,
        )
        == 1
    )
    assert "exists already" in capsys.readouterr().err
    assert (
        await ecom(
            settings, "users", "add", "bob@example.com", "--password-stdin", stdin="short\n", monkeypatch=monkeypatch
        )
        == 1
    )
    assert "password:" in capsys.readouterr().err
    # no terminal and no --password-stdin: a strong password is generated and shown once
    assert (
        await ecom(settings, "users", "add", "cat@example.com", "--role", "admin", stdin="", monkeypatch=monkeypatch)
        == 0
    )
    out = capsys.readouterr().out
    generated = out.split("generated password (shown only now): ")[1].strip()
    assert len(generated) >= 20

    assert await ecom(settings, "users", "set-role", "ANN@example.com", "admin", "customer") == 0
    assert await ecom(settings, "users", "lock", "ann@example.com") == 0
    assert await ecom(settings, "users", "set-role", "nobody@example.com", "admin") == 1
    capsys.readouterr()
    assert await ecom(settings, "users", "list") == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split() == ["ID", "EMAIL", "NAME", "ROLES", "STATUS"]
    ann = next(line for line in listing if "ann@example.com" in line)
    assert "admin,customer" in ann and ann.endswith("locked")
    assert any("cat@example.com" in line and "admin" in line and line.endswith("active") for line in listing)
    assert await ecom(settings, "users", "lock", "ann@example.com", "--unlock") == 0

    async with open_repository(settings) as repo:
        ann_user = await repo.user_by_email("ann@example.com")
        cat_user = await repo.user_by_email("cat@example.com")
    assert ann_user is not None and not ann_user.disabled and ann_user.roles == ("admin", "customer")
    assert ann_user.password_hash.startswith("$argon2id$v=19$m=19456,t=2,p=1$"), (
        "the CLI hashes with production parameters"
    )
    assert cat_user is not None and CHEAP_PASSWORDS.hasher.verify(cat_user.password_hash, generated)


async def test_keys_commands(settings: Settings, capsys: Any) -> None:
    assert await ecom(settings, "keys", "list") == 0  # an empty database: nothing to list, but it works
    assert await ecom(settings, "keys", "rotate") == 0  # the first key signs at once
    assert await ecom(settings, "keys", "rotate") == 0  # the next one is published ahead
    capsys.readouterr()
    assert await ecom(settings, "keys", "list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["KID", "ALG", "STATE"]
    states = [line.split()[2] for line in lines[1:]]
    assert sorted(states) == ["active", "pending"]
    async with open_repository(settings) as repo:
        stored = await KeyManager.from_settings(repo, settings).stored_keys()
    assert all(s.key.private_jwk["d"] not in "\n".join(lines) for s in stored), "no key material printed"

    active = next(line.split()[0] for line in lines[1:] if line.split()[2] == "active")
    # "--": a thumbprint kid may start with "-" (1 in 64), as the command's usage line says
    assert await ecom(settings, "keys", "revoke", "--", active) == 0
    assert await ecom(settings, "keys", "revoke", "no-such-kid") == 1
    capsys.readouterr()
    await ecom(settings, "keys", "list")
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert active not in {r[0] for r in rows if r[2] != "expired"}
    assert "active" in {r[2] for r in rows}, "revoking the only signer makes a replacement"
    assert await ecom(settings, "keys", "rotate", "--alg", "Ed25519", "--immediately") == 0
    assert "new Ed25519 key" in capsys.readouterr().out


async def test_clients_commands(settings: Settings, capsys: Any) -> None:
    assert await ecom(settings, "clients", "add", "orders-worker", "--role", "service") == 0
    out = capsys.readouterr().out
    secret = out.split("client secret (shown only now; only its hash is stored): ")[1].strip()
    async with open_repository(settings) as repo:
        client = await repo.client("orders-worker")
    assert client is not None and client.secret_hash == hash_token(secret) and client.roles == ("service",)
    assert await ecom(settings, "clients", "add", "orders-worker") == 1
    assert await ecom(settings, "clients", "add", "spa", "--public", "--redirect-uri", "http://shop.example/cb") == 1
    assert "https" in capsys.readouterr().err
    assert await ecom(settings, "clients", "add", "spa", "--public", "--redirect-uri", "https://shop.example/cb") == 0
    assert (
        await ecom(
            settings, "clients", "set-redirect-uris", "spa", "https://shop.example/cb2", "http://localhost:3000/cb"
        )
        == 0
    )
    capsys.readouterr()
    assert await ecom(settings, "clients", "list") == 0
    listing = capsys.readouterr().out
    assert "https://shop.example/cb2 http://localhost:3000/cb" in listing and secret not in listing
    # a third-party app's tokens carry no user roles until an admin allows it, and that can be taken back
    async with open_repository(settings) as repo:
        assert (await repo.client("spa")).roles_allowed is False
    assert await ecom(settings, "clients", "set-roles-allowed", "spa") == 0
    async with open_repository(settings) as repo:
        assert (await repo.client("spa")).roles_allowed is True
    assert await ecom(settings, "clients", "set-roles-allowed", "spa", "--off") == 0
    assert await ecom(settings, "clients", "set-roles-allowed", "nobody") == 1
    async with open_repository(settings) as repo:
        assert (await repo.client("spa")).roles_allowed is False


async def test_seed_creates_everything_once(settings: Settings, capsys: Any) -> None:
    await seed(settings, password_hasher=CHEAP_PASSWORDS)
    out = capsys.readouterr().out
    assert "admin@example.com" in out and "shown only this once" in out
    password = out.split("\n\n")[1].strip()
    await seed(settings, password_hasher=CHEAP_PASSWORDS)
    assert capsys.readouterr().out == "", "nothing twice, the password is never shown again"
    async with open_repository(settings) as repo:
        admin = await repo.user_by_email("admin@example.com")
        storefront = await repo.client("storefront")
        keys = await KeyManager.from_settings(repo, settings).stored_keys()
    assert admin is not None and admin.roles == ("admin",)
    assert CHEAP_PASSWORDS.hasher.verify(admin.password_hash, password)
    assert storefront is not None and storefront.is_public and "password" in storefront.grant_types
    assert len(keys) == 1


async def test_seed_refuses_a_weak_admin_password(db_url: str, tmp_path: Any) -> None:
    settings = load_settings({"ECOM_DATA_DIR": str(tmp_path), "ECOM_ADMIN_PASSWORD": "admin"})
    with pytest.raises(ConfigError, match="ECOM_ADMIN_PASSWORD"):
        await seed(settings, db_url, password_hasher=CHEAP_PASSWORDS)


def test_ecom_users_command_in_a_subprocess(tmp_path: Any) -> None:
    env = {**os.environ, "ECOM_DATA_DIR": str(tmp_path), "ECOM_LOG_LEVEL": "WARNING"}
    added = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "users", "add", "dan@example.com", "--password-stdin"],
        input="Correct-Horse-9\n",
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert added.returncode == 0, added.stderr
    assert "created dan@example.com" in added.stdout and "Correct-Horse-9" not in added.stdout + added.stderr

    async def stored() -> Any:
        async with open_repository(load_settings({"ECOM_DATA_DIR": str(tmp_path)})) as repo:
            return await repo.user_by_email("dan@example.com")

    assert asyncio.run(stored()) is not None


async def test_users_set_password(settings: Settings, capsys: Any, monkeypatch: Any) -> None:
    assert (
        await ecom(
            settings,
            "users",
            "add",
            "eve@example.com",
            "--password-stdin",
            stdin="Correct-Horse-9\n",
            monkeypatch=monkeypatch,
        )
        == 0
    )
    new = "plum tractor velvet 83 orbit"
    assert (
        await ecom(
            settings,
            "users",
            "set-password",
            "EVE@example.com",
            "--password-stdin",
            stdin=new + "\n",
            monkeypatch=monkeypatch,
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "eve@example.com: password changed" in out and new not in out
    async with open_repository(settings) as repo:
        eve = await repo.user_by_email("eve@example.com")
    assert eve is not None and CHEAP_PASSWORDS.hasher.verify(eve.password_hash, new)
    assert not eve.password_change_required
    # the registration policy applies; unknown accounts and a missing password are one-line errors
    assert (
        await ecom(
            settings,
            "users",
            "set-password",
            "eve@example.com",
            "--password-stdin",
            stdin="password1\n",
            monkeypatch=monkeypatch,
        )
        == 1
    )
    assert capsys.readouterr().err.startswith("ecom: password: ")
    assert (
        await ecom(
            settings,
            "users",
            "set-password",
            "nobody@example.com",
            "--password-stdin",
            stdin=new + "\n",
            monkeypatch=monkeypatch,
        )
        == 1
    )
    assert "no account has the email nobody@example.com" in capsys.readouterr().err
    # no terminal and no --password-stdin: nothing is generated for an existing account
    assert await ecom(settings, "users", "set-password", "eve@example.com", stdin="", monkeypatch=monkeypatch) == 1
    assert "--password-stdin" in capsys.readouterr().err
    async with open_repository(settings) as repo:
        assert CHEAP_PASSWORDS.hasher.verify((await repo.user_by_email("eve@example.com")).password_hash, new)


def test_ecom_users_set_password_in_a_subprocess(tmp_path: Any) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECOM_")}
    env.update(ECOM_DATA_DIR=str(tmp_path), ECOM_LOG_LEVEL="WARNING")
    cmd = [sys.executable, "-m", "runtime.cli", "users"]

    def run(*argv: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cmd, *argv], input=stdin, env=env, capture_output=True, text=True, timeout=60)

    assert run("add", "admin@example.com", "--role", "admin").returncode == 0
    changed = run("set-password", "admin@example.com", "--password-stdin", stdin="plum tractor velvet 83 orbit\n")
    assert changed.returncode == 0, changed.stderr
    assert changed.stderr == "" and "password changed" in changed.stdout
