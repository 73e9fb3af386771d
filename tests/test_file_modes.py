"""Every file the shop creates is private (issue 12): the data folder 0700; SQLite databases and their -wal and
-shm files 0600; identity's key-encryption key 0600. Checked on real files, in-process (no umask help) and
through the ``ecom`` command (which also sets umask 077)."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

from sqlalchemy import text

from identity.keystore import KeyEncryptionKeys
from runtime.store import create_engine


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_sqlite_data_folder_db_wal_and_shm_are_private(tmp_path: Path) -> None:
    old = os.umask(0o022)  # the usual umask: the modes must not depend on the caller's
    try:
        folder = tmp_path / "data" / "nested"
        db = folder / "shop.db"
        engine = create_engine(f"sqlite+aiosqlite:///{db}")
        try:
            async with engine.begin() as conn:
                await conn.execute(text("CREATE TABLE t (x TEXT)"))
                await conn.execute(text("INSERT INTO t VALUES ('secret')"))
            async with engine.connect() as conn:  # an open connection: -wal and -shm exist now
                await conn.execute(text("SELECT x FROM t"))
                assert mode(folder) == 0o700 and mode(tmp_path / "data") == 0o700
                for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
                    assert path.exists(), path
                    assert mode(path) == 0o600, (path, oct(mode(path)))
        finally:
            await engine.dispose()
    finally:
        os.umask(old)


async def test_an_open_data_folder_and_database_are_tightened(tmp_path: Path, caplog: Any) -> None:
    folder = tmp_path / "var"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)
    db = folder / "order.db"
    db.touch()
    os.chmod(db, 0o644)
    caplog.set_level(logging.WARNING)
    engine = create_engine(f"sqlite+aiosqlite:///{db}")
    await engine.dispose()
    assert mode(folder) == 0o700 and mode(db) == 0o600
    assert "made 0700" in caplog.text and "made 0600" in caplog.text


def test_a_shared_folder_is_left_alone_with_a_warning(tmp_path: Path, caplog: Any, monkeypatch: Any) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # like /tmp
    caplog.set_level(logging.WARNING)
    create_engine(f"sqlite+aiosqlite:///{shared / 'x.db'}").sync_engine.dispose()
    assert mode(shared) == 0o1777 and "keep it in a private data folder" in caplog.text
    assert mode(shared / "x.db") == 0o600


def test_kek_file_is_0600_in_a_0700_folder(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        kek = KeyEncryptionKeys(tmp_path / "keys" / "identity.kek")
        kek.current()
        assert mode(kek.path) == 0o600 and mode(kek.path.parent) == 0o700
        kek.replace([kek.generate(), *kek.refresh()])  # a rekey's rewrite keeps it private
        assert mode(kek.path) == 0o600
        assert not [p for p in kek.path.parent.iterdir() if p.name.endswith(".tmp")], "no temporary file left"
    finally:
        os.umask(old)


def test_the_ecom_command_makes_private_files(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECOM_")}
    env.update(ECOM_DATA_DIR=str(tmp_path / "var"), ECOM_LOG_LEVEL="WARNING")
    for argv in (["db", "upgrade"], ["keys", "rotate"]):
        done = subprocess.run(
            [sys.executable, "-m", "runtime.cli", *argv], env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
    var = tmp_path / "var"
    assert mode(var) == 0o700
    made = sorted(p.name for p in var.iterdir())
    assert "identity.db" in made and "identity.kek" in made
    for path in var.iterdir():
        assert mode(path) & 0o077 == 0, (path.name, oct(mode(path)))
    assert mode(var / "identity.kek") == 0o600 and mode(var / "identity.db") == 0o600
