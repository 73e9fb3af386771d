"""The pieces of the shared service host (:mod:`runtime.host` assembles them into an application).

- :mod:`runtime.web.responses`: JSON and problem+json responses, request-body parsing with its guards,
- :mod:`runtime.web.resources`: :class:`ServiceRuntime` and the cleanup contexts that start and stop it,
- :mod:`runtime.web.middlewares`: request id, errors as problems, authorize-first, schema validation,
- :mod:`runtime.web.metrics`: the Prometheus registry, request metrics and runtime gauges, ``/metrics``,
- :mod:`runtime.web.health`: ``/health/live`` and ``/health/ready``,
- :mod:`runtime.web.admin`: the admin actor endpoints.
"""
