"""Connection and authentication: a connection string, or a namespace with an Azure identity."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from config import Settings

log = logging.getLogger(__name__)


def _config_error(message: str) -> Exception:
    from config import ConfigError

    return ConfigError(message)


def _credential_from_namespace() -> Any:
    try:
        from azure.identity.aio import DefaultAzureCredential
    except ImportError:
        raise _config_error(
            "ECOM_BUS_NAMESPACE needs the azure-identity package (pip install azure-identity); "
            "or set ECOM_BUS_URL to a Service Bus connection string instead"
        ) from None
    return DefaultAzureCredential()


def _namespace_host(namespace: str) -> str:
    host = namespace.strip()
    for prefix in ("sb://", "amqps://", "https://"):
        host = host.removeprefix(prefix)
    return host.strip("/")


def _connection_args(settings: Settings) -> dict[str, Any]:
    bus = settings.bus
    if bus.url:
        if "endpoint=" not in bus.url.lower():
            raise _config_error(
                "ECOM_BUS_URL: for the azure backend this is a Service Bus connection string "
                "(Endpoint=sb://<namespace>.servicebus.windows.net/;SharedAccessKeyName=...;SharedAccessKey=...)"
            )
        return {"connection_string": bus.url}
    if bus.namespace:
        return {"namespace": _namespace_host(bus.namespace), "credential": _credential_from_namespace()}
    raise _config_error(
        "ECOM_BUS_URL or ECOM_BUS_NAMESPACE must be set for the azure backend "
        "(a connection string, or the fully qualified namespace used with an Azure identity)"
    )
