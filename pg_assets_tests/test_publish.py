"""The publish protocol under faults and races: a day ends as the old version with its own
manifest or the new version with its own manifest, never a mix, never a gap; two runs of a
day never interleave; names that look like paths stay in their own folders; the recorded
snapshot is exact."""

import datetime as dt
import gzip
import json
import subprocess
import sys
import threading
import time

import psycopg
import pytest
from psycopg import sql

from pg_assets.config import ConfigError
from pg_assets.core.extract import lock_key
from pg_assets.core.identifiers import QualifiedName
from pg_assets.core.layout import daily_paths, decode_segment, table_folder
from pg_assets.dev.demo_data import create_daily_partitioned, insert_orders
from pg_assets.sinks.base import PreconditionFailed
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
    # (op, nth, mode, how the day ends, what the failure says)
    ("create", 1, "fail", "old", "ADLS create of"),  # staging data file
    ("append", 1, "fail", "old", "ADLS append of"),
    ("flush", 1, "fail", "old", "ADLS flush of"),  # data
    ("rename", 1, "fail", "old", "ADLS rename"),  # data → versioned name
    ("create", 2, "fail", "old", "previous version stays published"),  # staging manifest
    ("flush", 2, "fail", "old", "previous version stays published"),  # manifest
    ("rename", 2, "fail", "old", "previous version stays published"),  # the commit point
    ("list", 1, "fail", "new+unlisted", "could not list"),  # after the commit
    ("delete", 1, "fail", "new+leftover", "could not be removed"),  # the superseded file
    # a lost response: the request was applied, its answer never came
    ("flush", 1, "lost", "new", ""),
    ("rename", 1, "lost", "new", ""),
    ("create", 2, "lost", "new", ""),
    ("rename", 2, "lost", "new", ""),
    ("delete", 1, "lost", "new", ""),
]


@pytest.mark.parametrize(
    "op,nth,mode,ends,says", STEPS, ids=[f"{o}{n}-{m}" for o, n, m, _, _ in STEPS]
)
def test_a_failed_or_lost_step_leaves_one_consistent_version(
    orders, adls, project, db, op, nth, mode, ends, says
):
    p = project([TABLE], bronze=adls_bronze(adls))
    assert p.materialize(DAY.isoformat()).success
    old_data, old_manifest = p.read_day(NAME, DAY)

    db.execute("UPDATE pub.orders SET note = 'v2' WHERE id = 1")
    try:
        adls.faults.append(Fault(op, nth=nth, mode=mode, times=1 if mode == "lost" else 10**9))
        result = p.materialize(DAY.isoformat())
        assert adls.faults[0].hits >= 1, "the fault never fired"
    finally:
        adls.faults.clear()
        db.execute("UPDATE pub.orders SET note = NULL WHERE id = 1")
    if ends == "new":  # recognised as done: the run succeeds with the new version
        assert result.success
        data, manifest = p.read_day(NAME, DAY)
        assert b"v2" in gzip.decompress(data)
        assert manifest["history"][0]["file"] == old_manifest["file"]
        return
    assert not result.success
    message = failure_message(result)
    assert "table pub.orders, partition 2026-10-07" in message and says in message
    if ends == "old":
        assert p.read_day(NAME, DAY) == (old_data, old_manifest)
    else:
        assert "new version is published" in message
        if ends == "new+leftover":
            assert old_manifest["file"] in message
        # the day IS committed: its materialization is recorded with the new version's facts
        (mat,) = result.get_asset_materialization_events()
        assert mat.materialization.partition == DAY.isoformat()
        committed = json.loads(p.sink().read_bytes(daily_paths("test", NAME, DAY).manifest))
        assert mat.materialization.metadata["sha256"].value == committed["sha256"]
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


def test_the_snapshot_is_not_held_while_publishing(orders, adls, project, pg_conninfo):
    """The day's transaction ends with the COPY: while the publish hangs on the lake, the
    extraction's session is idle, not idle in transaction (holding back vacuum)."""
    p = project([TABLE], bronze=adls_bronze(adls, timeout_s=10))
    fault = Fault("rename", nth=1, mode="hang", delay=3, times=1)
    adls.faults.append(fault)
    outcome: list[object] = []
    run = threading.Thread(target=lambda: outcome.append(p.materialize(DAY.isoformat())))
    run.start()
    states = set()
    with psycopg.connect(pg_conninfo, autocommit=True) as c:
        deadline = time.monotonic() + 60
        while fault.hits == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert fault.hits == 1, "the publish never reached the rename"
        for _ in range(20):  # well inside the 3 s the rename hangs
            states |= {
                row[0]
                for row in c.execute(
                    "SELECT state FROM pg_stat_activity WHERE application_name LIKE 'pg_assets%'"
                )
            }
            time.sleep(0.05)
    run.join(120)
    adls.faults.clear()
    assert outcome and outcome[0].success  # type: ignore[attr-defined]
    assert states == {"idle"}, states


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


