"""Incremental tables against a real PostgreSQL and real Dagster materializations: every batch
is PostgreSQL's own COPY of its bounds, the watermark never passes a transaction that can
still commit, state lives in the lake, and bad configuration fails naming table and key."""

import csv
import datetime as dt
import gzip
import hashlib
import io
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from dagster import DagsterInstance, RunsFilter, build_sensor_context, instance_for_test
from dagster._core.storage.tags import RUN_KEY_TAG, SENSOR_NAME_TAG
from psycopg import sql

from pg_assets.assets.incremental import check_incremental, incremental_key
from pg_assets.build import build_definitions, build_resources
from pg_assets.config import ConfigError, ProjectConfig
from pg_assets.core.incremental import MARGIN_S
from pg_assets.core.layout import incremental_paths
from pg_assets.core.session import connect_kwargs
from pg_assets.sensors.incremental import sensor_name
from pg_assets.sinks.base import Sink
from pg_assets_tests.conftest import postgres_copy, write_config

SCHEMA = "inc"
SETTLE_S = MARGIN_S + 0.2  # rows committed this long ago are below the cap


def table_ident(name: str) -> sql.Identifier:
    return sql.Identifier(SCHEMA, name)


def create_table(
    db: psycopg.Connection, name: str, cursor_type: str = "timestamptz", *, index: bool = True
) -> None:
    """`id`, `val`, `note` (CSV-hostile text) and `updated_at` set by now()."""
    t = table_ident(name)
    db.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(SCHEMA)))
    db.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(t))
    default = "now()" if cursor_type != "date" else "current_date"
    db.execute(
        sql.SQL(
            "CREATE TABLE {} (id bigint PRIMARY KEY, val int NOT NULL, note text, "
            "updated_at {} NOT NULL DEFAULT {}) WITH (autovacuum_enabled = false)"
        ).format(t, sql.SQL(cursor_type), sql.SQL(default))
    )
    if index:
        db.execute(sql.SQL("CREATE INDEX ON {} (updated_at)").format(t))


def insert(conn: psycopg.Connection, name: str, first: int, count: int) -> None:
    conn.execute(
        sql.SQL(
            "INSERT INTO {} (id, val, note) SELECT g, g %% 7, CASE g %% 4 WHEN 0 THEN NULL "
            "WHEN 1 THEN 'say \"hi\", then' WHEN 2 THEN E'two\\nlines' ELSE 'Grüße ' || g END "
            "FROM generate_series(%s::bigint, %s::bigint) g"
        ).format(table_ident(name)),
        (first, first + count - 1),
    )


def xid(conn: psycopg.Connection) -> str:
    (x,) = conn.execute("SELECT pg_current_xact_id()::text").fetchone()  # type: ignore[misc]
    return x


class Inc:
    """A config with incremental tables, its definitions, a persistent Dagster instance, and
    the ways a user (or the daemon) drives them."""

    def __init__(self, config: ProjectConfig, instance: DagsterInstance) -> None:
        self.config = config
        self.defs = build_definitions(config)
        self.instance = instance
        self.repo = self.defs.get_repository_def()

    def asset(self, index: int = 0):
        key = incremental_key(self.config, self.config.tables_of("incremental")[index])
        (a,) = [a for a in self.defs.assets or [] if getattr(a, "key", None) == key]
        return a

    def sensor(self, index: int = 0):
        name = sensor_name(self.asset(index).op.name)
        (s,) = [s for s in self.defs.sensors or [] if s.name == name]
        return s

    def materialize(self, index: int = 0, tags: dict[str, str] | None = None):
        job = self.defs.resolve_implicit_global_asset_job_def()
        return job.execute_in_process(
            instance=self.instance,
            asset_selection=[self.asset(index).key],
            tags=tags,
            raise_on_error=False,
        )

    def tick(self, cursor: str | None, index: int = 0):
        """The sensor evaluated as the daemon does: the repository's resources, the instance,
        the stored cursor."""
        s = self.sensor(index)
        resources = {
            k: v
            for k, v in self.repo.get_top_level_resources().items()
            if k in s.required_resource_keys
        }
        with build_sensor_context(
            instance=self.instance, cursor=cursor, definitions=self.defs, resources=resources
        ) as context:
            return s.evaluate_tick(context)

    def launch(self, request, index: int = 0):
        """A run as the daemon launches it from a RunRequest (tags, run key, selection)."""
        tags = {**request.tags, RUN_KEY_TAG: request.run_key}
        tags[SENSOR_NAME_TAG] = self.sensor(index).name
        job = self.defs.resolve_implicit_global_asset_job_def()
        return job.execute_in_process(
            instance=self.instance,
            asset_selection=request.asset_selection,
            tags=tags,
            raise_on_error=False,
        )

    def sink(self) -> Sink:
        return build_resources(self.config)["bronze"].get_sink()  # type: ignore[attr-defined]

    def batches(self, index: int = 0) -> list[tuple[dict[str, Any], bytes]]:
        return read_batches(self.sink(), self.config, index)


