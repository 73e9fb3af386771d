"""Product pictures for the demo catalog: small SVG cards drawn from each product's name, brand and type.

Nothing is stored on disk and nothing is fetched: the card of a demo product is rendered, deterministically,
from ``data/catalog.json`` the first time it is asked for and then kept in memory (a few KB each). The same
product always gets the same bytes, so the ETag is stable across processes and restarts.

    GET /api/catalog/pictures/{slug}.svg     image/svg+xml, ETag, Cache-Control; 404 problem for any other name

A picture name is looked up in a dict of known slugs, never joined to a path: ``../`` and friends can only miss.
Catalogs seeded before pictures existed name ``/images/catalog/{slug}.webp``; :func:`current_url` maps those to
the served URL when the API shows a product.
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass
from functools import cache
from typing import Any
from xml.sax.saxutils import escape

PICTURES_PATH = "/api/catalog/pictures"
CONTENT_TYPE = "image/svg+xml"
CACHE_CONTROL = "public, max-age=86400"  # the bytes of a name never change within a release; the ETag revalidates
NAME_RE = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*\.svg")
_LEGACY_RE = re.compile(r"/images/catalog/([a-z0-9]+(?:-[a-z0-9]+)*)\.webp")

WIDTH, HEIGHT = 400, 300


def slug(name: str) -> str:
    """``"Cascade 800 Down Parka"`` -> ``"cascade-800-down-parka"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def url_for(name: str) -> str:
    """The URL the demo catalog names for the product called ``name``."""
    return f"{PICTURES_PATH}/{slug(name)}.svg"


@dataclass(frozen=True, slots=True)
class Picture:
    body: bytes
    etag: str  # strong, quoted


# ---------------------------------------------------------------------------------------------------
# Drawing


def _initials(name: str) -> str:
    words = [w for w in re.findall(r"[A-Za-z0-9]+", name) if w[0].isalpha()] or re.findall(r"[A-Za-z0-9]+", name)
    return "".join(w[0].upper() for w in words[:2]) or "?"


