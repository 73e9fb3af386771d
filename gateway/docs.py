"""One OpenAPI document for the whole API, merged from the services' own documents.

Each routed service's ``/api/docs/swagger.json`` is fetched from one of its instances (available ones first);
its operations that the gateway routes to that service are kept (the host's ``/health`` and ``/metrics``, and
``/api/order/internal``, are not public through the gateway: no rule of :data:`gateway.routes.ROUTES` matches
them), schema definitions are merged (a name two services define
differently is renamed ``<Service><Name>`` in the second one, references included) and tags are joined. A GET's
HEAD twin (aiohttp routes HEAD for every GET) is not listed. Each operation also documents what the gateway
itself may answer (:func:`gateway_answers`): 429 (rate limits), 401/403 where it checks a token, 413 for a body
over its limit, and 502/503/504 when the service cannot be reached in time.

The result is cached for ``ttl`` seconds (concurrent requests share one refresh). A service that cannot be
reached is left out, named in ``info.description`` and in ``x-services``, and the document is refreshed sooner
so the service appears once it is back.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
import orjson

from gateway.upstreams import Upstreams
from runtime.routes import Kind, Route, services_of

log = logging.getLogger(__name__)

SPEC_PATH = "/api/docs/swagger.json"
_INCOMPLETE_TTL = 5.0  # seconds: retry missing services soon


class DocsMerger:
    def __init__(
        self,
        routes: Sequence[Route],
        upstreams: Upstreams,
        *,
        ttl: float = 60.0,
        timeout: float = 3.0,
        title: str = "EcomGateway API",
    ) -> None:
        self.routes = routes
        self.upstreams = upstreams
        self.ttl = ttl
        self.timeout = timeout
        self.title = title
        self._doc: dict[str, Any] | None = None
        self._expires = 0.0
        self._refresh: asyncio.Task[dict[str, Any]] | None = None

    async def document(self) -> dict[str, Any]:
        if self._doc is not None and time.monotonic() < self._expires:
            return self._doc
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.get_running_loop().create_task(self._build())
        return await asyncio.shield(self._refresh)

    async def _build(self) -> dict[str, Any]:
        names = services_of(self.routes)
        fetched = await asyncio.gather(*(self._fetch(name) for name in names))
        doc = merge(self.title, self.routes, list(zip(names, fetched, strict=True)))
        complete = all(isinstance(f, dict) for f in fetched)
        self._doc = doc
        self._expires = time.monotonic() + (self.ttl if complete else min(self.ttl, _INCOMPLETE_TTL))
        return doc

    async def _fetch(self, name: str) -> dict[str, Any] | str:
        """The service's document, or why it could not be had."""
        service = self.upstreams.services[name]
        now = asyncio.get_running_loop().time()
        instances = sorted(service.instances, key=lambda i: not i.available(now))
        reason = "no instance"
        session = self.upstreams.session
        assert session is not None, "the upstreams are not started"
        for inst in instances:
            try:
                async with session.get(inst.url + SPEC_PATH, timeout=aiohttp.ClientTimeout(total=self.timeout)) as resp:
                    if resp.status != 200:
                        reason = f"answered {resp.status}"
                        continue
                    doc = orjson.loads(await resp.read())
            except (aiohttp.ClientError, OSError, TimeoutError, orjson.JSONDecodeError) as exc:
                reason = type(exc).__name__
                continue
            if isinstance(doc, dict):
                return doc
            reason = "not a JSON object"
        log.warning("API docs: %s left out (%s)", name, reason)
        return reason


def _version(doc: dict[str, Any]) -> str:
    return "openapi3" if "openapi" in doc else "swagger2"


