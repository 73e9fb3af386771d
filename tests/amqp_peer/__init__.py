"""A small AMQP 1.0 peer that plays an Azure Service Bus namespace for tests.

The real, unmodified ``azure-servicebus`` SDK connects to it with a connection string ending in
``UseDevelopmentEmulator=true`` (plain TCP on the given port). It is a test double only: never shipped
as a broker and never used by ``ecom run``. See ``broker.py`` for what Service Bus behaviour it models,
``amqp.py`` for the protocol side and ``atom.py`` for the HTTPS management (ATOM) endpoint.
"""

from tests.amqp_peer.broker import Broker, BrokerError, Rule
from tests.amqp_peer.server import AmqpPeer

__all__ = ["AmqpPeer", "Broker", "BrokerError", "Rule"]
