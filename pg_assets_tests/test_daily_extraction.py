"""Every planner path, materialized through Dagster and compared byte for byte with
PostgreSQL's own `COPY (SELECT * FROM parent WHERE <day>) TO STDOUT (FORMAT csv, HEADER)`."""

import datetime as dt
import gzip
import hashlib

import psycopg
import pytest
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)
from psycopg import sql

from pg_assets.catalog import check_tables
from pg_assets.core.compression import get_codec
from pg_assets.core.identifiers import QualifiedName
from pg_assets.dev.demo_data import ORDER_COLUMNS, create_daily_partitioned, insert_orders
from pg_assets.sinks.local import LocalSink
from pg_assets_tests.conftest import day_query, postgres_copy, write_config

D = dt.date(2026, 10, 24)
DAYS = [D + dt.timedelta(days=n) for n in range(4)]


@pytest.fixture(scope="module")
def tables(pg_conninfo: str) -> None:
    with psycopg.connect(pg_conninfo, autocommit=True) as c:
        c.execute("DROP SCHEMA IF EXISTS plan CASCADE")
        c.execute("CREATE SCHEMA plan")
        # 1. one child per day (+ DEFAULT holding a day that has no child)
        create_daily_partitioned(c, "plan", "daily", DAYS[:3], 500)
        insert_orders(c, sql.Identifier("plan", "daily"), DAYS[3], 120, 900_000)
        # 2. monthly children on a date column
        c.execute(
            "CREATE TABLE plan.monthly (" + ORDER_COLUMNS + ") PARTITION BY RANGE (order_date)"
        )
        c.execute(
            "CREATE TABLE plan.monthly_2026_10 PARTITION OF plan.monthly "
            "FOR VALUES FROM ('2026-10-01') TO ('2026-11-01')"
        )
        # 3. a monthly child that is itself partitioned (by customer), not COPY-able directly
        c.execute("CREATE TABLE plan.sub (" + ORDER_COLUMNS + ") PARTITION BY RANGE (order_date)")
        c.execute(
            "CREATE TABLE plan.sub_2026_10 PARTITION OF plan.sub "
            "FOR VALUES FROM ('2026-10-01') TO ('2026-11-01') PARTITION BY HASH (id)"
        )
        for r in range(2):
            c.execute(
                f"CREATE TABLE plan.sub_2026_10_h{r} PARTITION OF plan.sub_2026_10 "
                f"FOR VALUES WITH (MODULUS 2, REMAINDER {r})"
            )
        # 5. not partitioned
        c.execute("CREATE TABLE plan.flat (" + ORDER_COLUMNS + ")")
        for t in ("monthly", "sub", "flat"):
            for i, day in enumerate(DAYS):
                insert_orders(c, sql.Identifier("plan", t), day, 300, i * 1000)
        # 6. timestamptz, monthly in Europe/Berlin, one row a minute across the DST change
        #    (2026-10-25 has 25 hours there)
        c.execute(
            "CREATE TABLE plan.tz (id bigint, at timestamptz NOT NULL, v text) "
            "PARTITION BY RANGE (at)"
        )
        c.execute(
            "CREATE TABLE plan.tz_2026_10 PARTITION OF plan.tz FOR VALUES "
            "FROM ('2026-10-01 00:00 Europe/Berlin') TO ('2026-11-01 00:00 Europe/Berlin')"
        )
        c.execute(
            "INSERT INTO plan.tz SELECT g, '2026-10-23 00:00 Europe/Berlin'::timestamptz "
            "+ g * interval '1 minute', 'v' || g FROM generate_series(0, 5 * 1440) g"
        )
        # 7. daily children on timestamptz in Europe/Berlin: the DST day is an exact child
        c.execute(
            "CREATE TABLE plan.tzdaily (id bigint, at timestamptz NOT NULL, v text) "
            "PARTITION BY RANGE (at)"
        )
        for day in DAYS:
            c.execute(
                sql.SQL(
                    "CREATE TABLE {} PARTITION OF plan.tzdaily FOR VALUES "
                    "FROM ({}::timestamp AT TIME ZONE 'Europe/Berlin') "
                    "TO ({}::timestamp AT TIME ZONE 'Europe/Berlin')"
                ).format(
                    sql.Identifier("plan", f"tzdaily_{day:%Y%m%d}"),
                    sql.Literal(day),
                    sql.Literal(day + dt.timedelta(days=1)),
                )
            )
        c.execute(
            "INSERT INTO plan.tzdaily SELECT * FROM plan.tz WHERE at >= '2026-10-24 00:00 Europe/Berlin' AND at < '2026-10-28 00:00 Europe/Berlin'"
        )


CASES = [
    # table, column, kind, tz, day, expected strategy, expected relation
    ("plan.daily", "order_date", "date", "UTC", DAYS[1], "exact_child", "plan.daily_2026_10_25"),
    ("plan.daily", "order_date", "date", "UTC", DAYS[3], "parent_filter", "plan.daily"),
    (
        "plan.monthly",
        "order_date",
        "date",
        "UTC",
        DAYS[2],
        "covering_child",
        "plan.monthly_2026_10",
    ),
    ("plan.sub", "order_date", "date", "UTC", DAYS[0], "covering_child", "plan.sub_2026_10"),
    ("plan.flat", "order_date", "date", "UTC", DAYS[1], "parent_filter", "plan.flat"),
    ("plan.tz", "at", "timestamptz", "Europe/Berlin", DAYS[1], "covering_child", "plan.tz_2026_10"),
    (
        "plan.tz",
        "at",
        "timestamptz",
        "America/New_York",
        DAYS[1],
        "covering_child",
        "plan.tz_2026_10",
    ),
    (
        "plan.tzdaily",
        "at",
        "timestamptz",
        "Europe/Berlin",
        DAYS[1],
        "exact_child",
        "plan.tzdaily_20261025",
    ),
]