def _schemas(doc: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The named schemas of a document and the prefix of references to them."""
    if _version(doc) == "openapi3":
        return doc.get("components", {}).get("schemas", {}), "#/components/schemas/"
    return doc.get("definitions", {}), "#/definitions/"


def _rewrite_refs(node: Any, old_to_new: dict[str, str]) -> Any:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out[k] = old_to_new.get(v, v) if k == "$ref" and isinstance(v, str) else _rewrite_refs(v, old_to_new)
        return out
    if isinstance(node, list):
        return [_rewrite_refs(v, old_to_new) for v in node]
    return node


def _without_head_twin(item: Any) -> Any:
    """A path item without the ``head`` operation that only repeats its ``get`` (aiohttp adds a HEAD route for
    every GET; a service that still documents it must not make the merged document list each GET twice)."""
    if isinstance(item, dict) and "get" in item and "head" in item:
        return {method: op for method, op in item.items() if method != "head"}
    return item


_PROBLEM_JSON = "application/problem+json"
_RETRY_AFTER = {"Retry-After": {"type": "integer", "description": "seconds to wait before retrying"}}
_GATEWAY_ANSWERS: dict[str, dict[str, Any]] = {
    "401": {"description": "the gateway refused the bearer token (missing, invalid or expired)"},
    "403": {"description": "the token lacks a role or scope this route needs"},
    "413": {"description": "the body is over the gateway's limit"},
    "429": {"description": "too many requests from this client; retry after Retry-After", "headers": _RETRY_AFTER},
    "502": {"description": "the service answered badly"},
    "503": {"description": "no instance of the service is available; retry after Retry-After", "headers": _RETRY_AFTER},
    "504": {"description": "the service did not answer in time"},
}
# The services' problem schema (runtime.web.endpoints.ProblemSchema), for a document whose services define none.
_PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
    },
}
_METHODS = ("get", "put", "post", "delete", "options", "head", "patch")


def _routed(routes: Sequence[Route], service: str, path: str, method: str) -> Kind | None:
    """The access kind of the gateway rule that routes ``method path`` to ``service``, or None: not routed."""
    for route in routes:
        if route.service != service or not (path == route.prefix or path.startswith(route.prefix + "/")):
            continue
        # a path template's {param} stands for one segment, as the rules' [^/]+ groups
        found = route.resolve(method.upper(), path[len(route.prefix) :].replace("{", "x").replace("}", ""))
        if found is not None:
            return found[0].access.kind
    return None


def gateway_answers(operation: dict[str, Any], kind: Kind, problem_ref: str) -> dict[str, Any]:
    """``operation`` with the gateway's own answers added (the service's own descriptions win)."""
    out = dict(operation)
    responses = dict(out.get("responses") or {})
    codes = ["429", "502", "503", "504"]
    if kind is not Kind.PUBLIC:
        codes += ["401", "403"] if kind is Kind.TOKEN else ["401"]  # OPTIONAL: a token sent is checked
    if any(p.get("in") in ("body", "formData") for p in out.get("parameters", []) if isinstance(p, dict)):
        codes.append("413")
    for code in codes:
        responses.setdefault(code, {**_GATEWAY_ANSWERS[code], "schema": {"$ref": problem_ref}})
    out["responses"] = responses
    produces = list(out.get("produces") or [])
    if produces and _PROBLEM_JSON not in produces:
        out["produces"] = [*produces, _PROBLEM_JSON]
    return out


def merge(title: str, routes: Sequence[Route], docs: Sequence[tuple[str, dict[str, Any] | str]]) -> dict[str, Any]:
    """Merge ``(service, document or reason)`` pairs into one document (the first document's version)."""
    first = next((d for _, d in docs if isinstance(d, dict)), {"swagger": "2.0"})
    version = _version(first)
    out: dict[str, Any] = {"info": {"title": title, "version": "v1"}, "paths": {}, "tags": []}
    if version == "openapi3":
        out["openapi"] = first.get("openapi", "3.0.2")
        out["components"] = {"schemas": {}}
        schemas, ref_prefix = out["components"]["schemas"], "#/components/schemas/"
    else:
        out["swagger"] = "2.0"
        out["definitions"] = {}
        out["securityDefinitions"] = {
            "bearer": {
                "type": "apiKey",
                "in": "header",
                "name": "Authorization",
                "description": "Bearer <access token>",
            }
        }
        schemas, ref_prefix = out["definitions"], "#/definitions/"
    status: dict[str, str] = {}
    tag_names: set[str | None] = set()
    for service, doc in docs:
        if not isinstance(doc, dict):
            status[service] = f"unavailable: {doc}"
            continue
        if _version(doc) != version:
            status[service] = f"left out: its document is {_version(doc)}, the merged one {version}"
            continue
        status[service] = "ok"
        own, _ = _schemas(doc)
        renames = {
            ref_prefix + name: ref_prefix + service.capitalize() + name
            for name, schema in own.items()
            if name in schemas and schemas[name] != schema
        }
        if renames:
            doc = _rewrite_refs(doc, renames)
            own, _ = _schemas(doc)
        for name, schema in own.items():
            renamed = renames.get(ref_prefix + name, ref_prefix + name)[len(ref_prefix) :]
            schemas.setdefault(renamed, copy.deepcopy(schema))
        for path, item in doc.get("paths", {}).items():
            if path in out["paths"] or not isinstance(item, dict):
                continue
            kept: dict[str, Any] = {}
            for method, operation in _without_head_twin(item).items():
                if method not in _METHODS:
                    kept[method] = operation  # path-level parameters
                    continue
                kind = _routed(routes, service, path, method)
                if kind is not None and isinstance(operation, dict):
                    kept[method] = gateway_answers(operation, kind, ref_prefix + "Problem")
            if any(m in _METHODS for m in kept):
                out["paths"][path] = kept
        for tag in doc.get("tags", []):
            if isinstance(tag, dict) and tag.get("name") not in tag_names:
                tag_names.add(tag.get("name"))
                out["tags"].append(tag)
    schemas.setdefault("Problem", _PROBLEM_SCHEMA)
    missing = sorted(s for s, v in status.items() if v != "ok")
    description = "The public API of EcomGateway, through the gateway."
    if missing:
        description += " Not included right now (service unavailable): " + ", ".join(missing) + "."
    out["info"]["description"] = description
    out["x-services"] = status
    return out
