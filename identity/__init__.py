"""Identity service: users, clients, signing keys, OAuth2/OIDC endpoints.

Phase 1 (no HTTP host or database yet): :mod:`identity.keys` (signing keys and rotation rules),
:mod:`identity.passwords` (argon2id and the password policy), :mod:`identity.tokens` (access and refresh tokens).
"""