def read_batches(
    sink: Sink, config: ProjectConfig, index: int = 0
) -> list[tuple[dict[str, Any], bytes]]:
    """Every committed batch as a reader finds it: manifests in order, each describing the
    data file beside it (size and sha256 checked), decompressed. Also what every ended run
    must leave: no data file that no manifest names (a glob reader would read it)."""
    paths = incremental_paths(config.source, config.tables_of("incremental")[index].name)
    listed = sink.list_files(paths.folder)
    numbers = sorted(b for f in listed if (b := paths.batch_of_manifest(f)) is not None)
    out = []
    for n in numbers:
        manifest = json.loads(sink.read_bytes(paths.manifest(n)))
        data = sink.read_bytes(f"{paths.folder}/{manifest['file']}")
        assert len(data) == manifest["compressed_bytes"]
        assert hashlib.sha256(data).hexdigest() == manifest["sha256"]
        out.append((manifest, gzip.decompress(data)))
    assert [m["batch"] for m, _ in out] == list(range(len(out))), "batches skipped or repeated"
    named = {f"{paths.folder}/{m['file']}" for m, _ in out}
    orphans = [f for f in listed if paths.version_of(f) is not None and f not in named]
    assert not orphans, f"data files no manifest names: {orphans}"
    return out


def csv_rows(data: bytes) -> tuple[list[str], list[list[str]]]:
    rows = list(csv.reader(io.StringIO(data.decode(), newline="")))
    return rows[0], rows[1:]


def latest_by_key(batches: list[tuple[dict[str, Any], bytes]]) -> dict[str, list[str]]:
    """Each key's row from the newest batch holding it: a snapshot holds one version per key,
    and batches are taken in snapshot order, so this is the current row."""
    current: dict[str, list[str]] = {}
    for _, data in batches:
        header, rows = csv_rows(data)
        for row in rows:
            current[row[header.index("id")]] = row
    return current


def pinned(conninfo: str, **kwargs: Any) -> psycopg.Connection:
    """A connection with pg_assets' pinned session: the reference for byte comparisons."""
    return psycopg.connect(conninfo, **connect_kwargs(10, 0, conninfo), **kwargs)  # type: ignore[arg-type]


def reference_copy(query: sql.Composable, conninfo: str | None = None) -> bytes:
    """PostgreSQL's own COPY of `query`, now, in the pinned session."""
    with pinned(conninfo or os.environ["PG_ASSETS_CONNINFO"], autocommit=True) as c:
        return postgres_copy(c, query)


def table_rows(name: str, conninfo: str | None = None) -> dict[str, list[str]]:
    """The table now, as pinned-session CSV rows by id (`conninfo`: another server)."""
    data = reference_copy(sql.SQL("SELECT * FROM {}").format(table_ident(name)), conninfo)
    header, rows = csv_rows(data)
    return {r[header.index("id")]: r for r in rows}


@pytest.fixture
def pinst() -> Iterator[DagsterInstance]:
    """A persistent instance: sensors need one (build_sensor_context refuses ephemeral)."""
    with instance_for_test() as instance:
        yield instance


@pytest.fixture
def inc(tmp_path: Path, pinst: DagsterInstance):
    def make(tables: list[dict[str, Any]], **overrides: Any) -> Inc:
        full = [{"mode": "incremental", "key": ["id"], **t} for t in tables]
        return Inc(write_config(tmp_path / "pg_assets.yaml", full, **overrides), pinst)

    return make


