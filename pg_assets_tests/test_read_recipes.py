"""The README's "Reading Bronze" recipes, run verbatim: the code blocks are taken from
README.md itself, executed, and their output compared with PostgreSQL's own text of every
value, on Bronze written by the project's materializations (with orphan data files of a
failed run beside it, which no recipe may read)."""

import math
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pg_assets import read
from pg_assets.core.identifiers import QualifiedName
from pg_assets.core.layout import table_folder
from pg_assets_tests import test_read
from pg_assets_tests.test_read import (
    DAYS,
    KINDS,
    ORDERS,
    SOURCE,
    postgres_text,
    session,
    session_conn,
)

tables = test_read.tables  # the module-scoped fixtures: one Bronze for both modules' tests
bronze = test_read.bronze

README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"<!-- recipe: (\w+) -->\n```python\n(.*?)```", re.S)


def recipes() -> dict[str, str]:
    return dict(_BLOCK.findall(README.read_text()))


def load(*names: str) -> dict[str, Any]:
    """Execute the README's `committed` block and the named ones; return their namespace."""
    blocks = recipes()
    namespace: dict[str, Any] = {}
    for name in ("committed", *names):
        exec(compile(blocks[name], f"README.md recipe {name}", "exec"), namespace)  # noqa: S102
    return namespace


def test_readme_has_one_recipe_per_reader():
    assert set(recipes()) == {"committed", "duckdb", "pyarrow", "pandas", "spark"}


SELECTIONS = [  # (table, first, last): a day, a date range, the whole table
    (ORDERS, DAYS[1], DAYS[1]),
    (ORDERS, DAYS[1], DAYS[2]),
    (ORDERS, None, None),
    (KINDS, None, None),
]


def expected(bronze, pg_conninfo: str, table: QualifiedName, first, last) -> list[tuple]:
    """PostgreSQL's text of every committed row in [first, last], plus its day."""
    days = [d for d in DAYS if (first or d) <= d <= (last or d)]
    column = "order_date" if table == ORDERS else "d"
    with session_conn(pg_conninfo, session(bronze.config.bronze.root, table)) as conn:
        rows = postgres_text(conn, table, column, days)
    return [(*r, r[1]) for r in rows]  # the day: the partition column, second in both tables


def table_dir(bronze, table: QualifiedName) -> str:
    return str(Path(bronze.config.bronze.root) / table_folder(SOURCE, table))


def days_of(ns: dict[str, Any], bronze, table, first, last) -> list[dict]:
    iso = [None if d is None else d.isoformat() for d in (first, last)]
    return ns["committed"](table_dir(bronze, table), *iso)


def normal(rows: list[tuple]) -> list[tuple]:
    """Rows by id, the day as ISO text."""
    out = [(*r[:-1], str(r[-1])[:10]) for r in rows]
    return sorted(out, key=lambda r: int(r[0]))


@pytest.mark.parametrize("table,first,last", SELECTIONS)
def test_duckdb_recipe(bronze, pg_conninfo, table, first, last):
    ns = load("duckdb")
    rel = ns["read_duckdb"](days_of(ns, bronze, table, first, last))
    assert normal(rel.fetchall()) == expected(bronze, pg_conninfo, table, first, last)


