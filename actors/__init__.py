"""The actor-based services: catalog, cart and order, each in the same shape (messages, actor, repository, api, service)."""
