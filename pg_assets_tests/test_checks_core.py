"""The verification core (pg_assets.core.verify), no Dagster: a day read back from Bronze is
proven equal to what was published, or the problem is named; PostgreSQL's counts and content
hashes agree with extraction on every plan; one grouped query counts a window exactly."""

import datetime as dt
import gzip
import random
import re

import psycopg
import pytest
from psycopg import sql

from pg_assets.core.compression import get_codec
from pg_assets.core.extract import extract_day
from pg_assets.core.identifiers import QualifiedName
from pg_assets.core.layout import daily_paths
from pg_assets.core.planner import describe_table, plan_day
from pg_assets.core.session import connect_kwargs
from pg_assets.core.verify import (
    CsvRecordCounter,
    count_day,
    read_back,
    recount_window,
    schema_diff,
    verify_stream,
)
from pg_assets.dev.demo_data import ORDER_COLUMNS, create_daily_partitioned, insert_orders
from pg_assets.sinks.local import LocalSink
from pg_assets_tests.conftest import adls_bronze, day_query, postgres_copy

D = dt.date(2026, 9, 7)
DAYS = [D + dt.timedelta(days=n) for n in range(4)]
NAME = QualifiedName("vfy", "orders")


@pytest.fixture(scope="module")
def tables(pg_conninfo: str) -> None:
    with psycopg.connect(pg_conninfo, autocommit=True) as c:
        c.execute("DROP SCHEMA IF EXISTS vfy CASCADE")
        # daily children for DAYS[:3] + DEFAULT holding DAYS[3]
        create_daily_partitioned(c, "vfy", "orders", DAYS[:3], 700)
        insert_orders(c, sql.Identifier("vfy", "orders"), DAYS[3], 90, 5_000_000)
        # a child whose columns are stored in another order than the parent's
        c.execute("CREATE TABLE vfy.mixed (" + ORDER_COLUMNS + ") PARTITION BY RANGE (order_date)")
        c.execute(
            "CREATE TABLE vfy.mixed_child (note text, tags text[], attrs jsonb, status text, "
            "amount numeric(12,2), customer_id integer, created_at timestamptz NOT NULL, "
            "order_date date NOT NULL, id bigint NOT NULL)"
        )
        c.execute(
            "ALTER TABLE vfy.mixed ATTACH PARTITION vfy.mixed_child "
            f"FOR VALUES FROM ('{DAYS[0]}') TO ('{DAYS[1]}')"
        )
        insert_orders(c, sql.Identifier("vfy", "mixed"), DAYS[0], 300, 0)
        # timestamptz, monthly, Berlin days across the DST change of 2026-10-25
        c.execute(
            "CREATE TABLE vfy.tz (id bigint, at timestamptz NOT NULL, v text) "
            "PARTITION BY RANGE (at)"
        )
        c.execute(
            "CREATE TABLE vfy.tz_2026_10 PARTITION OF vfy.tz FOR VALUES "
            "FROM ('2026-10-01 00:00 Europe/Berlin') TO ('2026-11-01 00:00 Europe/Berlin')"
        )
        c.execute("CREATE TABLE vfy.tz_default PARTITION OF vfy.tz DEFAULT")
        c.execute(
            "INSERT INTO vfy.tz SELECT g, '2026-10-22 00:00 Europe/Berlin'::timestamptz "
            "+ g * interval '7 minutes', E'v\\n' || g FROM generate_series(0, 12 * 206) g"
        )


def _extract(pg_conninfo: str, sink, table: QualifiedName, day: dt.date, **kw):
    kw.setdefault("column", "order_date")
    kw.setdefault("timezone", "UTC")
    codec = get_codec(kw.pop("codec", "gzip"))
    with psycopg.connect(pg_conninfo, **connect_kwargs(10, 0)) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        return extract_day(
            conn, source="t", table=table, day=day, sink=sink, codec=codec,
            level=codec.default_level, run_id="r" * 32, block_size=64 << 10, **kw,
        )  # fmt: skip


# -- counting CSV records -----------------------------------------------------------------