def materialized(result) -> dict[str, Any] | None:
    assert result.success, [
        e.step_failure_data.error.message
        for e in result.all_events
        if e.event_type_value == "STEP_FAILURE"
    ]
    events = result.get_asset_materialization_events()
    if not events:
        return None
    (event,) = events
    return {k: v.value for k, v in event.materialization.metadata.items()}


def failure_message(result) -> str:
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    return failure.step_failure_data.error.message


# -- byte equality ---------------------------------------------------------------------------


def test_each_batch_is_postgres_copy_of_its_bounds(db, inc, pg_conninfo):
    """Batch 0 is COPY of the whole table; each later batch is byte for byte PostgreSQL's own
    `COPY (SELECT ... WHERE cursor > low AND cursor <= high)`, run afterwards in a snapshot in
    which every transaction that ever wrote the table has the same visibility as in the
    batch's snapshot (so it sees the same rows). A transaction left open across a batch is in
    neither."""
    create_table(db, "exact")
    p = inc([{"table": "inc.exact", "cursor": "updated_at"}])
    writers: list[str] = []

    def write(first: int, count: int, update: bool = False) -> None:
        with psycopg.connect(pg_conninfo) as c:
            insert(c, "exact", first, count)
            if update:
                c.execute("UPDATE inc.exact SET val = val + 100, updated_at = now() WHERE id < 5")
            writers.append(xid(c))

    write(1, 500)
    for round_ in range(3):
        time.sleep(SETTLE_S)
        with psycopg.connect(pg_conninfo) as open_txn:  # open across the batch
            insert(open_txn, "exact", 100_000 + round_, 1)
            writers.append(xid(open_txn))
            materialized(p.materialize())
            batches = p.batches()
            manifest, data = batches[-1]
            with pinned(pg_conninfo) as ref:
                ref.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
                (snap,) = ref.execute("SELECT pg_current_snapshot()::text").fetchone()  # type: ignore[misc]
                same = ref.execute(
                    "SELECT bool_and(pg_visible_in_snapshot(x::xid8, %s::pg_snapshot) = "
                    "pg_visible_in_snapshot(x::xid8, %s::pg_snapshot)) FROM unnest(%s::text[]) x",
                    (snap, manifest["snapshot"]["txid_snapshot"], writers),
                ).fetchone()
                assert same == (True,)
                if manifest["batch"] == 0:
                    assert manifest["select"] is None and manifest["watermark"]["low"] is None
                    query = sql.SQL("SELECT * FROM {}").format(table_ident("exact"))
                else:
                    query = sql.SQL(manifest["select"])  # type: ignore[arg-type]
                    assert manifest["watermark"]["low"] == batches[-2][0]["watermark"]["high"]
                assert data == postgres_copy(ref, query)
            assert f"{100_000 + round_},".encode() not in data  # still uncommitted
            assert manifest["rows"] == len(csv_rows(data)[1])
            open_txn.rollback()
        write(1000 * (round_ + 1), 50, update=True)
    assert [m["rows"] for m, _ in p.batches()] == [500, 50 + 4, 50 + 4]


# -- the cap ---------------------------------------------------------------------------------


