"""Settings from defaults, a TOML file and ECOM_* variables; bad values name the setting."""

from __future__ import annotations

import subprocess
import sys

import pytest

from config import ConfigError, load_settings


def test_defaults_are_the_embedded_setup():
    s = load_settings({})
    assert s.bus.backend == "memory"
    assert [s.services[n].port for n in ("gateway", "identity", "catalog", "cart", "order")] == [8000, 8001, 8002, 8003, 8004]
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
