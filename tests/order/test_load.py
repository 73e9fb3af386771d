"""GET /api/order/internal/load: the saga backlog the cart's admission control reads."""

from __future__ import annotations

from sqlalchemy import inspect

from actors.order import api, repository, service
from runtime.migrate import RUNTIME, Component, upgrade
from runtime.store import create_engine
from tests.order.conftest import eventually


async def _load(orders) -> dict:
    resp = await orders.client.get(api.LOAD_PATH)  # no token: it is internal and shows only counts
    assert resp.status == 200 and resp.content_type == "application/json"
    return await resp.json()


async def test_the_load_counts_open_orders_and_unsent_messages(orders, catalog):
    assert await _load(orders) == {"open_orders": 0, "outbox_backlog": 0}

    relay = orders.runtime.relay
    await relay.stop()  # the outbox does not drain: what the orders send stays counted
    catalog.hold = True
    requests = [await orders.checkout((catalog.add(), "10.00", 1), buyer=f"buyer-{i}") for i in range(3)]
    for request in requests:
        await orders.wait_status(request.order_id, "awaiting_validation")
    unsent = await relay.pending()
    assert unsent >= 3 * 4, "per order: OrderStarted, two status changes and a ReserveStock"
    load = await eventually(lambda: _load_is(orders, open_orders=3), what="three open orders")
    assert load == {"open_orders": 3, "outbox_backlog": unsent}, "exactly these two counts, nothing else"

    relay.start()
    await orders.settle()
    await catalog.let_go()
    for request in requests:
        await orders.wait_status(request.order_id, "paid")
    await orders.settle()
    await eventually(lambda: _load_is(orders, open_orders=0, outbox_backlog=0), what="an empty backlog")


async def _load_is(orders, **expected: int) -> dict | None:
    load = await _load(orders)
    return load if all(load[k] == v for k, v in expected.items()) else None


async def test_the_load_is_counted_once_per_ttl_however_often_it_is_asked(orders, catalog):
    gauge = api.LoadGauge(orders.engine, ttl=3600)  # a TTL no test outlives: every read after the first is cached
    first = await gauge.read()
    catalog.hold = True
    request = await orders.checkout((catalog.add(), "10.00", 1))
    await orders.wait_status(request.order_id, "awaiting_validation")
    assert [await gauge.read() for _ in range(20)] == [first] * 20 and gauge.queries == 1

    fresh = api.LoadGauge(orders.engine, ttl=0)
    assert (await fresh.read()).open_orders == 1 and (await fresh.read()).open_orders == 1 and fresh.queries == 2
    await catalog.let_go()


async def test_the_open_order_count_uses_an_index_on_status(orders):
    def indexes(conn) -> dict[str, list[str]]:
        return {i["name"]: i["column_names"] for i in inspect(conn).get_indexes(repository.orders.name)}

    async with orders.engine.connect() as conn:
        found = await conn.run_sync(indexes)
    assert found.get(repository.STATUS_INDEX) == ["status"]


async def test_the_load_endpoint_is_documented(orders):
    spec = await (await orders.client.get("/api/docs/swagger.json")).json()
    ref = spec["paths"][api.LOAD_PATH]["get"]["responses"]["200"]["schema"]["$ref"]
    assert set(spec["definitions"][ref.rsplit("/", 1)[-1]]["properties"]) == {"open_orders", "outbox_backlog"}


async def test_a_database_of_the_first_schema_is_upgraded_in_place(db_url):
    """A deployed order database (schema 1) gets the simulator's table and the status index from the new steps."""
    first = Component(service.SCHEMA.name, [m for m in service.SCHEMA.migrations if m.version == 1])
    engine = create_engine(db_url)
    try:
        assert (await upgrade(engine, [RUNTIME, first]))[service.NAME] == (0, 1)
        assert (await upgrade(engine, [RUNTIME, service.SCHEMA]))[service.NAME] == (1, 3)

        def schema(conn) -> tuple[set[str], set[str]]:
            found = inspect(conn)
            return set(found.get_table_names()), {i["name"] for i in found.get_indexes(repository.orders.name)}

        async with engine.connect() as conn:
            tables, indexes = await conn.run_sync(schema)
        assert {"orders", "payment_simulator_charges"} <= tables and repository.STATUS_INDEX in indexes
    finally:
        await engine.dispose()
