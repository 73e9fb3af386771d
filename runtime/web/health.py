"""``/health/live`` (the process runs) and ``/health/ready`` (every ready check answers within 2 s)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from runtime.web.resources import AppKeyRuntime
from runtime.web.responses import json_response

__all__ = ["live", "ready"]


async def live(_request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    runtime = request.app[AppKeyRuntime]
    results: dict[str, str] = {}

    async def check(name: str, fn: Callable[[], Awaitable[None]]) -> None:
        try:
            async with asyncio.timeout(2.0):
                await fn()
            results[name] = "ok"
        except Exception as exc:  # noqa: BLE001 any failure of a check is reported as failing, by type
            results[name] = f"failing: {type(exc).__name__}"

    await asyncio.gather(*(check(n, f) for n, f in runtime.ready_checks.items()))
    ok = all(v == "ok" for v in results.values())
    body: dict[str, Any] = {"status": "ok" if ok else "unavailable", "checks": results}
    if runtime.cluster is not None:
        # The gateway reads the live membership from here, to compute the same owners as the instances.
        body["cluster"] = {"self": runtime.cluster.address, "members": list(runtime.cluster.addresses)}
    return json_response(body, status=200 if ok else 503)