@pytest.mark.parametrize("wrote_before", [True, False], ids=["wrote-before", "read-before"])
def test_a_transaction_open_across_a_batch_is_not_lost(db, inc, pg_conninfo, wrote_before):
    """A transaction that began before a batch and commits after it writes `now()` = its start,
    below anything committed since. The batch's high stays below that start, so the next batch
    takes its rows. `read-before`: the transaction has only read when the batch runs, so it
    holds no transaction ID yet (`backend_xid` is NULL), and inserts after the batch."""
    create_table(db, "longtx")
    p = inc([{"table": "inc.longtx", "cursor": "updated_at"}])
    insert(db, "longtx", 1, 10)
    time.sleep(SETTLE_S)
    materialized(p.materialize())  # batch 0
    with psycopg.connect(pg_conninfo, application_name="slow_writer") as slow:
        if wrote_before:
            insert(slow, "longtx", 100, 1)
        else:
            slow.execute("SELECT count(*) FROM inc.longtx")
        (started,) = slow.execute("SELECT now()").fetchone()  # type: ignore[misc]
        insert(db, "longtx", 200, 5)  # committed after the slow transaction began
        time.sleep(SETTLE_S)
        held = materialized(p.materialize())  # while `slow` is open
        if not wrote_before:
            insert(slow, "longtx", 100, 1)
        slow.commit()
    assert held is None  # nothing can be taken: every new row is newer than `slow`'s start
    time.sleep(SETTLE_S)
    meta = materialized(p.materialize())
    assert meta is not None and meta["batch"] == 1 and meta["rows"] == 6
    current = latest_by_key(p.batches())
    assert "100" in current and set(current) == set(table_rows("longtx"))
    # the held run said why, naming the transaction
    logs = [
        r.user_message
        for r in p.instance.all_logs(held_run_id(p))
        if "no batch 1 published" in (r.user_message or "")
    ]
    assert logs and "slow_writer" in logs[0] and started.isoformat()[:19] in logs[0]


def held_run_id(p: Inc) -> str:
    runs = p.instance.get_runs(RunsFilter(), limit=2)
    return runs[1].run_id  # the one before the last


def test_the_cap_in_the_manifest_names_the_oldest_transaction(db, inc, pg_conninfo):
    create_table(db, "capped")
    p = inc([{"table": "inc.capped", "cursor": "updated_at"}])
    insert(db, "capped", 1, 5)
    time.sleep(SETTLE_S)
    materialized(p.materialize())
    with psycopg.connect(pg_conninfo, application_name="report") as reader:
        reader.execute("SELECT 1")  # an open transaction, no writes
        time.sleep(SETTLE_S)
        insert(db, "capped", 10, 5)  # newer than the reader's start: held back
        before = materialized(p.materialize())
        reader.rollback()
    assert before is None
    time.sleep(SETTLE_S)
    assert materialized(p.materialize())["rows"] == 5  # type: ignore[index]
    manifest = p.batches()[1][0]
    assert manifest["cap"]["applied"] and manifest["watermark"]["high"] is not None
    # and when something is open at the time of the batch, the manifest says which
    with psycopg.connect(pg_conninfo, application_name="report2") as reader:
        insert(db, "capped", 20, 5)
        time.sleep(SETTLE_S)
        reader.execute("SELECT 1")  # opened after those rows: it holds back only newer ones
        time.sleep(SETTLE_S)
        meta = materialized(p.materialize())
        reader.rollback()
    assert meta is not None and meta["rows"] == 5
    cap = p.batches()[2][0]["cap"]
    assert cap["oldest_transaction"]["application_name"] == "report2"
    assert "report2" in meta["cap"]


def test_without_visibility_of_other_sessions_a_time_cursor_needs_lookback(
    db, inc, pg_conninfo, monkeypatch
):
    """A role without pg_read_all_stats cannot see other roles' open transactions: without
    `lookback` the run fails saying so (and `check` too); with it, batches run and the
    manifest records that no cap applied."""
    create_table(db, "blind")
    insert(db, "blind", 1, 5)
    db.execute(
        "DO $$ BEGIN CREATE ROLE inc_reader LOGIN; "
        "EXCEPTION WHEN duplicate_object THEN NULL; END $$"
    )
    db.execute("GRANT USAGE ON SCHEMA inc TO inc_reader")
    db.execute("GRANT SELECT ON inc.blind TO inc_reader")
    monkeypatch.setenv(
        "INC_READER_CONNINFO", pg_conninfo.replace("user=postgres", "user=inc_reader")
    )
    pg = {"conninfo_env": "INC_READER_CONNINFO"}
    p = inc([{"table": "inc.blind", "cursor": "updated_at"}], postgres=pg)
    message = failure_message(p.materialize())
    assert "table inc.blind, batch 0" in message and "pg_read_all_stats" in message
    assert "'lookback'" in message
    with pytest.raises(ConfigError, match=r"table 'inc.blind'.*key 'lookback'.*pg_read_all_stats"):
        check_incremental(p.config)
    p = inc([{"table": "inc.blind", "cursor": "updated_at", "lookback": "10 minutes"}], postgres=pg)
    assert materialized(p.materialize())["rows"] == 5  # type: ignore[index]
    cap = p.batches()[0][0]["cap"]
    assert cap["applied"] is False and "pg_read_all_stats" in cap["reason"]
    assert any("pg_read_all_stats" in line for line in check_incremental(p.config))


