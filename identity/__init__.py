"""Identity service: users, clients, signing keys, OAuth 2.0 / OpenID Connect endpoints.

- :mod:`identity.keys`, :mod:`identity.tokens`, :mod:`identity.passwords`: signing keys and rotation rules,
  access/ID/refresh tokens, argon2id and the password policy (pure logic).
- :mod:`identity.repository`: tables and queries (users, clients, signing keys, refresh tokens, codes).
- :mod:`identity.keystore`: the key ring kept in step with the database (rotation, revocation, pruning).
- :mod:`identity.accounts`: email normalisation, roles, registration (API, CLI and seed share it).
- :mod:`identity.messages`, :mod:`identity.actor`: the login throttle, one actor per email (lock-out, back-off).
- :mod:`identity.oauth`: the protocol — client authentication, scopes, PKCE, grants, revocation, introspection.
- :mod:`identity.pages`: the sign-in page and its CSRF protection.
- :mod:`identity.core`, :mod:`identity.api`, :mod:`identity.service`, :mod:`identity.seed`: composition, routes,
  the service declaration and app factory, the first-run seed.
- :mod:`identity.cli`: ``ecom users``, ``ecom keys``, ``ecom clients``.
"""
