"""Product pictures: every seeded product's picture_url is a real image, served by the catalog (issue 13)."""

from __future__ import annotations

import re
from xml.etree import ElementTree

import pytest

from actors.catalog import pictures, service
from gateway.routes import ROUTES
from runtime.routes import OPTIONAL

PICTURES = pictures.PICTURES_PATH


def test_every_demo_product_names_a_distinct_served_picture():
    products = service.load_demo_catalog()["products"]
    urls = [p["picture_url"] for p in products]
    assert len(set(urls)) == len(urls)
    bodies = set()
    for p in products:
        assert p["picture_url"] == pictures.url_for(p["name"])
        found = pictures.get(p["picture_url"].rsplit("/", 1)[1])
        assert found is not None, p["name"]
        root = ElementTree.fromstring(found.body)  # well-formed XML, names escaped
        assert root.tag == "{http://www.w3.org/2000/svg}svg"
        assert root.findtext("{http://www.w3.org/2000/svg}title") == p["name"]
        assert len(found.body) < 4096
        bodies.add(found.body)
    assert len(bodies) == len(products), "one distinct picture per product"


def test_rendering_is_deterministic_and_escapes_text():
    assert pictures.render('Ember & <Oak> "Stove"', "B&B", "Camp Kitchen") == pictures.render(
        'Ember & <Oak> "Stove"', "B&B", "Camp Kitchen"
    )
    root = ElementTree.fromstring(pictures.render('Ember & <Oak> "Stove"', "B&B"))
    assert root.findtext("{http://www.w3.org/2000/svg}title") == 'Ember & <Oak> "Stove"'
    assert b"<script" not in pictures.render("<script>alert(1)</script>")


def test_legacy_demo_urls_map_to_served_pictures():
    name = service.load_demo_catalog()["products"][0]["name"]
    legacy = f"/images/catalog/{pictures.slug(name)}.webp"
    assert pictures.current_url(legacy) == pictures.url_for(name)
    assert pictures.current_url("/images/glacier.webp") == "/images/glacier.webp"  # an admin's own URL
    assert pictures.current_url("/images/catalog/no-such-thing.webp") == "/images/catalog/no-such-thing.webp"
    assert pictures.current_url(None) is None


def test_gateway_lets_anyone_get_pictures():
    route = next(r for r in ROUTES if r.prefix == "/api/catalog")
    for method in ("GET", "HEAD"):
        found = route.resolve(method, "/pictures/stormline-waterproof-shell.svg")
        assert found is not None and found[0].access == OPTIONAL


async def test_every_seeded_picture_url_answers_with_an_image(catalog):
    cat = await catalog()
    client = cat.client
    seen = 0
    page = 1
    while True:
        resp = await client.get("/api/catalog/products", params={"page": page, "page_size": 100})
        assert resp.status == 200
        items = (await resp.json())["items"]
        for item in items:
            url = item["picture_url"]
            assert url.startswith(PICTURES + "/"), url
            resp = await client.get(url)  # no token: anyone may load a picture
            assert resp.status == 200, (url, await resp.text())
            assert resp.content_type == "image/svg+xml"
            assert resp.headers["ETag"].startswith('"') and "max-age" in resp.headers["Cache-Control"]
            assert (await resp.read()).startswith(b"<svg")
            seen += 1
        if len(items) < 100:
            break
        page += 1
    assert seen == len(service.load_demo_catalog()["products"])


async def test_picture_etag_head_and_304(catalog):
    cat = await catalog()
    url = service.load_demo_catalog()["products"][3]["picture_url"]
    first = await cat.client.get(url)
    body = await first.read()
    etag = first.headers["ETag"]
    again = await cat.client.get(url)
    assert again.headers["ETag"] == etag and await again.read() == body
    cached = await cat.client.get(url, headers={"If-None-Match": f'W/"x", {etag}'})
    assert cached.status == 304 and cached.headers["ETag"] == etag and await cached.read() == b""
    head = await cat.client.head(url)
    assert head.status == 200 and head.content_type == "image/svg+xml"


@pytest.mark.parametrize(
    "path",
    [
        f"{PICTURES}/no-such-product.svg",
        f"{PICTURES}/stormline-waterproof-shell.webp",
        f"{PICTURES}/stormline-waterproof-shell",
        f"{PICTURES}/STORMLINE-WATERPROOF-SHELL.svg",
        f"{PICTURES}/..%2Fdata%2Fcatalog.json",
        f"{PICTURES}/..%2F..%2Fservice.py",
        f"{PICTURES}/%2e%2e%2fdata%2fcatalog.json",
        f"{PICTURES}/..%5Cdata%5Ccatalog.json",
        f"{PICTURES}/.svg",
        f"{PICTURES}/",
    ],
)
async def test_unknown_pictures_and_traversal_are_404_problems(catalog, path):
    cat = await catalog(seed=False)
    resp = await cat.client.get(path)
    assert resp.status == 404, path
    assert resp.content_type == "application/problem+json"
    assert b"brands" not in await resp.read()


async def test_dot_segments_never_reach_the_data_file(catalog):
    cat = await catalog(seed=False)
    for path in (f"{PICTURES}/../data/catalog.json", f"{PICTURES}/../../actors/catalog/data/catalog.json"):
        resp = await cat.client.get(path)
        body = await resp.read()
        assert resp.status == 404 and b'"brands"' not in body, path
        assert not re.search(rb"Northwind", body)


async def test_products_show_served_urls_for_legacy_seeds(catalog):
    """A catalog seeded before pictures existed stored /images/catalog/*.webp: the API shows the served URL."""
    cat = await catalog(seed=False)
    name = service.load_demo_catalog()["products"][0]["name"]
    created = await cat.create(name=name, picture_url=f"/images/catalog/{pictures.slug(name)}.webp")
    assert created["picture_url"] == pictures.url_for(name)
    resp = await cat.client.get(created["picture_url"])
    assert resp.status == 200 and resp.content_type == "image/svg+xml"
