"""SQL Server cannot run here: the catalog's DDL and queries are compiled for it instead."""

from __future__ import annotations

from sqlalchemy import create_mock_engine
from sqlalchemy.dialects import mssql
from sqlalchemy.dialects.mssql import pyodbc  # noqa: F401 - registers mssql.pyodbc

from actors.catalog import repository as repo


def test_catalog_tables_create_on_sql_server():
    ddl: list[str] = []
    engine = create_mock_engine(
        "mssql+pyodbc://", lambda sql, *a, **k: ddl.append(str(sql.compile(dialect=engine.dialect)))
    )
    repo.metadata.create_all(engine, checkfirst=False)
    text = "\n".join(ddl)
    for table in ("brands", "product_types", "products", "product_terms", "product_counts", "catalog_meta"):
        assert f"CREATE TABLE {table}" in text
    assert "NUMERIC(12, 2)" in text, "money is exact"
    assert "COLLATE Latin1_General_100_BIN2" in text, "sort keys and search terms compare by code point"
    assert "\tname NVARCHAR(200)" in text, "names are Unicode"
    assert "CREATE INDEX ix_products_brand_price" in text


def _compile(stmt) -> str:
    dialect = mssql.pyodbc.dialect()
    dialect._supports_offset_fetch = True  # what initialize() sets on SQL Server 2012 and later
    return str(stmt.compile(dialect=dialect, compile_kwargs={"render_postcompile": True}))


def test_browse_queries_compile_for_sql_server():
    query = repo.ProductQuery(page=3, page_size=20, brand_id="b", search=("water", "bott"), sort="-price")
    page = _compile(repo.page_statement(query))
    assert "OFFSET" in page and "FETCH" in page and "LIMIT" not in page
    # both words are index ranges, read once for the page and its total
    assert page.count(".term >=") == 2 and page.count(".term <") == 2 and "count(*) OVER ()" in page
    assert "ORDER BY page.price DESC, page.product_id DESC" in page
    assert "'water'" not in page, "search words are bound parameters"
    assert "count(*)" in _compile(repo.count_statement(query)).lower()
    plain = _compile(repo.page_statement(repo.ProductQuery(brand_id="b")))
    assert "sum(product_counts.products)" in plain, "a browse without search counts nothing"