def _lines(text: str, width: int, max_lines: int = 2) -> list[str]:
    """Greedy word wrap; the last line ends in an ellipsis when the text does not fit."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if len(candidate) <= width or not current:
            current = candidate
            continue
        lines.append(current)
        current = word
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: width - 1].rstrip() + "…"
    return [line if len(line) <= width else line[: width - 1] + "…" for line in lines]


# A small emblem per product type, drawn in the top-right corner (paths in a 40x40 box).
_EMBLEMS: dict[str, str] = {
    "jackets": "M8 10 L16 6 L20 10 L24 6 L32 10 L36 20 L30 22 L30 36 L10 36 L10 22 L4 20 Z",
    "footwear": "M6 14 L16 14 L18 24 L34 28 Q36 34 32 34 L6 34 Z",
    "backpacks": "M12 10 Q20 2 28 10 L30 36 L10 36 Z M14 22 L26 22 L26 30 L14 30 Z",
    "tents": "M4 34 L20 6 L36 34 Z M20 20 L14 34 M20 20 L26 34",
    "sleeping bags": "M10 8 Q20 2 30 8 L30 36 L10 36 Z M12 12 Q20 8 28 12",
    "camp kitchen": "M8 16 L32 16 L30 34 L10 34 Z M6 16 L34 16 M20 6 L20 12",
    "navigation": "M20 4 L26 20 L20 36 L14 20 Z M20 4 L20 36",
    "climbing": "M14 6 Q4 20 14 34 L26 34 Q36 20 26 6 Z M18 12 L22 12 L22 28 L18 28 Z",
    "lighting": "M14 4 L26 4 L24 18 L20 20 L16 18 Z M18 20 L22 20 L22 36 L18 36 Z",
    "hydration": "M16 4 L24 4 L24 10 Q32 14 32 22 L32 36 L8 36 L8 22 Q8 14 16 10 Z",
}
_DEFAULT_EMBLEM = "M20 4 L36 20 L20 36 L4 20 Z"


def render(name: str, brand: str = "", kind: str = "") -> bytes:
    """A 400x300 SVG card: a gradient in a colour taken from the name, its initials, name, brand and type."""
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    hue = int.from_bytes(digest[:2], "big") % 360
    hue2 = (hue + 25 + digest[2] % 40) % 360
    sat = 55 + digest[3] % 20
    top, bottom = f"hsl({hue},{sat}%,52%)", f"hsl({hue2},{sat}%,32%)"
    title = _lines(name, 26)
    emblem = _EMBLEMS.get(kind.lower(), _DEFAULT_EMBLEM)
    text_y = 214 if len(title) == 1 else 196
    name_rows = "".join(
        f'<text x="24" y="{text_y + 26 * i}" font-size="22" font-weight="600">{escape(line)}</text>'
        for i, line in enumerate(title)
    )
    caption = " · ".join(part for part in (brand, kind) if part)
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}"'
        f' role="img" aria-label="{escape(name, {chr(34): "&quot;"})}">'
        f"<title>{escape(name)}</title>"
        f'<defs><linearGradient id="g" x1="0" y1="0" x2="1" y2="1">'
        f'<stop offset="0" stop-color="{top}"/><stop offset="1" stop-color="{bottom}"/></linearGradient></defs>'
        f'<rect width="{WIDTH}" height="{HEIGHT}" rx="16" fill="url(#g)"/>'
        f'<circle cx="{300 + digest[4] % 60}" cy="{40 + digest[5] % 60}" r="{70 + digest[6] % 50}" fill="#fff" fill-opacity="0.08"/>'
        f'<g transform="translate(336 24)" fill="none" stroke="#fff" stroke-opacity="0.85" stroke-width="2.5"'
        f' stroke-linejoin="round"><path d="{emblem}"/></g>'
        f'<g font-family="Helvetica, Arial, sans-serif" fill="#fff">'
        f'<text x="24" y="128" font-size="84" font-weight="700" fill-opacity="0.92">{escape(_initials(name))}</text>'
        f"{name_rows}"
        f'<text x="24" y="270" font-size="15" fill-opacity="0.8">{escape(caption)}</text>'
        f"</g></svg>\n"
    )
    return svg.encode()


def picture(name: str, brand: str = "", kind: str = "") -> Picture:
    body = render(name, brand, kind)
    return Picture(body, f'"{hashlib.blake2b(body, digest_size=16).hexdigest()}"')


# ---------------------------------------------------------------------------------------------------
# The demo catalog's pictures


@cache
def _demo_products() -> dict[str, dict[str, Any]]:
    """slug -> demo product (name, brand, type), from the data file."""
    # imported here: service imports api, which imports this module
    from actors.catalog.service import load_demo_catalog

    return {slug(p["name"]): p for p in load_demo_catalog()["products"]}


_rendered: dict[str, Picture] = {}
_lock = threading.Lock()


def get(filename: str) -> Picture | None:
    """The picture served as ``{PICTURES_PATH}/{filename}``, or ``None`` for a name that is not one."""
    if not NAME_RE.fullmatch(filename):
        return None
    key = filename.removesuffix(".svg")
    found = _rendered.get(key)
    if found is not None:
        return found
    product = _demo_products().get(key)
    if product is None:
        return None
    with _lock:
        found = _rendered.setdefault(key, picture(product["name"], product.get("brand", ""), product.get("type", "")))
    return found


def current_url(url: str | None) -> str | None:
    """A stored picture URL as clients should use it: a pre-pictures demo URL that now has a served picture
    becomes that picture's URL; anything else (an admin's own URL, ``None``) is left as it is."""
    if url is None:
        return None
    m = _LEGACY_RE.fullmatch(url)
    if m is not None and m.group(1) in _demo_products():
        return f"{PICTURES_PATH}/{m.group(1)}.svg"
    return url
