"""The OpenAPI documents are true: every service's own document and the gateway's merged one, checked by
schemathesis against the running apps over real HTTP (aiohttp test servers, SQLite, the in-memory bus).

For every operation, requests generated from the document (positive data: what the document allows) are sent
with an admin token and without one, and each answer must be

* documented: its status (``status_code_conformance``) and its media type (``content_type_conformance``,
  problem+json included) are in the document, and its body matches the documented schema
  (``response_schema_conformance``), as do the headers it documents (``response_headers_conformance``);
* never a server error (``not_a_server_error``);
* an acceptance (``positive_data_acceptance``: 2xx, 3xx, 401, 403, 404, 409, 429, 5xx): a request the document
  allows is not refused as malformed. The one exception is :data:`SEMANTIC`: a 422 naming a field whose rule no
  static document can state (it must name an entity that exists, or agree with another field or with stored
  state); any other 422 or 400 fails.

Bounded: :data:`EXAMPLES` examples per operation, derandomized (a failure reproduces), no shrinking.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from config import load_settings
from gateway.options import GatewayOptions
from gateway.routes import ROUTES
from gateway.service import create_app as create_gateway
from runtime.routes import services_of
from tests.test_openapi import SERVICES, _doc, bus, make_service  # noqa: F401  (fixtures)

EXAMPLES = 25
BUDGET = 100.0  # seconds for every document together; CI's budget is 2 minutes

# (method, path) -> the fields a positive request may still be refused for with 422, and why the document cannot
# rule them out. The gateway's merged document lists the same operations.
BRAND_TYPE = {"brand", "type"}
SEMANTIC: dict[tuple[str, str], tuple[set[str], str]] = {
    ("GET", "/api/catalog/products"): (BRAND_TYPE, "brand/type filters must name an existing brand/type"),
    ("POST", "/api/catalog/products"): (
        BRAND_TYPE | {"available_stock"},
        "brand/type must exist; available_stock must not exceed max_stock",
    ),
    ("PATCH", "/api/catalog/products/{id}"): (
        BRAND_TYPE | {"available_stock", "max_stock"},
        "brand/type must exist; stock must agree with the stored max_stock",
    ),
    ("POST", "/api/identity/users"): (
        {"email", "password", "name"},
        "the email must be a real address in one script, the password hard to guess (zxcvbn), the name not the "
        "password's context",
    ),
    ("PUT", "/api/identity/users/me/password"): (
        {"current_password", "new_password"},
        "current_password must be the account's; new_password hard to guess",
    ),
}
# The OAuth/OIDC protocol endpoints answer 400 (RFC 6749 / OIDC errors) for a well-formed request with unknown
# clients, codes or tokens: credentials, not shape.
PROTOCOL = {
    ("GET", "/connect/authorize"),
    ("POST", "/connect/authorize"),
    ("POST", "/connect/token"),
    ("POST", "/connect/revocation"),
    ("POST", "/connect/introspect"),
    ("GET", "/connect/endsession"),
}


def _semantic_refusal(case: Any, response: Any) -> bool:
    """A 422 (or a protocol endpoint's 400) that :data:`SEMANTIC` / :data:`PROTOCOL` explains."""
    key = (case.method.upper(), case.operation.path)
    if key in PROTOCOL and response.status_code == 400:
        return True
    if response.status_code != 422 or key not in SEMANTIC:
        return False
    allowed, _ = SEMANTIC[key]
    named = {e.get("field") for e in response.json().get("errors", [])}
    return bool(named) and named <= allowed


def _accepted(ctx: Any, response: Any, case: Any) -> bool | None:
    """``positive_data_acceptance``, except for the refusals :func:`_semantic_refusal` explains."""
    if _semantic_refusal(case, response):
        return None
    return positive_data_acceptance(ctx, response, case)


def _media_type(ctx: Any, response: Any, case: Any) -> bool | None:
    """``content_type_conformance`` for answers with content: a 204 or 304 has none (RFC 9110), so no type."""
    if response.status_code in (204, 304):
        return None
    return content_type_conformance(ctx, response, case)


CHECKS: list[Callable[..., Any]] = [
    not_a_server_error,
    status_code_conformance,
    response_schema_conformance,
    response_headers_conformance,
]


def _run(doc: dict[str, Any], base_url: str, headers: dict[str, str], deadline: float) -> list[str]:
    """Every operation of ``doc`` against ``base_url``: the failures, one line each (empty: conformant)."""
    schema = schemathesis.openapi.from_dict(doc)
    failures: list[str] = []
    checks = [*CHECKS, schemathesis.check(_media_type), schemathesis.check(_accepted)]
    for result in schema.get_all_operations():
        operation = result.ok()
        if time.monotonic() > deadline:
            failures.append(f"{operation.label}: not checked, over the time budget")
            continue

        @given(operation.as_strategy(schemathesis.GenerationMode.POSITIVE))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def check(case: Any) -> None:
            case.call_and_validate(base_url=base_url, headers=headers, checks=checks, timeout=10)

        try:
            check()
        except (Exception, BaseExceptionGroup) as exc:
            failures.append(f"{operation.label}: {str(exc)[:1500]}")
    return failures


def _dangling_refs(doc: dict[str, Any]) -> list[str]:
    refs: list[str] = []
    stack: list[Any] = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                refs.append(ref)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    defined = {f"#/definitions/{name}" for name in doc.get("definitions", {})}
    return sorted(set(refs) - defined)


@pytest.fixture
async def apps(make_service: Any, aiohttp_client: Any, test_identity: Any) -> dict[str, Any]:  # noqa: F811
    services = {name: await make_service(name) for name in SERVICES if name != "cart"}
    # the cart asks the real catalog (quotes) and order service (admission), as in production
    url = {name: str(client.make_url("")).rstrip("/") for name, client in services.items()}
    services["cart"] = await make_service("cart", catalog_url=url["catalog"], order_url=url["order"])
    upstreams = {name: str(client.make_url("")).rstrip("/") for name, client in services.items()}
    gateway = await aiohttp_client(
        create_gateway(
            load_settings({"ECOM_GATEWAY_RATE_LIMIT": "0"}),
            verifier=test_identity.verifier(),
            upstreams={name: upstreams[name] for name in services_of(ROUTES)},
            options=GatewayOptions(),
        )
    )
    return {**services, "gateway": gateway}


async def test_every_document_is_true(apps: dict[str, Any], test_identity: Any) -> None:
    admin = test_identity.headers(test_identity.admin_token())
    deadline = time.monotonic() + BUDGET
    failures: list[str] = []
    for name, client in apps.items():
        doc = await _doc(client)
        assert doc["paths"], name
        # schemathesis leaves out what a dangling reference names (a request body, say): every one must resolve
        assert _dangling_refs(doc) == [], name
        base_url = str(client.make_url("")).rstrip("/")
        for headers in (admin, {}):
            found = await asyncio.to_thread(_run, doc, base_url, headers, deadline)
            who = "admin" if headers else "anonymous"
            failures += [f"[{name}, {who}] {line}" for line in found]
    assert not failures, "\n\n".join(failures)