@pytest.mark.parametrize("table,column,kind,tz,day,strategy,relation", CASES)
def test_partition_matches_postgres_copy(
    tables, project, db, table, column, kind, tz, day, strategy, relation
):
    p = project(
        [{"table": table, "partition_column": column, "timezone": tz, "start": "2026-10-01"}]
    )
    result = p.materialize(day.isoformat())
    assert result.success
    meta = p.metadata(result)
    assert (meta["strategy"], meta["source_relation"]) == (strategy, relation)

    schema, name = table.split(".")
    expected = postgres_copy(db, day_query(sql.Identifier(schema, name), column, day, kind, tz))
    sink = LocalSink(p.config.bronze.root)
    data, manifest = p.read_day(QualifiedName(schema, name), day)
    assert gzip.decompress(data) == expected

    (count,) = db.execute(
        sql.SQL("SELECT count(*) FROM ({}) q").format(
            day_query(sql.Identifier(schema, name), column, day, kind, tz)
        )
    ).fetchone()
    assert manifest["rows"] == meta["dagster/partition_row_count"] == count > 0
    assert manifest["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["raw_bytes"] == len(expected)
    assert manifest["compressed_bytes"] == len(data)
    assert manifest["source_relation"] == relation
    assert [c["name"] for c in manifest["columns"]] == expected.split(b"\n", 1)[0].decode().split(
        ","
    )
    assert "/" in manifest["snapshot"]["lsn_upper_bound"]
    assert manifest["snapshot"]["txid_snapshot"].count(":") == 2
    assert manifest["session"]["DateStyle"].startswith("ISO")
    assert sink.list_files("_staging") == []
    if table == "plan.tz" and tz == "Europe/Berlin":
        assert count == 25 * 60  # the DST day has 25 hours in Berlin


def test_first_day_defaults_to_lowest_partition_bound(tables, project, tmp_path):
    """`pg-assets check` reads the lowest bound once and caches it; loading reads the cache."""
    config = write_config(
        tmp_path / "pg_assets.yaml", [{"table": "plan.daily", "partition_column": "order_date"}]
    )
    (checked,) = check_tables(config)
    assert checked.start == DAYS[0]
    p = project([{"table": "plan.daily", "partition_column": "order_date"}])
    assert p.asset().partitions_def.start.date() == DAYS[0]


def test_rematerialize_replaces_without_duplicates(tables, project):
    p = project([{"table": "plan.daily", "partition_column": "order_date", "start": "2026-10-01"}])
    name = QualifiedName("plan", "daily")
    assert p.materialize(DAYS[0].isoformat()).success
    first, m1 = p.read_day(name, DAYS[0])
    assert p.materialize(DAYS[0].isoformat()).success
    second, m2 = p.read_day(name, DAYS[0])  # one data file: the first version is gone
    assert m2["file"] != m1["file"] and m2["file"].startswith("daily-2026-10-24-")
    assert gzip.decompress(first) == gzip.decompress(second)
    assert m2["history"][0] == {
        k: m1[k] for k in ("file", "rows", "sha256", "compressed_bytes", "extracted_at", "run_id")
    }


def test_codec_change_leaves_one_data_file(tables, project):
    table = {"table": "plan.daily", "partition_column": "order_date", "start": "2026-10-01"}
    name = QualifiedName("plan", "daily")
    assert project([table]).materialize(DAYS[1].isoformat()).success
    p = project([table], bronze={"codec": "zstd"})
    assert p.materialize(DAYS[1].isoformat()).success
    data, manifest = p.read_day(name, DAYS[1])  # asserts the .csv.gz is gone
    assert manifest["file"].endswith(".csv.zst") and manifest["codec"] == "zstd"
    assert manifest["history"][0]["file"].endswith(".csv.gz")


@pytest.mark.parametrize("codec,level", [("gzip", 0), ("gzip", 6), ("zstd", 3)])
def test_codecs_roundtrip(tables, project, db, codec, level):
    p = project(
        [{"table": "plan.monthly", "partition_column": "order_date", "start": "2026-10-01"}],
        bronze={"codec": codec, "level": level, "block_size_mib": 0.01},
    )
    assert p.materialize(DAYS[0].isoformat()).success
    c = get_codec(codec)
    data, manifest = p.read_day(QualifiedName("plan", "monthly"), DAYS[0])
    assert manifest["file"].endswith(f".csv{c.extension}")
    expected = postgres_copy(
        db, day_query(sql.Identifier("plan", "monthly"), "order_date", DAYS[0])
    )
    assert c.decompress(data) == expected


def test_a_day_that_has_not_ended_is_refused(tables, project):
    """A run whose range reaches today (or beyond) in the table's time zone commits nothing:
    a day extracted early would look complete in Bronze."""
    p = project([{"table": "plan.flat", "partition_column": "order_date", "start": "2026-10-01"}])
    today = dt.datetime.now(dt.UTC).date()
    yesterday = today - dt.timedelta(days=1)
    result = p.materialize(
        None,
        tags={ASSET_PARTITION_RANGE_START_TAG: yesterday.isoformat(),
              ASSET_PARTITION_RANGE_END_TAG: today.isoformat()},
    )  # fmt: skip
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert f"{today} has not ended yet in UTC" in failure.step_failure_data.error.message
    assert result.get_asset_materialization_events() == []
    assert p.sink().list_files() == []
