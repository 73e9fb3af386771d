"""Errors that become RFC 9457 ``application/problem+json`` responses.

Raise a :class:`Problem` (or one of its subclasses) anywhere under a request handler, including inside an
actor turn: the host's error middleware turns it into a response with a stable ``type``, a ``title``, the
``status`` and an actionable ``detail``. Anything else that escapes is logged and answered as a generic 500
without a stack trace.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

PROBLEM_BASE = "https://ecomgateway.dev/problems/"


class Problem(Exception):
    """An error a client can act on. ``slug`` names the stable problem type."""

    status: int = 400
    slug: str = "bad-request"
    title: str = "Bad request"

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        slug: str | None = None,
        title: str | None = None,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        if status is not None:
            self.status = status
        if slug is not None:
            self.slug = slug
        if title is not None:
            self.title = title
        self.headers: dict[str, str] = dict(headers or {})
        self.extra = extra

    @property
    def type(self) -> str:
        return PROBLEM_BASE + self.slug

    def to_dict(self, instance: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"type": self.type, "title": self.title, "status": self.status, "detail": self.detail}
        if instance:
            body["instance"] = instance
        body.update(self.extra)
        return body


class ValidationProblem(Problem):
    """Bad input. ``errors`` maps each offending field (dotted path) to what is wrong with it."""

    status = 422
    slug = "validation"
    title = "The request has invalid fields"

    def __init__(self, errors: Mapping[str, str | list[str]], detail: str | None = None) -> None:
        flat = {field: msg if isinstance(msg, str) else "; ".join(map(str, msg)) for field, msg in errors.items()}
        if detail is None:
            detail = "; ".join(f"{field}: {msg}" for field, msg in flat.items())
        super().__init__(detail, errors=[{"field": f, "message": m} for f, m in flat.items()])
        self.errors = flat

    @classmethod
    def field(cls, name: str, message: str) -> ValidationProblem:
        return cls({name: message})


class BadRequest(Problem):
    status = 400
    slug = "bad-request"
    title = "Bad request"


class Unauthorized(Problem):
    status = 401
    slug = "unauthorized"
    title = "Authentication required"


class Forbidden(Problem):
    status = 403
    slug = "forbidden"
    title = "Forbidden"


class NotFound(Problem):
    status = 404
    slug = "not-found"
    title = "Not found"


class Conflict(Problem):
    status = 409
    slug = "conflict"
    title = "Conflict"


class PayloadTooLarge(Problem):
    status = 413
    slug = "payload-too-large"
    title = "Request body too large"


class PreconditionFailed(Problem):
    status = 412
    slug = "precondition-failed"
    title = "Precondition failed"


class TooManyRequests(Problem):
    status = 429
    slug = "rate-limited"
    title = "Too many requests"

    def __init__(self, detail: str, retry_after: float, **extra: Any) -> None:
        super().__init__(detail, headers={"Retry-After": str(max(1, int(retry_after + 0.999)))}, **extra)


class ServiceUnavailable(Problem):
    """A dependency or the service itself cannot take the request now; the client may retry later."""

    status = 503
    slug = "unavailable"
    title = "Service unavailable"

    def __init__(self, detail: str, retry_after: float = 1.0, **extra: Any) -> None:
        super().__init__(detail, headers={"Retry-After": str(max(1, int(retry_after + 0.999)))}, **extra)


class GatewayTimeout(Problem):
    status = 504
    slug = "timeout"
    title = "Timed out"


class BadGateway(Problem):
    status = 502
    slug = "bad-gateway"
    title = "Bad gateway"


class IdempotencyKeyReused(Problem):
    """The same ``Idempotency-Key`` came with a different request: answering the first one's result
    would be wrong, doing it again would break the key's promise."""

    status = 422
    slug = "idempotency-key-reused"
    title = "The idempotency key was used for another request"
