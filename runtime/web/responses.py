"""JSON and problem+json responses, and reading a JSON request body with its guards."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import orjson
from aiohttp import web

from runtime.errors import BadRequest, Problem
from runtime.jsonutil import dumps, isoformat

__all__ = [
    "MAX_JSON_DEPTH",
    "PROBLEM_JSON",
    "dumps",
    "isoformat",
    "json_response",
    "parse_json_body",
    "problem_response",
    "read_json",
]

PROBLEM_JSON = "application/problem+json"
MAX_JSON_DEPTH = 32  # no request of this API nests deeper; a deeper body is refused before any parser recurses


def json_response(data: Any, *, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(body=dumps(data), status=status, headers=headers, content_type="application/json")


def problem_response(problem: Problem, request: web.Request | None = None) -> web.Response:
    headers = dict(problem.headers)
    return web.Response(
        body=dumps(problem.to_dict(instance=request.path if request is not None else None)),
        status=problem.status,
        headers=headers,
        content_type=PROBLEM_JSON,
    )


def parse_json_body(body: bytes) -> Any:
    """``body`` as JSON, or a 400 problem saying why not: invalid UTF-8, invalid JSON, or nested deeper than
    :data:`MAX_JSON_DEPTH` (orjson refuses past 1024 levels itself, without recursing in Python)."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        reason = "nested too deeply" if "recursion" in str(exc).lower() else f"not valid JSON: {exc}"
        raise BadRequest(f"the body is {reason}") from None
    if _depth_exceeds(value, MAX_JSON_DEPTH):
        raise BadRequest(f"the body is nested more than {MAX_JSON_DEPTH} levels deep")
    return value


def _depth_exceeds(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Iterable[Any] = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


async def read_json(request: web.Request) -> Any:
    """The request body as JSON, or a 400 problem saying why it is not."""
    body = await request.read()
    if not body:
        raise BadRequest("the request needs a JSON body")
    return parse_json_body(body)
