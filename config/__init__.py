"""Settings for every EcomGateway process (see :mod:`config.settings`)."""

from config.settings import (
    DEFAULT_PORTS,
    SERVICES,
    ActorSettings,
    AuthSettings,
    BusSettings,
    ClusterSettings,
    ConfigError,
    GatewaySettings,
    GeneralSettings,
    ServiceSettings,
    Settings,
    ShopSettings,
    StartupError,
    load_settings,
)

__all__ = [
    "DEFAULT_PORTS",
    "SERVICES",
    "ActorSettings",
    "AuthSettings",
    "BusSettings",
    "ClusterSettings",
    "ConfigError",
    "GatewaySettings",
    "GeneralSettings",
    "ServiceSettings",
    "Settings",
    "ShopSettings",
    "StartupError",
    "load_settings",
]
