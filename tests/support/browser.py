"""A real browser for tests of pages: Debian's headless Chromium (``/usr/bin/chromium``) driven by Playwright.

Never a browser that Playwright downloads (no ``playwright install``): the browser is the distribution's package,
which ``.ci/run`` installs with apt-get when it is missing. :func:`require_chromium` skips a test without it (the
reason says what to install), except with ``CI=true``, where the test fails: CI must run the browser tests.

:func:`chromium` starts the browser with a fresh profile (its own user-data directory: no cookies, cache or
settings from another run) and no network of its own (no component updates, sync, background requests or
QUIC), and hands out a browser context; pages opened in it reach only the URLs the test visits.
Screenshots and other artifacts go under ``var/test-artifacts/`` (git-ignored): :func:`artifact_path`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.async_api import BrowserContext

CHROMIUM = Path(os.environ.get("ECOM_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",  # tests run as root in CI, where Chromium's sandbox cannot start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
ARTIFACTS = Path(__file__).resolve().parents[2] / "var" / "test-artifacts"
LAUNCH_TIMEOUT_MS = 60_000  # a loaded two-core machine starts Chromium slowly


def require_chromium() -> None:
    """Skip (fail under CI=true) unless Chromium and the Playwright package are installed."""
    reason = None
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        reason = f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)"
    else:
        try:
            import playwright.async_api  # noqa: F401 - only whether it imports
        except ImportError:
            reason = "the playwright package is not installed (pip install -e '.[test]')"
    if reason is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: browser tests must run)")
    pytest.skip(reason)


def artifact_path(name: str) -> Path:
    """Where a test keeps a file for people to look at after the run (a screenshot): var/test-artifacts/<name>."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS / name


@asynccontextmanager
async def chromium(*, timeout_ms: float = 15_000) -> AsyncIterator[BrowserContext]:
    """Headless Chromium with a fresh profile; yields its browser context (``await context.new_page()``).

    ``timeout_ms`` is the default for every page action and navigation. The profile directory is removed on exit.
    """
    require_chromium()
    from playwright.async_api import async_playwright

    with tempfile.TemporaryDirectory(prefix="ecom-chromium-") as profile:
        async with async_playwright() as pw:
            context = await pw.chromium.launch_persistent_context(
                profile,
                executable_path=str(CHROMIUM),
                headless=True,
                args=list(CHROMIUM_ARGS),
                timeout=LAUNCH_TIMEOUT_MS,
                viewport={"width": 1000, "height": 800},
            )
            context.set_default_timeout(timeout_ms)
            context.set_default_navigation_timeout(timeout_ms)
            try:
                yield context
            finally:
                await context.close()
