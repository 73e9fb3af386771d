"""Private signing keys at rest (issue 12): sealed with AES-256-GCM under a key-encryption key kept in a file
outside the database (``<data_dir>/identity.kek``, mode 0600); old plain rows re-sealed on start; a missing or
wrong KEK stops start-up with one line; ``ecom keys rekey`` replaces the KEK crash-safely."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, select

from config import Settings, load_settings
from identity.cli import register
from identity.keys import generate_key
from identity.keystore import SEALED_PREFIX, KekError, KeyEncryptionKeys, KeyManager
from identity.repository import Repository, signing_keys
from identity.seed import open_repository, seed
from runtime.store import create_engine, utcnow
from tests.identity.conftest import CHEAP_PASSWORDS, IdentityServer


def sqlite_file(db_url: str) -> Path:
    return Path(db_url.split(":///", 1)[1])


def raw_bytes(db: Path) -> bytes:
    return b"".join(p.read_bytes() for p in (db, Path(f"{db}-wal")) if p.exists())


async def rows(repo: Repository) -> dict[str, str]:
    async with repo.engine.connect() as conn:
        return {r.kid: r.record for r in await conn.execute(select(signing_keys.c.kid, signing_keys.c.record))}


async def test_the_database_holds_no_private_key_material(idsrv: IdentityServer) -> None:
    keys = idsrv.identity.keys
    await keys.rotate(immediately=True)
    await keys.rotate(alg="Ed25519")
    stored = await rows(idsrv.identity.repo)
    assert len(stored) == 3 and all(r.startswith(SEALED_PREFIX) for r in stored.values())
    assert all('"d"' not in r for r in stored.values())
    kek = keys.kek
    assert kek.path == Path(idsrv.settings.general.data_dir) / "identity.kek"
    assert all(r.startswith(f"{SEALED_PREFIX}{kek.ids()[0]}:") for r in stored.values())
    if idsrv.db_url.startswith("sqlite"):
        # what a local user reading the files would see
        data = raw_bytes(sqlite_file(idsrv.db_url))
        for k in keys.ring:
            assert k.private_jwk["d"].encode() not in data
    # and the service signs and verifies with what it opened
    await idsrv.register("ann@example.com")
    status, _ = await idsrv.password_grant("ann@example.com")
    assert status == 200


async def test_a_row_moved_to_another_kid_does_not_open(idsrv: IdentityServer) -> None:
    repo = idsrv.identity.repo
    first = idsrv.identity.keys.ring.active_key()
    other = await idsrv.identity.keys.rotate()
    stored = await rows(repo)
    async with repo.engine.begin() as conn:  # someone with write access swaps the sealed records
        await conn.execute(
            signing_keys.update().where(signing_keys.c.kid == other.kid).values(record=stored[first.kid])
        )
    with pytest.raises(KekError, match=other.kid):
        await idsrv.identity.keys.load()


async def test_plain_rows_of_older_versions_are_read_and_re_sealed_on_start(db_url: str, tmp_path: Any) -> None:
    settings = load_settings({"ECOM_DATA_DIR": str(tmp_path)})
    legacy = generate_key("ES256")
    async with open_repository(settings, db_url) as repo:
        async with repo.engine.begin() as conn:  # what the previous version wrote: the record as plain JSON
            await conn.execute(
                insert(signing_keys).values(
                    kid=legacy.kid, alg="ES256", record=json.dumps(legacy.to_record()), revision=1, created_at=utcnow()
                )
            )
        keys = KeyManager.from_settings(repo, settings)
        assert await keys.ensure_active() is None, "the plain key is read and still signs"
        assert keys.ring.active_key().kid == legacy.kid
        assert (await rows(repo))[legacy.kid].startswith(SEALED_PREFIX)
        assert (tmp_path / "identity.kek").exists()
    if db_url.startswith("sqlite"):
        assert legacy.private_jwk["d"].encode() not in raw_bytes(sqlite_file(db_url)), "old bytes zeroed, not freed"


async def test_a_missing_or_wrong_kek_stops_start_up(db_url: str, tmp_path: Any) -> None:
    settings = load_settings({"ECOM_DATA_DIR": str(tmp_path), "ECOM_ADMIN_PASSWORD": "Admin-Password-1"})
    await seed(settings, db_url, password_hasher=CHEAP_PASSWORDS)
    kek = tmp_path / "identity.kek"
    kek.rename(tmp_path / "saved.kek")
    with pytest.raises(KekError, match="missing"):
        await seed(settings, db_url, password_hasher=CHEAP_PASSWORDS)
    assert not kek.exists(), "no new KEK is made while the rows need the old one"
    KeyEncryptionKeys(kek).current()  # another, unrelated KEK
    with pytest.raises(KekError, match="does not hold"):
        await seed(settings, db_url, password_hasher=CHEAP_PASSWORDS)
    (tmp_path / "saved.kek").replace(kek)
    await seed(settings, db_url, password_hasher=CHEAP_PASSWORDS)  # the right file: fine again


def _ecom(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runtime.cli", *argv], env=env, capture_output=True, text=True, timeout=60
    )


def test_wrong_kek_is_one_line_at_start_not_a_traceback(tmp_path: Any) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECOM_")}
    env.update(ECOM_DATA_DIR=str(tmp_path / "var"), ECOM_LOG_LEVEL="WARNING", ECOM_IDENTITY_PORT="1")
    assert _ecom(env, "keys", "rotate").returncode == 0
    (tmp_path / "var" / "identity.kek").unlink()
    for argv in (["keys", "list"], ["serve", "identity"]):
        done = _ecom(env, *argv)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert "Traceback" not in done.stderr
        assert lines[-1].startswith("ecom: configuration error: identity:") and "identity.kek is missing" in lines[-1]
    # a KEK file elsewhere (ECOM_IDENTITY_KEK_FILE) that is not the one the keys were sealed with
    other = tmp_path / "elsewhere" / "other.kek"
    KeyEncryptionKeys(other).current()
    done = _ecom({**env, "ECOM_IDENTITY_KEK_FILE": str(other)}, "keys", "list")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "does not hold" in done.stderr.strip().splitlines()[-1]


async def test_rekey_replaces_the_kek_and_the_old_one_opens_nothing(idsrv: IdentityServer, tmp_path: Any) -> None:
    service_keys = idsrv.identity.keys
    await service_keys.rotate()
    kek_file = service_keys.kek.path
    old_copy = tmp_path / "old.kek"
    shutil.copy(kek_file, old_copy)
    old_id = service_keys.kek.ids()[0]

    # `ecom keys rekey` in another process: its own engine and its own view of the KEK file
    engine = create_engine(idsrv.db_url)
    try:
        cli = KeyManager.from_settings(Repository(engine), idsrv.settings)
        before, new_id, count = await cli.rekey()
    finally:
        await engine.dispose()
    assert before == [old_id] and new_id != old_id and count == 2
    assert KeyEncryptionKeys(kek_file).ids() == [new_id], "the old KEK is gone from the file"
    assert oct(kek_file.stat().st_mode & 0o777) == "0o600"
    stored = await rows(idsrv.identity.repo)
    assert all(r.startswith(f"{SEALED_PREFIX}{new_id}:") for r in stored.values())

    # the running service follows (it re-reads the file when it changes) and keeps signing
    await service_keys.load()
    await idsrv.register("ann@example.com")
    assert (await idsrv.password_grant("ann@example.com"))[0] == 200
    new = await service_keys.rotate()  # sealed under the new KEK
    assert (await rows(idsrv.identity.repo))[new.kid].startswith(f"{SEALED_PREFIX}{new_id}:")

    # the old KEK decrypts nothing any more
    stale = KeyManager(idsrv.identity.repo, kek=KeyEncryptionKeys(old_copy))
    with pytest.raises(KekError, match=f"encrypted with key-encryption key {new_id}"):
        await stale.load()


async def test_a_rekey_cut_short_is_finished_by_the_next_start(db_url: str, tmp_path: Any) -> None:
    settings = load_settings({"ECOM_DATA_DIR": str(tmp_path)})
    async with open_repository(settings, db_url) as repo:
        keys = KeyManager.from_settings(repo, settings)
        await keys.ensure_active()
        await keys.rotate()
        old = keys.kek.refresh()[0]
        new = keys.kek.generate()
        keys.kek.replace([new, old])  # step 1 of a rekey done, then the process died
        restarted = KeyManager.from_settings(repo, settings)
        await restarted.ensure_active()
        assert all(r.startswith(f"{SEALED_PREFIX}{new[0]}:") for r in (await rows(repo)).values())
        old_ids, newest, count = await restarted.rekey()  # the next rekey completes and leaves one KEK
        assert old_ids == [new[0], old[0]] and count == 2 and restarted.kek.ids() == [newest]
        assert len(await restarted.stored_keys()) == 2


def test_ecom_keys_rekey_command(settings_dir: Settings, capsys: Any) -> None:
    import argparse
    import asyncio

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    for argv in (["keys", "rotate"], ["keys", "rekey"], ["keys", "list"]):
        args = parser.parse_args(argv)
        assert args.handler(settings_dir, args) == 0
    out = capsys.readouterr().out
    assert "1 signing key(s) re-encrypted" in out and "active" in out

    async def count() -> int:
        async with open_repository(settings_dir) as repo:
            return len(await KeyManager.from_settings(repo, settings_dir).stored_keys())

    assert asyncio.run(count()) == 1


@pytest.fixture
def settings_dir(tmp_path: Any) -> Settings:
    return load_settings({"ECOM_DATA_DIR": str(tmp_path / "var")})