def test_record_counter_counts_records_not_lines_in_any_chunking(tables, db):
    data = postgres_copy(db, day_query(sql.Identifier("vfy", "orders"), "order_date", DAYS[0]))
    assert data.count(b"\n") > 701  # multi-line notes: lines are not records
    rnd = random.Random(7)
    for _ in range(20):
        counter = CsvRecordCounter()
        i = 0
        while i < len(data):
            n = rnd.choice([1, 2, 3, 17, 4096, 65536])
            counter.feed(data[i : i + n])
            i += n
        assert counter.records == 701 and counter.complete
    # a cut inside a quoted field is not a record boundary
    cut = data.index(b'"multi\nline') + 7
    counter = CsvRecordCounter()
    counter.feed(data[:cut])
    assert counter.in_quotes and not counter.complete


# -- read-back ----------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["gzip", "zstd", "none"])
def test_read_back_of_a_published_day_passes(tables, pg_conninfo, tmp_path, codec):
    sink = LocalSink(tmp_path)
    result = _extract(pg_conninfo, sink, NAME, DAYS[1], codec=codec)
    r = read_back(sink, daily_paths("t", NAME, DAYS[1]).folder, result.manifest)
    assert r.ok, r.problems
    assert r.complete and r.rows == result.stats.rows == 700
    assert r.sha256 == result.manifest["sha256"] and r.raw_bytes == result.stats.raw_bytes


def _published(pg_conninfo, tmp_path):
    sink = LocalSink(tmp_path)
    result = _extract(pg_conninfo, sink, NAME, DAYS[2])
    folder = daily_paths("t", NAME, DAYS[2]).folder
    return sink, folder, result.manifest, tmp_path / folder / result.manifest["file"]