# -- state in the lake -----------------------------------------------------------------------


def test_state_lives_in_the_lake(db, inc, tmp_path):
    """A new Dagster instance (the old one wiped) continues from the lake's watermark; a batch
    whose manifest never landed (a crash before the commit point) is written again under the
    same number, as its next version, and the orphan is removed once it commits; a codec change
    leaves one data file per batch."""
    create_table(db, "state")
    p = inc([{"table": "inc.state", "cursor": "updated_at"}])
    insert(db, "state", 1, 10)
    time.sleep(SETTLE_S)
    materialized(p.materialize())
    insert(db, "state", 11, 10)
    time.sleep(SETTLE_S)
    materialized(p.materialize())
    with instance_for_test() as fresh:
        q = Inc(p.config, fresh)
        insert(db, "state", 21, 10)
        time.sleep(SETTLE_S)
        meta = materialized(q.materialize())
        assert meta is not None and meta["batch"] == 2 and meta["rows"] == 10
        # crash before the manifest of batch 2: its data file stays, its manifest is gone
        paths = incremental_paths("test", p.config.tables[0].name)
        sink = q.sink()
        sink.delete(paths.manifest(2))
        assert sink.stat(paths.data(2, 0, ".gz")) is not None
        insert(db, "state", 31, 10)
        time.sleep(SETTLE_S)
        meta = materialized(q.materialize())
        assert meta is not None and meta["batch"] == 2 and meta["rows"] == 20
    batches = p.batches()
    assert [m["rows"] for m, _ in batches] == [10, 10, 20]
    assert batches[2][0]["watermark"]["low"] == batches[1][0]["watermark"]["high"]
    assert latest_by_key(batches) == table_rows("state")
    # another codec: the same batch numbering continues, one data file per batch
    zp = inc([{"table": "inc.state", "cursor": "updated_at"}], bronze={"codec": "zstd"})
    insert(db, "state", 41, 5)
    time.sleep(SETTLE_S)
    assert materialized(zp.materialize())["batch"] == 3  # type: ignore[index]
    files = [f for f in zp.sink().list_files(paths.folder) if not f.endswith(".json")]
    assert [f.rsplit("/", 1)[1] for f in files] == [
        "state-000000-0.csv.gz", "state-000001-0.csv.gz", "state-000002-1.csv.gz",
        "state-000003-0.csv.zst",
    ]  # fmt: skip


# -- other cursors ---------------------------------------------------------------------------


def test_integer_cursor_with_lookback_and_batch_max_rows(db, inc):
    """An integer cursor (a sequence): high = max(id); lookback rereads the last N values;
    batch_max_rows splits a backlog into batches without splitting a cursor value."""
    create_table(db, "seq")
    p = inc([{"table": "inc.seq", "cursor": "id", "lookback": 3, "batch_max_rows": 40}])
    insert(db, "seq", 1, 100)
    meta = materialized(p.materialize())
    assert meta["rows"] == 100 and meta["watermark_high"] == "100"  # type: ignore[index]
    insert(db, "seq", 101, 100)
    for _ in range(3):
        materialized(p.materialize())
    assert materialized(p.materialize()) is None  # caught up
    batches = p.batches()
    marks = [(m["watermark"]["low"], m["watermark"]["high"], m["rows"]) for m, _ in batches]
    assert marks == [(None, "100", 100), ("97", "140", 43), ("137", "180", 43), ("177", "200", 23)]
    for m, data in batches[1:]:
        assert data == reference_copy(sql.SQL(m["select"]))  # nothing changed since
    assert latest_by_key(batches) == table_rows("seq")