MATERIALIZE = """
import json, sys
from dagster import DagsterInstance, materialize
from pg_assets.build import build_definitions, build_resources
from pg_assets.config import load_config
config = load_config(sys.argv[1])
asset = next(a for a in build_definitions(config).assets if a.key.path[-1] == "orders")
with DagsterInstance.ephemeral() as instance:
    r = materialize([asset], partition_key=sys.argv[2], resources=build_resources(config),
                    instance=instance, raise_on_error=False)
print(json.dumps({"success": r.success, "run_id": r.run_id}))
"""


def test_concurrent_runs_of_a_day_do_not_interleave(orders, project, db):
    """Two real materializations of the same day, in two processes, released at the same
    instant: they run one after the other, both succeed, and the day ends as the second,
    its manifest describing its own file and naming the first as the version it replaced."""
    p = project([TABLE], postgres={"lock_timeout_s": 120})
    key = lock_key("test", NAME, DAY)
    with psycopg.connect(db.info.dsn, autocommit=True) as gate:
        gate.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", (key,))
        runs = [
            subprocess.Popen(
                [sys.executable, "-c", MATERIALIZE, str(p.config.path), DAY.isoformat()],
                stdout=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for _ in range(2)
        ]
        deadline = time.monotonic() + 120
        while waiting_for(db, key) < 2:  # both runs queue on the day's lock
            assert time.monotonic() < deadline, "the runs never waited for the day's lock"
            assert all(r.poll() is None for r in runs), "a run ended without waiting"
            time.sleep(0.1)
        gate.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (key,))
    outcomes = [json.loads(r.communicate(timeout=300)[0].strip().splitlines()[-1]) for r in runs]
    assert all(o["success"] for o in outcomes)
    data, manifest = p.read_day(NAME, DAY)  # one data file, described by the manifest
    run_ids = {o["run_id"] for o in outcomes}
    assert manifest["run_id"] in run_ids and manifest["history"][0]["run_id"] in run_ids
    assert manifest["run_id"] != manifest["history"][0]["run_id"]
    expected = postgres_copy(db, day_query(sql.Identifier("pub", "orders"), "order_date", DAY))
    assert gzip.decompress(data) == expected


def waiting_for(db: psycopg.Connection, key: str) -> int:
    """Backends waiting on the advisory lock `key`."""
    (n,) = db.execute(
        """SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted
             AND ((classid::bigint << 32) | objid::bigint) = hashtextextended(%s, 0)""",
        (key,),
    ).fetchone()
    return n


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


def test_sql_in_quoted_names_is_data_not_code(project, db):
    """A table and a column whose quoted names hold SQL are extracted like any other (the
    names reach COPY as identifiers), nothing else is touched, and every message, metadata
    value and manifest prints them quoted as PostgreSQL would."""
    table = 'public."flights; DROP TABLE public.victim_2; --"'
    column = '"d) OR (1=1; DROP TABLE public.victim_2"'
    t = sql.Identifier("public", "flights; DROP TABLE public.victim_2; --")
    c = sql.Identifier(name_of(column))
    db.execute("DROP TABLE IF EXISTS public.victim_2")
    db.execute("CREATE TABLE public.victim_2 (x int)")
    db.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(t))
    db.execute(sql.SQL("CREATE TABLE {} (id int, {} date)").format(t, c))
    db.execute(
        sql.SQL("INSERT INTO {} SELECT g, %s FROM generate_series(1, 5) g").format(t), (DAY,)
    )
    p = project([{"table": table, "partition_column": column, "start": "2026-10-01"}])
    result = p.materialize(DAY.isoformat())
    assert result.success
    name = p.config.tables[0].name
    data, manifest = p.read_day(name, DAY)
    expected = postgres_copy(db, day_query(name.identifier, name_of(column), DAY))
    assert gzip.decompress(data) == expected and manifest["rows"] == 5
    assert db.execute("SELECT to_regclass('public.victim_2')").fetchone()[0] is not None
    assert manifest["table"] == table == str(name)
    assert p.metadata(result)["source_relation"] == table
    db.execute(sql.SQL("DROP TABLE {}").format(t))
    db.execute("DROP TABLE public.victim_2")


def name_of(quoted: str) -> str:
    return quoted[1:-1].replace('""', '"')


# -- a run that lost its lock --------------------------------------------------------------


