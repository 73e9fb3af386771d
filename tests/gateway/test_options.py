"""Gateway options from ECOM_GATEWAY_* variables, and upstream lists from ECOM_<SERVICE>_UPSTREAMS."""

from __future__ import annotations

import pytest

from config import ConfigError, load_settings
from gateway.options import GatewayOptions, load_options
from gateway.routes import ROUTES
from gateway.upstreams import Upstreams, parse_upstreams
from runtime.routes import services_of


def test_defaults_and_environment():
    assert load_options({}) == GatewayOptions()
    opts = load_options(
        {
            "ECOM_GATEWAY_RATE_LIMIT": "20",
            "ECOM_GATEWAY_REDIS_URL": "redis://127.0.0.1:6379/0",
            "ECOM_GATEWAY_CORS_ORIGINS": "https://shop.example, https://m.shop.example/",
            "ECOM_GATEWAY_ACCESS_LOG": "false",
            "ECOM_GATEWAY_PORT": "9000",
        }
    )
    assert opts.rate_limit == 20.0 and opts.redis_url.startswith("redis://") and opts.access_log is False
    assert opts.origins == {"https://shop.example", "https://m.shop.example"}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ECOM_GATEWAY_RATE_LIMIT": "lots"}, "ECOM_GATEWAY_RATE_LIMIT: expected a number"),
        ({"ECOM_GATEWAY_TIMEOUT": "0"}, "ECOM_GATEWAY_TIMEOUT: expected a positive number"),
        ({"ECOM_GATEWAY_BUFFER_LIMIT": "9999999999"}, "ECOM_GATEWAY_BUFFER_LIMIT: expected 0 to max_body"),
        ({"ECOM_GATEWAY_REDIS_URL": "http://x"}, "ECOM_GATEWAY_REDIS_URL: expected a redis:// URL"),
    ],
)
def test_bad_values_name_the_variable(env, message):
    with pytest.raises(ConfigError, match=message):
        load_options(env)


def test_upstreams_from_settings():
    settings = load_settings(
        {"ECOM_CATALOG_UPSTREAMS": "http://127.0.0.1:8002, http://127.0.0.1:8012/", "ECOM_ORDER_PORT": "9004"}
    )
    ups = Upstreams.from_settings(settings, services_of(ROUTES), GatewayOptions())
    assert [i.url for i in ups.services["catalog"].instances] == ["http://127.0.0.1:8002", "http://127.0.0.1:8012"]
    assert [i.url for i in ups.services["order"].instances] == ["http://127.0.0.1:9004"]  # empty: its own port
    assert set(ups.services) == {"identity", "catalog", "cart", "order"}


@pytest.mark.parametrize("raw", ["https://127.0.0.1:8002", "127.0.0.1:8002", "http://127.0.0.1:8002/api", "ftp://x"])
def test_bad_upstream_urls_name_the_setting(raw):
    with pytest.raises(ConfigError, match="ECOM_CATALOG_UPSTREAMS"):
        parse_upstreams("catalog", raw)