@pytest.mark.parametrize("cursor_type", ["timestamp", "date"])
def test_timestamp_and_date_cursors(db, inc, cursor_type):
    """`timestamp` and `date` cursors: the cap is converted in `timezone`; a date cursor's high
    stays a day behind today, so today's rows come again with the next batch."""
    create_table(db, f"c_{cursor_type}", cursor_type)
    p = inc([{"table": f"inc.c_{cursor_type}", "cursor": "updated_at", "lookback": "1 day"}])
    db.execute("SET TimeZone = 'UTC'")
    insert(db, f"c_{cursor_type}", 1, 10)
    db.execute(
        sql.SQL("UPDATE {} SET updated_at = updated_at - interval '3 days' WHERE id <= 5").format(
            table_ident(f"c_{cursor_type}")
        )
    )
    time.sleep(SETTLE_S)
    first = materialized(p.materialize())
    assert first is not None and first["rows"] == 10
    manifest = p.batches()[0][0]
    high = manifest["watermark"]["high"]
    today = dt.datetime.now(dt.UTC).date().isoformat()
    if cursor_type == "date":
        assert high < today  # today's rows may still be written: not taken as done
    else:
        assert high.startswith(today)
    insert(db, f"c_{cursor_type}", 11, 3)
    if cursor_type == "date":
        time.sleep(SETTLE_S)
        assert materialized(p.materialize()) is None  # today is not over
        db.execute("UPDATE inc.c_date SET updated_at = current_date - 1 WHERE id > 10")
    time.sleep(SETTLE_S)
    meta = materialized(p.materialize())
    assert meta is not None
    m, data = p.batches()[-1]
    assert data == reference_copy(sql.SQL(m["select"]))
    assert latest_by_key(p.batches()) == table_rows(f"c_{cursor_type}")


# -- bad configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "entry,key,fragment",
    [
        ({"cursor": "updatd_at"}, "cursor", "has no column 'updatd_at' (columns: id, val"),
        ({"cursor": "note"}, "cursor", "has type text, which cannot be a cursor"),
        ({"cursor": "updated_at", "key": ["id", "nope"]}, "key", "has no column 'nope'"),
        ({"cursor": "updated_at", "lookback": 5}, "lookback", "an interval such as"),
        ({"cursor": "updated_at", "lookback": "soon"}, "lookback", "not a non-negative interval"),
        ({"cursor": "id", "lookback": "5 minutes"}, "lookback", "a count of cursor values"),
    ],
    ids=[
        "unknown-column",
        "text-cursor",
        "unknown-key",
        "int-lookback",
        "bad-interval",
        "str-count",
    ],
)
def test_bad_config_fails_naming_table_and_key(db, inc, entry, key, fragment):
    create_table(db, "bad")
    p = inc([{"table": "inc.bad", **entry}])
    message = failure_message(p.materialize())
    assert "table inc.bad, incremental batch: " in message
    assert fragment in message and f"(config key '{key}')" in message
    with pytest.raises(ConfigError) as e:
        check_incremental(p.config)
    assert f"table 'inc.bad': key '{key}': " in str(e.value) and fragment in str(e.value)
    assert p.batches() == []


def test_no_index_on_the_cursor_warns(db, inc):
    create_table(db, "noidx", index=False)
    insert(db, "noidx", 1, 3)
    p = inc([{"table": "inc.noidx", "cursor": "updated_at"}])
    lines = check_incremental(p.config)
    assert lines[0].startswith("inc.noidx: incremental on updated_at (timestamp with time zone)")
    assert any("no btree index starts with cursor column 'updated_at'" in x for x in lines)
    result = p.materialize()
    materialized(result)
    warnings = [
        r.user_message
        for r in p.instance.all_logs(result.run_id)
        if r.level == 30 and "scans the whole table" in (r.user_message or "")
    ]
    assert warnings and "CREATE INDEX ON inc.noidx (updated_at)" in warnings[0]


def test_a_second_run_waits_for_the_table_then_fails_naming_the_holder(db, inc, pg_conninfo):
    create_table(db, "busy")
    p = inc([{"table": "inc.busy", "cursor": "updated_at"}], postgres={"lock_timeout_s": 1})
    spec_key = "pg_assets:test/inc.busy:incremental"
    with psycopg.connect(pg_conninfo, autocommit=True, application_name="other_run") as holder:
        holder.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", (spec_key,))
        message = failure_message(p.materialize())
    assert "table inc.busy, incremental batch" in message
    assert "another run (other_run" in message and "postgres.lock_timeout_s" in message
    assert p.batches() == []


