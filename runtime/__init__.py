"""The shared runtime every EcomGateway service stands on: actors, persistence, host, auth, CLI."""
