"""Gateway options: the shared ``[gateway]`` settings (:class:`config.settings.GatewaySettings`).

Each field has one environment variable ``ECOM_GATEWAY_<FIELD>`` (``ECOM_GATEWAY_RATE_LIMIT=50``) and one
TOML key under ``[gateway]``, like every other setting.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from config import ConfigError, Settings, load_settings
from config.settings import GatewaySettings

GatewayOptions = GatewaySettings  # the name the gateway modules use for their options


def load_options(env: Mapping[str, str] | None = None, **overrides: Any) -> GatewayOptions:
    """Options from the environment (``ECOM_GATEWAY_*``), then ``overrides``; :class:`ConfigError` names a bad one."""
    options = gateway_options(load_settings(env))
    if overrides:
        options = dataclasses.replace(options, **overrides)
        try:
            options.validate()
        except ValueError as exc:
            raise ConfigError(f"gateway option {getattr(exc, 'field', '?')}: {exc}") from None
    return options


def gateway_options(settings: Settings) -> GatewayOptions:
    """The ``[gateway]`` section; ``load_settings`` always builds it as :class:`GatewaySettings`."""
    options = settings.services["gateway"]
    if not isinstance(options, GatewaySettings):
        raise TypeError(f"settings.services['gateway'] must be GatewaySettings, not {type(options).__name__}")
    return options