# -- a concurrent writer, the sensor and its runs --------------------------------------------


class Writer(threading.Thread):
    """Inserts and updates in small transactions until stopped; records every committed
    version as (id, updated_at)."""

    def __init__(self, conninfo: str, name: str, first_id: int) -> None:
        super().__init__(daemon=True)
        self.conninfo, self.table, self.next_id = conninfo, name, first_id
        self.versions: set[tuple[int, dt.datetime]] = set()
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with psycopg.connect(self.conninfo) as c:
                t = table_ident(self.table)
                while not self.stop.is_set():
                    with c.transaction():
                        rows = c.execute(
                            sql.SQL(
                                "INSERT INTO {} (id, val, note) SELECT g, 0, 'w' || g "
                                "FROM generate_series(%s::bigint, %s::bigint) g "
                                "RETURNING id, updated_at"
                            ).format(t),
                            (self.next_id, self.next_id + 2),
                        ).fetchall()
                        rows += c.execute(
                            sql.SQL(
                                "UPDATE {t} SET val = val + 1, updated_at = now() WHERE id IN "
                                "(SELECT id FROM {t} ORDER BY random() LIMIT 2) "
                                "RETURNING id, updated_at"
                            ).format(t=t)
                        ).fetchall()
                    self.next_id += 3
                    self.versions.update(rows)
                    time.sleep(0.02)
        except BaseException as e:
            self.error = e


def test_concurrent_writer_sensor_and_runs_lose_nothing(db, inc, pg_conninfo):
    """A writer inserts and updates throughout; two long transactions — one that inserted with
    now() before a batch, one that had only read — commit after batches ran. The sensor is
    evaluated as the daemon would and its run requests are launched. In the end every current
    row is in Bronze (each key's newest batch holds the table's row, byte for byte), every
    batch row is a committed version, and batches chain low = previous high."""
    create_table(db, "live")
    insert(db, "live", 1, 50)
    p = inc([{"table": "inc.live", "cursor": "updated_at"}])
    initial = final_versions(db)
    writer = Writer(pg_conninfo, "live", 1000)
    long1 = psycopg.connect(pg_conninfo, application_name="long_insert")
    long2 = psycopg.connect(pg_conninfo, application_name="long_read")
    cursor: str | None = None
    runs, skips = 0, []
    writer.start()
    try:
        for i in range(10):
            if i == 2:
                insert(long1, "live", 500_000, 2)
                long2.execute("SELECT count(*) FROM inc.live")
                for c, k in (
                    (long1, "500000"),
                    (long1, "500001"),
                    (long2, "600000"),
                    (long2, "600001"),
                ):
                    (now,) = c.execute("SELECT now()").fetchone()  # type: ignore[misc]
                    initial.add((k, now))
            if i == 6:
                insert(long2, "live", 600_000, 2)
                long1.commit()
                long2.commit()
            data = p.tick(cursor)
            cursor = data.cursor
            for request in data.run_requests:
                materialized(p.launch(request))
                runs += 1
            if data.skip_message:
                skips.append(data.skip_message)
            time.sleep(0.4)
    finally:
        writer.stop.set()
        writer.join(30)
        long1.close()
        long2.close()
    assert writer.error is None
    time.sleep(SETTLE_S)
    for _ in range(5):  # catch up after the writer stopped
        data = p.tick(cursor)
        cursor = data.cursor
        if not data.run_requests:
            break
        for request in data.run_requests:
            materialized(p.launch(request))
            runs += 1
    assert "no row above the watermark" in (data.skip_message or "")
    assert runs >= 3
    assert any("none can be taken yet" in s and "long_insert" in s for s in skips), skips

    batches = p.batches()
    for (prev, _), (m, _) in zip(batches, batches[1:], strict=False):
        assert m["watermark"]["low"] == prev["watermark"]["high"]
    current = latest_by_key(batches)
    assert current == table_rows("live")
    for extra in ("500000", "500001", "600000", "600001"):
        assert extra in current
    versions = {(str(i), ts) for i, ts in writer.versions} | initial
    for _, data_ in batches:
        header, rows = csv_rows(data_)
        for row in rows:
            stamp = dt.datetime.fromisoformat(row[header.index("updated_at")])
            assert (row[0], stamp) in versions, f"{row} was never committed"


