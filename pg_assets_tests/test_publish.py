"""The publish protocol under faults and races: a day ends as the old version with its own
manifest or the new version with its own manifest, never a mix, never a gap; two runs of a
day never interleave; names that look like paths stay in their own folders; the recorded
snapshot is exact."""

import datetime as dt
import gzip
import json
import threading

import psycopg
import pytest
from psycopg import sql

from pg_assets.config import ConfigError
from pg_assets.core.extract import lock_key
from pg_assets.core.identifiers import QualifiedName
from pg_assets.core.layout import daily_paths, decode_segment, table_folder
from pg_assets.dev.demo_data import create_daily_partitioned, insert_orders
from pg_assets_tests.adls_server import Fault
from pg_assets_tests.conftest import adls_bronze, day_query, postgres_copy, write_config

DAY = dt.date(2026, 10, 7)
NAME = QualifiedName("pub", "orders")
TABLE = {"table": "pub.orders", "partition_column": "order_date", "start": "2026-10-01"}


@pytest.fixture(scope="module")
def orders(pg_conninfo: str) -> None:
    with psycopg.connect(pg_conninfo, autocommit=True) as c:
        create_daily_partitioned(c, NAME.schema, NAME.name, [DAY], 3_000)


def failure_message(result) -> str:
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    return failure.step_failure_data.error.message


# -- faults at every step of a publish to ADLS ------------------------------------------------
# The flow of a day on ADLS, in request order: create/append/flush the staged data, rename it
# to its versioned name, read the old manifest, create/append/flush the staged manifest,
# rename it over _manifest.json (the commit point), list the folder, delete the superseded
# data file. Each fault below makes one of them fail for good (after the SDK's retries).
STEPS = [
    ("create", 1, "old"),  # staging data file
    ("append", 1, "old"),
    ("flush", 1, "old"),  # data
    ("rename", 1, "old"),  # data → versioned name
    ("create", 2, "old"),  # staging manifest
    ("flush", 2, "old"),  # manifest
    ("rename", 2, "old"),  # manifest → _manifest.json: the commit point
    ("list", 1, "new+unlisted"),  # listing the folder after the commit
    ("delete", 1, "new+leftover"),  # the superseded data file
]


@pytest.mark.parametrize("op,nth,ends", STEPS, ids=[f"{o}{n}" for o, n, _ in STEPS])
def test_a_failed_step_leaves_one_consistent_version(orders, adls, project, db, op, nth, ends):
    p = project([TABLE], bronze=adls_bronze(adls))
    assert p.materialize(DAY.isoformat()).success
    old_data, old_manifest = p.read_day(NAME, DAY)

    db.execute("UPDATE pub.orders SET note = 'v2' WHERE id = 1")
    try:
        adls.faults.append(Fault(op, nth=nth, status=500, code="InternalError"))
        result = p.materialize(DAY.isoformat())
    finally:
        adls.faults.clear()
        db.execute("UPDATE pub.orders SET note = NULL WHERE id = 1")
    assert not result.success
    message = failure_message(result)
    assert "pub.orders" in message and DAY.isoformat() in message

    if ends == "old":
        assert "previous version" in message or "_staging" in message or "failed" in message
        assert p.read_day(NAME, DAY) == (old_data, old_manifest)
    else:
        assert "new version is published" in message
        if ends == "new+leftover":
            assert old_manifest["file"] in message
        else:
            assert "could not list" in message
        paths = daily_paths("test", NAME, DAY)
        manifest = json.loads(p.sink().read_bytes(paths.manifest))
        assert manifest["file"] != old_manifest["file"]
        assert manifest["history"][0]["file"] == old_manifest["file"]
        # the manifest describes the file beside it; the leftover is the old version
        new = p.sink().read_bytes(f"{paths.folder}/{manifest['file']}")
        assert b"v2" in gzip.decompress(new)
        # and the next run removes the leftover
        assert p.materialize(DAY.isoformat()).success
        p.read_day(NAME, DAY)
    assert [f for f in adls.files("bronze") if "_staging/" in f] == []


# -- two runs of one day ----------------------------------------------------------------------


def test_a_run_waits_for_the_day_then_fails_naming_the_holder(orders, project, db, pg_conninfo):
    p = project([TABLE], postgres={"lock_timeout_s": 1})
    assert p.materialize(DAY.isoformat()).success
    before = p.read_day(NAME, DAY)
    with psycopg.connect(pg_conninfo, autocommit=True, application_name="other_writer") as holder:
        holder.execute(
            "SELECT pg_advisory_lock(hashtextextended(%s, 0))", (lock_key("test", NAME, DAY),)
        )
        result = p.materialize(DAY.isoformat())
    assert not result.success
    message = failure_message(result)
    assert "table pub.orders, partition 2026-10-07" in message
    assert "another run (other_writer" in message and "postgres.lock_timeout_s" in message
    assert p.read_day(NAME, DAY) == before