def test_duckdb_recipe_reads_a_year_of_files_in_bounded_memory(bronze):
    """A year of day files through the recipe (the table's days, listed 60 times over: 360
    files): DuckDB must not reserve a large line buffer per file."""
    ns = load("duckdb")
    days = days_of(ns, bronze, ORDERS, None, None)
    (one,) = ns["read_duckdb"](days).aggregate("count(*)").fetchall()[0]
    many = days * (360 // len(days))
    (total,) = ns["read_duckdb"](many).aggregate("count(*)").fetchall()[0]
    assert total == one * (360 // len(days))


@pytest.mark.parametrize("table,first,last", SELECTIONS)
def test_pyarrow_recipe(bronze, pg_conninfo, table, first, last):
    ns = load("pyarrow")
    t = ns["read_pyarrow"](days_of(ns, bronze, table, first, last))
    rows = [tuple(r.values()) for r in t.to_pylist()]
    assert normal(rows) == expected(bronze, pg_conninfo, table, first, last)


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


@pytest.mark.parametrize("table,first,last", SELECTIONS)
def test_pandas_recipe(bronze, pg_conninfo, table, first, last):
    ns = load("pyarrow", "pandas")
    df = ns["read_pandas"](days_of(ns, bronze, table, first, last))
    rows = [tuple(None if _missing(v) else v for v in r) for r in df.itertuples(index=False)]
    assert normal(rows) == expected(bronze, pg_conninfo, table, first, last)


def test_readme_claims_about_default_options(bronze):
    """What the README says goes wrong without the recipes' options, so a reader knows why
    each option is there: DuckDB's default and pandas' read_csv lose NULL vs ''."""
    import duckdb
    import pandas as pd

    ns = load("duckdb")
    days = days_of(ns, bronze, KINDS, None, None)
    paths = [d["path"] for d in days]
    query = "SELECT count(*) FILTER (WHERE t IS NULL), count(*) FILTER (WHERE t = '') FROM {}"
    con = duckdb.connect()
    recipe = ns["read_duckdb"](days, con)  # noqa: F841 - read by name below
    nulls, empties = con.sql(query.format("recipe")).fetchall()[0]
    assert nulls > 0 and empties > 0
    plain = con.read_csv(paths, all_varchar=True)  # noqa: F841 - read by name below
    assert con.sql(query.format("plain")).fetchall()[0] == (nulls + empties, 0)
    for options in ({}, {"keep_default_na": False}, {"engine": "pyarrow"}):
        df = pd.concat(pd.read_csv(p, dtype=str, **options) for p in paths)
        merged = {int(df["t"].isna().sum()), int((df["t"] == "").sum())}
        assert merged == {0, nulls + empties}, options


@pytest.fixture(scope="module")
def spark() -> Iterator[Any]:
    java_home = os.environ.get("JAVA_HOME")
    if shutil.which("java") is None and not (java_home and Path(java_home, "bin/java").exists()):
        pytest.skip("no Java runtime for Spark (bash .ci/run installs default-jre-headless)")
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[1]")
        .appName("pg_assets recipe test")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "1")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.mark.parametrize("table,first,last", SELECTIONS)
def test_spark_recipe(bronze, pg_conninfo, spark, table, first, last):
    ns = load("spark")
    df = ns["read_spark"](spark, table_dir(bronze, table), days_of(ns, bronze, table, first, last))
    assert df.schema.fields[-1].name == "date"
    rows = [tuple(r) for r in df.collect()]
    assert normal(rows) == expected(bronze, pg_conninfo, table, first, last)


@pytest.mark.parametrize("codec", ["zstd", "none"])
def test_other_codecs(tables, project, pg_conninfo, codec):
    """Days written with codec zstd (`.csv.zst`) or none (`.csv`) by the project, through the
    DuckDB and pyarrow recipes and the typed reader."""
    p = project([test_read.orders_table()], bronze={"codec": codec})
    for day in DAYS:
        assert p.materialize(day.isoformat()).success
    ns = load("duckdb", "pyarrow")
    days = ns["committed"](table_dir(p, ORDERS))
    assert [d["codec"] for d in days] == [codec] * len(DAYS)
    want = expected(p, pg_conninfo, ORDERS, None, None)
    assert normal(ns["read_duckdb"](days).fetchall()) == want
    got = [tuple(r.values()) for r in ns["read_pyarrow"](days).to_pylist()]
    assert normal(got) == want
    typed = read.read_table(p.config.bronze.root, SOURCE, ORDERS, verify=True)
    assert sorted(typed.column("id").to_pylist()) == [int(r[0]) for r in want]
    assert typed.column("note").to_pylist().count("") == [r[-2] for r in want].count("") > 0
