"""The Azure Service Bus backend's parts; ``bus.azure`` is the module to import (``runtime.cli`` does).

- ``connection``: a connection string, or a namespace and an Azure identity, from the settings;
- ``messages``: envelopes as Service Bus messages and back, entity names;
- ``management``: queues, the topic, subscriptions and rules (auto-provisioning, ``ecom bus provision``);
- ``sending``: one serialised, batching outbox per entity;
- ``receiving``: session processors (a receiver per session, lock renewal, settlement);
- ``broadcast``: per-process subscriptions;
- ``azurebus``: ``AzureBus``, which ties them together.
"""