@pytest.mark.parametrize("where", ["local", "adls"])
def test_commit_is_a_compare_and_swap(request, tmp_path, where):
    """A manifest is replaced only if it is still the one the writer read."""
    if where == "adls":
        server = request.getfixturevalue("adls")
        request.getfixturevalue("monkeypatch").setenv("CAS_KEY", server.key)
        from pg_assets.sinks.adls import AdlsSink

        sink = AdlsSink.from_uri(
            "abfss://bronze@devstoreaccount1.dfs.core.windows.net/cas", auth="account_key",
            secret_env="CAS_KEY", endpoint=server.url, create_filesystem=True, max_retries=0,
        )  # fmt: skip
    else:
        from pg_assets.sinks.local import LocalSink

        sink = LocalSink(tmp_path)
    rel = "t/date=2026-10-07/_manifest.json"
    first = sink.write_bytes("r1", rel, b"v1", "application/json", if_none_match=True)
    with pytest.raises(PreconditionFailed, match="another writer committed"):
        sink.write_bytes("r2", rel, b"v2?", "application/json", if_none_match=True)
    assert sink.read_bytes(rel) == b"v1" and sink.stat(rel).etag == first.etag
    second = sink.write_bytes("r3", rel, b"v2", "application/json", if_match=first.etag)
    assert second.etag != first.etag
    with pytest.raises(PreconditionFailed):  # a writer still holding v1's etag
        sink.write_bytes("r4", rel, b"stale", "application/json", if_match=first.etag)
    assert sink.read_bytes(rel) == b"v2"
    assert [f for f in sink.list_files() if "_staging" in f or "_locks" in f] == []


def test_a_run_that_lost_its_lock_cannot_commit_over_another(orders, adls, project, db):
    """Run A's session (and with it the day's lock) dies while A uploads its manifest; run B
    takes the day and commits. A's late commit must not replace B's version, and nothing A
    does after may remove B's file: the day ends as B's version with its own manifest."""
    p = project([TABLE], bronze=adls_bronze(adls), postgres={"lock_timeout_s": 30})
    assert p.materialize(DAY.isoformat()).success
    fault = Fault("rename", path="_manifest.json", mode="hang", delay=20, times=1)
    adls.faults.append(fault)
    a = subprocess.Popen(
        [sys.executable, "-c", MATERIALIZE, str(p.config.path), DAY.isoformat()],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while fault.hits == 0:  # A is committing: its manifest rename hangs
            assert time.monotonic() < deadline and a.poll() is None, "A never reached its commit"
            time.sleep(0.05)
        (killed,) = db.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name LIKE 'pg_assets run %'"
        ).fetchone()
        assert killed >= 1
        b = p.materialize(DAY.isoformat())  # B: the day's lock is free again
        assert b.success
        outcome_a = json.loads(a.communicate(timeout=180)[0].strip().splitlines()[-1])
    finally:
        if a.poll() is None:
            a.kill()
        adls.faults.clear()
    assert not outcome_a["success"]
    data, manifest = p.read_day(NAME, DAY)  # one data file, described by its manifest
    assert manifest["run_id"] == b.run_id
    expected = postgres_copy(db, day_query(sql.Identifier("pub", "orders"), "order_date", DAY))
    assert gzip.decompress(data) == expected


def test_a_commit_that_cannot_be_checked_deletes_nothing(orders, adls, project):
    """The manifest's rename happens but its answer is lost, and reading the lake back fails
    too: the run cannot tell whether it committed, so it must not delete the data file a
    committed manifest may name; the next run settles the day."""
    p = project([TABLE], bronze=adls_bronze(adls))
    assert p.materialize(DAY.isoformat()).success
    adls.faults += [
        Fault("rename", path="_manifest.json", mode="lost", times=1),
        # after the run's first look at the manifest (nth=2): every check of the commit fails
        Fault("props", nth=2, path="_manifest.json", status=503, code="ServerBusy", times=20),
        Fault("read", nth=2, path="_manifest.json", status=503, code="ServerBusy", times=20),
    ]
    result = p.materialize(DAY.isoformat())
    adls.faults.clear()
    assert not result.success
    assert "could not be read back" in failure_message(result)
    paths = daily_paths("test", NAME, DAY)
    manifest = json.loads(p.sink().read_bytes(paths.manifest))
    assert f"{paths.folder}/{manifest['file']}" in p.sink().list_files(paths.folder)
    assert p.materialize(DAY.isoformat()).success  # the next run leaves one clean version
    p.read_day(NAME, DAY)


def test_a_check_that_cannot_run_fails_its_evaluation_not_the_day(orders, adls, project):
    """Reading the new file back fails (the store answers 503): the day is published and
    materialized, the read-back check's evaluation fails saying it could not run."""
    p = project([TABLE], bronze=adls_bronze(adls))
    adls.faults.append(Fault("read", path=".csv.gz", status=503, code="ServerBusy", times=50))
    result = p.materialize(DAY.isoformat())
    adls.faults.clear()
    assert result.success
    (mat,) = result.get_asset_materialization_events()
    assert mat.materialization.partition == DAY.isoformat()
    evaluations = {
        e.asset_check_evaluation_data.check_name: e.asset_check_evaluation_data
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
    }
    readable = evaluations["bronze_readable"]
    assert not readable.passed and "could not run" in readable.description
    assert evaluations["matches_source"].passed