def test_concurrent_runs_of_a_day_do_not_interleave(orders, project, db):
    """Two real materializations of the same day at once: both succeed one after the other,
    and the day ends as one of them, its manifest describing its own file."""
    p = project([TABLE], postgres={"lock_timeout_s": 120})
    results: list[object] = []
    barrier = threading.Barrier(2)

    def run() -> None:
        barrier.wait(10)
        results.append(p.materialize(DAY.isoformat()))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(results) == 2 and all(r.success for r in results)  # type: ignore[attr-defined]
    data, manifest = p.read_day(NAME, DAY)  # one data file, described by the manifest
    run_ids = {r.run_id for r in results}  # type: ignore[attr-defined]
    assert manifest["run_id"] in run_ids and manifest["history"][0]["run_id"] in run_ids
    expected = postgres_copy(db, day_query(sql.Identifier("pub", "orders"), "order_date", DAY))
    assert gzip.decompress(data) == expected


# -- the snapshot ----------------------------------------------------------------------------


def test_recorded_snapshot_says_exactly_which_transactions_are_in(orders, project, db, pg_conninfo):
    """A transaction still open when the day's snapshot is taken is not in the file, and
    `txid_snapshot` says so; one committed before is in, and its commit is below the LSN
    bound."""
    p = project([TABLE])
    with psycopg.connect(pg_conninfo) as before:
        insert_orders(before, sql.Identifier("pub", "orders"), DAY, 1, 7_000_000)
        (xid_before,) = before.execute("SELECT pg_current_xact_id()::text").fetchone()
        before.commit()
        (lsn_after_commit,) = before.execute("SELECT pg_current_wal_insert_lsn()").fetchone()
    with psycopg.connect(pg_conninfo) as racing:
        insert_orders(racing, sql.Identifier("pub", "orders"), DAY, 1, 8_000_000)
        (xid_racing,) = racing.execute("SELECT pg_current_xact_id()::text").fetchone()
        result = p.materialize(DAY.isoformat())  # while `racing` is still open
        racing.commit()
    assert result.success
    data, manifest = p.read_day(NAME, DAY)
    ids = {line.split(b",", 1)[0] for line in gzip.decompress(data).splitlines()}
    snap = manifest["snapshot"]
    visible = db.execute(
        "SELECT pg_visible_in_snapshot(%s::xid8, %s::pg_snapshot),"
        " pg_visible_in_snapshot(%s::xid8, %s::pg_snapshot), %s::pg_lsn <= %s::pg_lsn",
        (xid_before, snap["txid_snapshot"], xid_racing, snap["txid_snapshot"],
         lsn_after_commit, snap["lsn_upper_bound"]),
    ).fetchone()  # fmt: skip
    assert visible == (True, False, True)
    assert b"7000001" in ids and b"8000001" not in ids
    db.execute("DELETE FROM pub.orders WHERE id IN (7000001, 8000001)")


# -- names that look like paths ---------------------------------------------------------------

ODD_TABLES = ['"public.a".b', 'public."a.b"', 'public."../../other/public.orders"']


@pytest.fixture(scope="module")
def odd_names(pg_conninfo: str) -> None:
    with psycopg.connect(pg_conninfo, autocommit=True) as c:
        c.execute('CREATE SCHEMA IF NOT EXISTS "public.a"')
        for i, name in enumerate(
            [("public.a", "b"), ("public", "a.b"), ("public", "../../other/public.orders")]
        ):
            t = sql.Identifier(*name)
            c.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(t))
            c.execute(sql.SQL("CREATE TABLE {} (id int, d date)").format(t))
            c.execute(
                sql.SQL("INSERT INTO {} SELECT g, %s FROM generate_series(1, %s) g").format(t),
                (DAY, 10 + i),
            )


@pytest.mark.parametrize("where", ["local", "adls"])
def test_names_that_look_like_paths_get_their_own_folders(odd_names, project, request, where):
    bronze = adls_bronze(request.getfixturevalue("adls")) if where == "adls" else {}
    tables = [{"table": t, "partition_column": "d", "start": "2026-10-01"} for t in ODD_TABLES]
    p = project(tables, bronze=bronze) if bronze else project(tables)
    folders = set()
    for i in range(len(ODD_TABLES)):
        assert p.materialize(DAY.isoformat(), index=i).success
        name = p.config.tables[i].name
        data, manifest = p.read_day(name, DAY)
        assert manifest["rows"] == 10 + i
        folder = table_folder("test", name)
        schema, _, table = folder.split("/", 1)[1].partition(".")
        assert (decode_segment(schema), decode_segment(table)) == (name.schema, name.name)
        folders.add(folder)
    assert len(folders) == 3
    files = p.sink().list_files()
    assert files and all(f.startswith("test/") for f in files)
    assert not any(".." in f.split("/") for f in files)


def test_tables_differing_only_in_case_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"only in letter case"):
        write_config(
            tmp_path / "c.yaml",
            [
                {"table": 'public."Orders"', "partition_column": "d"},
                {"table": "public.orders", "partition_column": "d"},
            ],
        )