def test_truncated_file_is_named_as_truncated(tables, pg_conninfo, tmp_path):
    sink, folder, manifest, path = _published(pg_conninfo, tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    r = read_back(sink, folder, manifest)
    assert not r.ok
    text = r.summary()
    assert text.startswith(f"{folder}/{manifest['file']}: truncated: the store holds")
    assert f"{len(data) // 2:,} bytes, the manifest recorded {len(data):,}" in text
    assert "sha256 mismatch" in text and "gzip stream ends early" in text


def test_flipped_byte_is_a_sha_mismatch_and_a_decompression_error(tables, pg_conninfo, tmp_path):
    sink, folder, manifest, path = _published(pg_conninfo, tmp_path)
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x40
    path.write_bytes(bytes(data))
    r = read_back(sink, folder, manifest)
    assert not r.ok and "truncated" not in r.summary()
    assert any(p.startswith("sha256 mismatch") for p in r.problems)
    # deflate either rejects the stream or the gzip trailer's CRC catches it; both are named
    assert any("gzip decompression failed" in p or "rows read back" in p for p in r.problems), (
        r.problems
    )


def test_deleted_file_is_named_as_missing(tables, pg_conninfo, tmp_path):
    sink, folder, manifest, path = _published(pg_conninfo, tmp_path)
    path.unlink()
    r = read_back(sink, folder, manifest)
    assert r.problems == [
        "missing: the manifest names this file but the store does not hold it (deleted?)"
    ]
    assert r.summary().startswith(f"{folder}/{manifest['file']}: missing")


def test_row_count_is_checked_independently_of_the_sha(tables, pg_conninfo, tmp_path):
    sink, folder, manifest, path = _published(pg_conninfo, tmp_path)
    # a well-formed gzip file with one record less, and a manifest that vouches for its bytes
    lines = gzip.decompress(path.read_bytes())
    shorter = lines[: lines.rindex(b"\n", 0, len(lines) - 1) + 1]
    path.write_bytes(gzip.compress(shorter))
    import hashlib

    forged = {**manifest, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
              "compressed_bytes": path.stat().st_size}  # fmt: skip
    r = read_back(sink, folder, forged)
    assert r.problems == ["699 rows read back, the manifest recorded 700"]


def test_header_must_name_the_manifest_columns(tables, pg_conninfo, tmp_path):
    sink, folder, manifest, path = _published(pg_conninfo, tmp_path)
    data = gzip.decompress(path.read_bytes())
    header, rest = data.split(b"\n", 1)
    path.write_bytes(gzip.compress(header.replace(b"note", b"memo") + b"\n" + rest))
    import hashlib

    forged = {**manifest, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
              "compressed_bytes": path.stat().st_size}  # fmt: skip
    (problem,) = read_back(sink, folder, forged).problems
    assert problem.startswith("the CSV header names columns id, order_date, created_at")
    assert "memo" in problem and problem.endswith("note")


def test_byte_budget_checks_a_stated_prefix(tables, pg_conninfo, tmp_path):
    sink, folder, manifest, path = _published(pg_conninfo, tmp_path)
    budget = manifest["compressed_bytes"] // 4
    r = read_back(sink, folder, manifest, byte_budget=budget)
    assert r.ok and not r.complete and r.bytes_read == budget
    assert 0 < r.records_seen < 700
    assert r.part_checked().startswith(f"the first {budget:,} of {manifest['compressed_bytes']:,}")
    assert "not verified" in r.summary()
    # what a prefix can prove: the file's size in the store, and a clean, well-formed start
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    bad = read_back(sink, folder, manifest, byte_budget=budget)
    assert not bad.complete and bad.summary().startswith(f"{folder}/{manifest['file']}: truncated")


def test_garbage_stream_is_a_decompression_error():
    r = verify_stream(
        [b"not gzip at all\n"], file="x.csv.gz", codec="gzip", sha256="0" * 64,
        compressed_bytes=16, rows=0,
    )  # fmt: skip
    assert any(
        p.startswith("gzip decompression failed in compressed bytes 0..16") for p in r.problems
    )


def test_read_back_from_adls_names_a_truncated_file(tables, pg_conninfo, adls, tmp_path):
    from pg_assets.resources.bronze import AdlsSettings
    from pg_assets.sinks.adls import AdlsSink

    cfg = adls_bronze(adls)
    sink = AdlsSink.from_uri(cfg["root"], **AdlsSettings(**cfg["adls"]).model_dump())
    result = _extract(pg_conninfo, sink, NAME, DAYS[1])
    folder = daily_paths("t", NAME, DAYS[1]).folder
    assert read_back(sink, folder, result.manifest).ok
    rel = f"{folder}/{result.manifest['file']}"
    data = sink.read_bytes(rel)
    sink.write_bytes("corrupt", rel, data[:-100], "application/gzip")  # a shorter file
    r = read_back(sink, folder, result.manifest)
    assert not r.ok and r.summary().startswith(f"{rel}: truncated")
    sink.delete(rel)
    assert read_back(sink, folder, result.manifest).problems[0].startswith("missing")


# -- counting in PostgreSQL ------------------------------------------------------------------


@pytest.mark.parametrize(
    "table,day,strategy",
    [
        ("orders", DAYS[0], "exact_child"),
        ("orders", DAYS[3], "parent_filter"),  # rows in DEFAULT
        ("mixed", DAYS[0], "exact_child"),  # child stores columns in another order
    ],
)
def test_content_hash_at_extraction_equals_the_check_and_the_window_query(
    tables, pg_conninfo, tmp_path, table, day, strategy
):
    name = QualifiedName("vfy", table)
    result = _extract(pg_conninfo, LocalSink(tmp_path), name, day, content_hash=True)
    m = result.manifest
    assert result.plan.strategy == strategy
    assert m["content_hash"]["algorithm"].startswith("sum(hashtextextended(ROW(")
    names = [c["name"] for c in m["columns"]]
    with psycopg.connect(pg_conninfo, **connect_kwargs(10, 0)) as conn:
        info = describe_table(conn, name, "order_date")
        now = count_day(conn, plan_day(info, day, "UTC"), "order_date", names)
        # the grouped window query reads the parent, in the parent's column order
        window = recount_window(conn, info, "UTC", DAYS[0], DAYS[3], names)
    assert now.rows == m["rows"] > 0 and now.content_hash == m["content_hash"]["value"]
    assert window[day].rows == m["rows"] and window[day].content_hash == m["content_hash"]["value"]


def test_content_hash_sees_an_update_that_keeps_the_count(tables, pg_conninfo, db):
    def measure():
        with psycopg.connect(pg_conninfo, **connect_kwargs(10, 0)) as conn:
            info = describe_table(conn, NAME, "order_date")
            names = [c.name for c in info.columns]
            return count_day(conn, plan_day(info, DAYS[1], "UTC"), "order_date", names)

    before = measure()
    (note,) = db.execute("SELECT note FROM vfy.orders WHERE id = 10000001").fetchone()
    db.execute("UPDATE vfy.orders SET note = 'changed' WHERE id = 10000001")
    try:
        after = measure()
    finally:
        db.execute("UPDATE vfy.orders SET note = %s WHERE id = 10000001", (note,))
    assert before.rows == after.rows and before.content_hash != after.content_hash
    assert measure() == before


def test_window_counts_timestamptz_days_in_the_table_time_zone(tables, pg_conninfo, db):
    first, last = dt.date(2026, 10, 22), dt.date(2026, 10, 31)
    with psycopg.connect(pg_conninfo, **connect_kwargs(10, 0)) as conn:
        info = describe_table(conn, QualifiedName("vfy", "tz"), "at")
        window = recount_window(conn, info, "Europe/Berlin", first, last)
        for n in range((last - first).days + 1):
            day = first + dt.timedelta(days=n)
            (expected,) = db.execute(
                sql.SQL("SELECT count(*) FROM ({}) q").format(
                    day_query(
                        sql.Identifier("vfy", "tz"), "at", day, "timestamptz", "Europe/Berlin"
                    )
                )  # fmt: skip
            ).fetchone()
            got = window.get(day)
            assert (got.rows if got else 0) == expected
            assert count_day(conn, plan_day(info, day, "Europe/Berlin"), "at").rows == expected
    assert window[dt.date(2026, 10, 25)].rows > window[dt.date(2026, 10, 24)].rows  # 25 hours


def test_window_query_prunes_to_the_window_partitions(tables, db, pg_conninfo):
    with psycopg.connect(pg_conninfo, **connect_kwargs(10, 0)) as conn:
        info = describe_table(conn, NAME, "order_date")
        from pg_assets.core.verify import window_statement

        stmt = window_statement(info, "UTC", DAYS[1], DAYS[2])
        plan = "\n".join(r[0] for r in conn.execute(sql.SQL("EXPLAIN {}").format(stmt)))
    assert "orders_2026_09_08" in plan and "orders_2026_09_09" in plan
    assert "orders_2026_09_07" not in plan and "orders_default" not in plan


def test_schema_diff_names_added_dropped_and_retyped_columns():
    before = [{"name": "id", "type": "bigint"}, {"name": "a", "type": "text"},
              {"name": "b", "type": "integer"}]  # fmt: skip
    after = [{"name": "id", "type": "bigint"}, {"name": "b", "type": "bigint"},
             {"name": "c", "type": "jsonb"}]  # fmt: skip
    d = schema_diff(before, after)
    assert d.describe() == "added c (jsonb); dropped a (text); retyped b (integer → bigint)"
    assert not schema_diff(before, before).changed


# -- settings --------------------------------------------------------------------------------


def test_checks_settings_merge_per_table_and_errors_name_the_key(tmp_path):
    from pg_assets.config import ConfigError, load_config

    path = tmp_path / "c.yaml"
    base = "source: s\nbronze: {root: /tmp/b}\n"
    path.write_text(base + "checks: {window_days: 10, content_hash: true}\ntables:\n"
                    "  - {table: a.b, partition_column: d, checks: {late_data: warn}}\n"
                    "  - {table: a.c, partition_column: d}\n")  # fmt: skip
    cfg = load_config(path)
    first, second = (cfg.checks_for(t) for t in cfg.tables)
    assert (first.late_data, first.window_days, first.content_hash) == ("warn", 10, True)
    assert (second.late_data, second.window_days) == ("rematerialize", 10)
    assert first.freshness_deadline == dt.time(6, 0) and first.enabled
    # checks never change what lands, so they leave the asset's code version alone
    path.write_text(base + "tables: [{table: a.b, partition_column: d}]\n")
    assert load_config(path).tables[0].fingerprint(cfg.bronze) == cfg.tables[0].fingerprint(
        cfg.bronze
    )
    for bad, message in [
        ("checks: {late_data: sometimes}", "key 'checks.late_data': Input should be"),
        ("checks: {window_days: 0}", "key 'checks.window_days': Input should be greater"),
        ("checks: {freshness_deadline: 6:30}", "key 'checks.freshness_deadline': 390 is not a"),
        ("checks: {windows_days: 3}", "key 'checks.windows_days': unknown key"),
    ]:
        path.write_text(base + bad + "\ntables: [{table: a.b, partition_column: d}]\n")
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(path)
    path.write_text(
        base + "tables: [{table: a.b, partition_column: d, checks: {window_days: x}}]\n"
    )
    with pytest.raises(ConfigError, match=re.escape("table 'a.b': key 'checks.window_days'")):
        load_config(path)
