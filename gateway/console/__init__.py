"""The admin console: a web page served by the gateway at ``/admin``, for the admin role.

A static page (``console.html``, ``console.js``, ``console.css``: no build step) over the admin JSON API. It
signs in with the shop's own authorization-code + PKCE flow as the first-party public client ``admin-console``
(seeded by identity; redirect URI ``<public URL>/admin/callback``), keeps the access token in the tab's
``sessionStorage`` (no refresh token: the session ends with the token) and calls, with it:

- ``GET /admin/api/cluster`` (here): every service's instances, their readiness and cluster members;
- ``GET /admin/api/actors`` (here): every instance's live actors per type (mailbox depth, handled count, last
  activity, owner), asked of each instance since each process holds its own;
- per service, through the gateway's routes, the admin endpoints every service has: ``actors/{type}/{id}``
  (state and version, from the process that owns the actor), ``pending`` (due reminders, outbox
  backlog), ``dead-letters`` (view, replay, discard: each change written to the service's audit log),
  ``audit`` (recent entries), ``traces`` (recent spans of an order, when tracing keeps them).

The page itself is public (it holds no data); the JSON APIs are the authority: each one requires the admin
role and the ``ecom`` scope, checked by the gateway's route policy and again by the service. A signed-in user
without the role sees "admin role required". The page runs no inline script and renders every value as text
(actor state holds user data), under a Content-Security-Policy that allows only this origin's script, style
and fetches.
"""

from gateway.console.handlers import PATH, add_console_routes

__all__ = ["PATH", "add_console_routes"]
