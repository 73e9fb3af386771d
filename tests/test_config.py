"""Settings from defaults, a TOML file and ECOM_* variables; bad values name the setting."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from config import ConfigError, load_settings


def test_defaults_are_the_embedded_setup():
    s = load_settings({})
    assert s.bus.backend == "memory"
    assert [s.services[n].port for n in ("gateway", "identity", "catalog", "cart", "order")] == [
        8000,
        8001,
        8002,
        8003,
        8004,
    ]
    assert s.database_url("cart") == "sqlite+aiosqlite:///var/cart.db"
    assert s.general.admin_open is False


def test_environment_overrides_toml(tmp_path):
    path = tmp_path / "ecom.toml"
    path.write_text(
        '[general]\nlog_level = "DEBUG"\n[catalog]\nport = 9002\ndatabase_url = "postgresql+asyncpg://u@h/cat"\n'
        '[actors]\nmailbox_size = 50\n[bus]\nbackend = "rabbitmq"\nurl = "amqp://guest:guest@127.0.0.1/"\n'
    )
    s = load_settings({"ECOM_CONFIG": str(path), "ECOM_CATALOG_PORT": "9012", "ECOM_ACTORS_IDLE_TIMEOUT": "2.5"})
    assert s.general.log_level == "DEBUG"
    assert s.services["catalog"].port == 9012
    assert s.database_url("catalog") == "postgresql+asyncpg://u@h/cat"
    assert s.actors.mailbox_size == 50 and s.actors.idle_timeout == 2.5
    assert s.bus.backend == "rabbitmq"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ECOM_GATEWAY_PORT": "eighty"}, "ECOM_GATEWAY_PORT: expected an integer, got 'eighty'"),
        ({"ECOM_GATEWAY_PORT": "70000"}, "ECOM_GATEWAY_PORT: expected a TCP port"),
        ({"ECOM_BUS": "kafka"}, "ECOM_BUS: expected one of memory, rabbitmq, azure"),
        ({"ECOM_LOG_LEVEL": "loud"}, "ECOM_LOG_LEVEL: expected one of"),
        ({"ECOM_ACTORS_MAILBOX_SIZE": "0"}, "ECOM_ACTORS_MAILBOX_SIZE: expected at least 1"),
        ({"ECOM_ADMIN_OPEN": "perhaps"}, "ECOM_ADMIN_OPEN: expected true or false"),
        ({"ECOM_CART_PORT": "8002"}, "ECOM_CART_PORT: port 8002 is already used by catalog"),
        ({"ECOM_CONFIG": "/no/such/file.toml"}, "ECOM_CONFIG: file not found"),
    ],
)
def test_bad_values_name_the_setting(env, message):
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_bad_toml_value_and_unknown_keys_are_named(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[order]\nport = 'x'\n")
    with pytest.raises(ConfigError, match=r"^\[order\] port: expected an integer"):
        load_settings({"ECOM_CONFIG": str(path)})
    path.write_text("[order]\nprot = 1\n")
    with pytest.raises(ConfigError, match=r"^\[order\] prot: unknown setting"):
        load_settings({"ECOM_CONFIG": str(path)})


def test_cli_stops_with_one_line_on_a_bad_setting():
    proc = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "run"],
        env={"ECOM_CATALOG_PORT": "abc", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "ecom: configuration error: ECOM_CATALOG_PORT: expected an integer, got 'abc'"


def test_unknown_variables_are_named_with_the_closest_valid_one():
    with pytest.raises(ConfigError) as info:
        load_settings({"ECOM_CATLOG_PORT": "9002"})
    assert str(info.value) == "ECOM_CATLOG_PORT: unknown setting; did you mean ECOM_CATALOG_PORT?"
    with pytest.raises(
        ConfigError, match=r"^ECOM_GATEWAY_RATELIMIT: unknown setting; did you mean ECOM_GATEWAY_RATE_LIMIT\?"
    ):
        load_settings({"ECOM_GATEWAY_RATELIMIT": "5"})
    with pytest.raises(ConfigError, match=r"^ECOM_WHATEVER: unknown setting; see the settings table"):
        load_settings({"ECOM_WHATEVER": "1"})


def test_every_setting_and_the_directly_read_variables_are_known():
    from config.settings import SECTIONS, env_name, setting_variables

    names = setting_variables()
    assert {
        "ECOM_CATALOG_PORT",
        "ECOM_BUS",
        "ECOM_BUS_URL",
        "ECOM_LOG_LEVEL",
        "ECOM_GATEWAY_REDIS_URL",
        "ECOM_CLUSTER_ADVERTISE_URL",
        "ECOM_AUTH_REGISTRATIONS_PER_EMAIL",
    } <= names
    assert len(names) == sum(len(dataclasses.fields(cls)) for cls in SECTIONS.values())
    env = dict.fromkeys(("ECOM_CONFIG", "ECOM_IDENTITY_KEK_FILE", "ECOM_CHAOS", "ECOM_TEST_PG_HOST", "ECOM_TEST_X"), "")
    env["ECOM_CONFIG"] = ""  # empty: no file
    load_settings(env)  # none of them is refused
    assert env_name("general", "log_level") == "ECOM_LOG_LEVEL"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgres://u:pw@h/db", "ECOM_CART_DATABASE_URL: unsupported database 'postgres'"),
        ("postgresql://u@h/db", "ECOM_CART_DATABASE_URL: postgresql needs the async driver"),
        ("mysql+aiomysql://u@h/db", "ECOM_CART_DATABASE_URL: unsupported database 'mysql'"),
        ("cart.db", "ECOM_CART_DATABASE_URL: not a database URL"),
    ],
)
def test_bad_database_urls_are_refused_with_the_settings(url, message):
    with pytest.raises(ConfigError) as info:
        load_settings({"ECOM_CART_DATABASE_URL": url})
    assert str(info.value).startswith(message)
    assert "pw" not in str(info.value)


def test_good_database_urls_pass():
    for url in (
        "sqlite+aiosqlite:///var/cart.db",
        "postgresql+asyncpg://u:pw@127.0.0.1:5432/cart",
        "mssql+aioodbc://u:pw@sql.example/cart?driver=ODBC+Driver+18+for+SQL+Server",
    ):
        assert load_settings({"ECOM_CART_DATABASE_URL": url}).database_url("cart") == url
