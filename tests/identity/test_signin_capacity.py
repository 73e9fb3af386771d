"""Sign-in capacity: argon2id parameters as settings, hashes upgraded at sign-in, and a bounded hashing queue
that refuses surplus sign-ins (503 + Retry-After) while refresh grants keep answering.

Behavioural, not timed: the argon2 pool is filled by holding its one thread, so which request is refused is
decided by the queue bound, never by the speed of the machine."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from argon2 import profiles

from config import ConfigError, load_settings
from identity.accounts import normalize_email
from identity.passwords import Passwords, PasswordsBusy
from identity.seed import seed
from identity.service import create_app
from runtime.store import utcnow
from tests.identity.conftest import ADMIN_PASSWORD, PASSWORD, IdentityServer
from tests.support.cluster import free_base_port

EMAIL = "queue@example.com"


async def start(db_url: str, tmp_path: Any, aiohttp_client: Any, passwords: Passwords) -> IdentityServer:
    port = free_base_port(1)
    settings = load_settings(
        {"ECOM_DATA_DIR": str(tmp_path), "ECOM_IDENTITY_PORT": str(port), "ECOM_ADMIN_PASSWORD": ADMIN_PASSWORD}
    )
    await seed(settings, db_url, password_hasher=passwords)
    app = create_app(settings, database_url=db_url, password_hasher=passwords)
    client = await aiohttp_client(TestServer(app, host="127.0.0.1", port=port))
    return IdentityServer(client, settings, db_url)


def hold_the_pool(passwords: Passwords) -> tuple[threading.Event, asyncio.Future[Any]]:
    """Occupy every admitted slot of ``passwords`` with a job that waits for the returned event."""
    release = threading.Event()
    jobs = [passwords._submit(lambda: release.wait(30)) for _ in range(passwords.max_workers + passwords.queue)]
    return release, asyncio.gather(*jobs)


async def test_refresh_answers_while_surplus_sign_ins_are_refused(
    db_url: str, tmp_path: Any, aiohttp_client: Any
) -> None:
    passwords = Passwords(profiles.CHEAPEST, max_workers=1, queue=1)
    try:
        idsrv = await start(db_url, tmp_path, aiohttp_client, passwords)
        await idsrv.register(EMAIL)
        status, tokens = await idsrv.password_grant(EMAIL)
        assert status == 200, tokens

        release, held = hold_the_pool(passwords)
        try:
            assert passwords.admitted == 2
            # one more sign-in than the pool admits: refused at once, before any argon2 work, with Retry-After
            status, body, resp = await idsrv.token(
                {"grant_type": "password", "client_id": "storefront", "username": EMAIL, "password": PASSWORD}
            )
            assert status == 503, body
            assert int(resp.headers["Retry-After"]) >= 1
            assert body["type"].endswith("/unavailable")
            assert passwords.refused == 1
            # refresh grants and token checks need no argon2: they keep answering
            status, refreshed = await idsrv.refresh(tokens["refresh_token"])
            assert status == 200, refreshed
            resp = await idsrv.client.get(
                "/connect/userinfo", headers={"Authorization": f"Bearer {refreshed['access_token']}"}
            )
            assert resp.status == 200, await resp.text()
        finally:
            release.set()
            await held
        # the refused attempt counted as nothing: no failure, no lock-out; the next sign-in works
        assert passwords.admitted == 0
        status, body = await idsrv.password_grant(EMAIL)
        assert status == 200, body
    finally:
        passwords.shutdown()


async def test_queue_bound_refuses_before_work() -> None:
    passwords = Passwords(profiles.CHEAPEST, max_workers=1, queue=0)
    try:
        release, held = hold_the_pool(passwords)
        with pytest.raises(PasswordsBusy) as refused:
            await passwords.verify("whatever it is", None)
        assert refused.value.status == 503 and int(refused.value.headers["Retry-After"]) >= 1
        release.set()
        await held
        assert await passwords.verify("Correct horse 9", await passwords.hash("Correct horse 9"))
    finally:
        passwords.shutdown()


async def test_old_hash_is_upgraded_at_sign_in(db_url: str, tmp_path: Any, aiohttp_client: Any) -> None:
    old = Passwords(profiles.CHEAPEST)
    new = Passwords(dataclasses.replace(profiles.CHEAPEST, time_cost=2, memory_cost=16))
    try:
        first = await start(db_url, tmp_path, aiohttp_client, old)
        await first.register(EMAIL)
        repo = first.identity.repo
        user = await repo.user_by_email(normalize_email(EMAIL))
        assert user is not None and new.needs_rehash(user.password_hash)
        await first.client.close()

        second = await start(db_url, tmp_path, aiohttp_client, new)
        status, body = await second.password_grant(EMAIL, password="wrong password entirely")
        assert status == 400, body
        user = await second.identity.repo.user_by_email(normalize_email(EMAIL))
        assert user is not None and new.needs_rehash(user.password_hash)  # a failed sign-in changes no hash
        status, body = await second.password_grant(EMAIL)
        assert status == 200, body
        user = await second.identity.repo.user_by_email(normalize_email(EMAIL))
        assert user is not None and not new.needs_rehash(user.password_hash)
        assert user.password_hash.startswith("$argon2id$v=19$m=16,t=2,p=1$")
        assert not user.password_change_required
        status, body = await second.password_grant(EMAIL)  # the new hash verifies
        assert status == 200, body
    finally:
        old.shutdown()
        new.shutdown()


async def test_rehash_never_overwrites_a_password_changed_meanwhile(
    db_url: str, tmp_path: Any, aiohttp_client: Any
) -> None:
    passwords = Passwords(profiles.CHEAPEST)
    try:
        idsrv = await start(db_url, tmp_path, aiohttp_client, passwords)
        await idsrv.register(EMAIL)
        repo = idsrv.identity.repo
        user = await repo.user_by_email(normalize_email(EMAIL))
        assert user is not None
        changed = await passwords.hash("A different passphrase 77")
        assert await repo.update_user(user.id, utcnow(), password_hash=changed)
        upgraded = await passwords.hash(PASSWORD)
        assert not await repo.rehash_password(user.id, utcnow(), user.password_hash, upgraded)
        after = await repo.user_by_email(normalize_email(EMAIL))
        assert after is not None and after.password_hash == changed
    finally:
        passwords.shutdown()


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"ECOM_AUTH_ARGON2_MEMORY_KIB": "8192"}, "ECOM_AUTH_ARGON2_MEMORY_KIB"),
        ({"ECOM_AUTH_ARGON2_TIME_COST": "1"}, "ECOM_AUTH_ARGON2_TIME_COST"),
        ({"ECOM_AUTH_ARGON2_MEMORY_KIB": "12288", "ECOM_AUTH_ARGON2_TIME_COST": "2"}, "ECOM_AUTH_ARGON2_MEMORY_KIB"),
        ({"ECOM_AUTH_ARGON2_PARALLELISM": "0"}, "ECOM_AUTH_ARGON2_PARALLELISM"),
    ],
)
def test_parameters_below_owasp_are_refused_in_one_line(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(env)
    message = str(refused.value)
    assert message.startswith(variable) and "\n" not in message


def test_owasp_rows_and_stronger_settings_are_accepted() -> None:
    for memory, time_cost in ((47104, 1), (19456, 2), (12288, 3), (9216, 4), (7168, 5), (65536, 3)):
        auth = load_settings(
            {"ECOM_AUTH_ARGON2_MEMORY_KIB": str(memory), "ECOM_AUTH_ARGON2_TIME_COST": str(time_cost)}
        ).auth
        params = Passwords.from_settings(auth).parameters
        assert (params.memory_cost, params.time_cost, params.parallelism) == (memory, time_cost, 1)
    default = Passwords.from_settings(load_settings({}).auth).parameters
    assert (default.memory_cost, default.time_cost, default.parallelism) == (19456, 2, 1)