def final_versions(db: psycopg.Connection) -> set[tuple[str, dt.datetime]]:
    rows = db.execute("SELECT id::text, updated_at FROM inc.live").fetchall()
    return {(i, ts) for i, ts in rows}


def test_quoted_names_generated_columns_and_adls(db, inc, adls):
    """A table whose names need quoting, with a generated column (which `COPY t (cols) TO`
    refuses), landed on ADLS Gen2 through the real SDK: batch 0 and batch 1 are PostgreSQL's
    own COPY, in their own folder."""
    from pg_assets_tests.conftest import adls_bronze

    db.execute('CREATE SCHEMA IF NOT EXISTS "Sales Dept"')
    db.execute('DROP TABLE IF EXISTS "Sales Dept"."Order.Lines"')
    db.execute(
        'CREATE TABLE "Sales Dept"."Order.Lines" ("Line Id" bigint PRIMARY KEY, qty int, '
        'total int GENERATED ALWAYS AS (qty * 2) STORED, "Updated At" timestamptz NOT NULL '
        "DEFAULT now())"
    )
    db.execute('CREATE INDEX ON "Sales Dept"."Order.Lines" ("Updated At")')
    db.execute('INSERT INTO "Sales Dept"."Order.Lines" ("Line Id", qty) VALUES (1, 1), (2, 2)')
    p = inc(
        [{"table": '"Sales Dept"."Order.Lines"', "cursor": '"Updated At"', "key": ['"Line Id"']}],
        bronze=adls_bronze(adls),
    )
    time.sleep(SETTLE_S)
    first = materialized(p.materialize())
    assert first is not None and first["rows"] == 2
    t = sql.Identifier("Sales Dept", "Order.Lines")
    assert p.batches()[0][1] == reference_copy(sql.SQL("SELECT * FROM {}").format(t))
    db.execute(
        'UPDATE "Sales Dept"."Order.Lines" SET qty = 5, "Updated At" = now() WHERE "Line Id" = 2'
    )
    time.sleep(SETTLE_S)
    assert materialized(p.materialize())["rows"] == 1  # type: ignore[index]
    (m0, _), (m1, d1) = p.batches()
    assert d1 == reference_copy(sql.SQL(m1["select"]))
    assert b"2,5,10," in d1
    assert m0["table"] == '"Sales Dept"."Order.Lines"'
    assert m0["uri"].endswith(
        "/lake/test/Sales Dept.Order~2ELines/incremental/Order~2ELines-000000-0.csv.gz"
    )
    assert [f for f in adls.files("bronze") if "_staging/" in f] == []


@pytest.mark.parametrize("kind", ["VIEW", "MATERIALIZED VIEW"])
def test_views_land_too(db, inc, kind):
    """A view or materialized view as the source: COPY of a SELECT on it (COPY refuses both
    as relations), no index to probe (a warning), batches as for a table."""
    db.execute("DROP VIEW IF EXISTS inc.v_under")
    db.execute("DROP MATERIALIZED VIEW IF EXISTS inc.v_under")
    create_table(db, "under")
    insert(db, "under", 1, 20)
    db.execute(
        sql.SQL("CREATE {} inc.v_under AS SELECT * FROM inc.under WHERE val < 5").format(
            sql.SQL(kind)
        )
    )
    p = inc([{"table": "inc.v_under", "cursor": "updated_at"}])
    time.sleep(SETTLE_S)
    meta = materialized(p.materialize())
    (m, data), *_ = p.batches()
    expected = reference_copy(sql.SQL("SELECT * FROM inc.v_under"))
    assert data == expected and meta is not None
    assert meta["rows"] == len(csv_rows(expected)[1]) == 14
    assert any("no btree index" in line for line in check_incremental(p.config))
