"""Slot and snapshot: a COPY at the slot's exported snapshot plus every change after its
consistent point replays to exactly the final table, with writers running throughout; tables
added later are snapshotted through a temporary slot; advance, health, lost slots; and the
checks `pg-assets check` runs, one line per problem."""

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from psycopg import IsolationLevel, sql

from pg_assets.core.cdc import slot as cdc_slot
from pg_assets.core.cdc.lsn import lsn_hex
from pg_assets.core.cdc.reader import PINNED_SETTINGS, CdcError
from pg_assets.core.cdc.snapshot import take_snapshots
from pg_assets.core.compression import get_codec
from pg_assets.core.identifiers import QualifiedName
from pg_assets.sinks.local import LocalSink
from pg_assets_tests.cdc_support import (  # noqa: F401
    Writer,
    cdc_env,
    cdc_names,
    lose_slot,
    pinned_copy,
    raw_records,
    read,
    replay,
    wait_flushed,
)


def _snapshot_copy(conninfo: str, snap: cdc_slot.ExportedSnapshot, table: sql.Composable) -> bytes:
    with psycopg.connect(conninfo) as c:
        c.isolation_level = IsolationLevel.REPEATABLE_READ
        out = bytearray()
        with c.transaction():
            cdc_slot.import_snapshot(c, snap)
            for k, v in PINNED_SETTINGS.items():
                c.execute("SELECT set_config(%s, %s, true)", [k, v])
            with c.cursor().copy(
                sql.SQL("COPY (SELECT * FROM {}) TO STDOUT (FORMAT csv, HEADER)").format(table)
            ) as cp:
                for chunk in cp:
                    out += chunk
        return bytes(out)


def _drain(conninfo: str, slot: str, pub: str, max_messages: int = 500) -> list:
    """Every pending batch, advancing after each (as a run would once it is durable)."""
    batches = []
    with psycopg.connect(conninfo) as reader, psycopg.connect(conninfo, autocommit=True) as c:
        while True:
            batch, files = read(reader, slot, pub, max_messages=max_messages)
            if batch.empty:
                return batches
            if batches:
                assert batch.start_lsn == batches[-1][0].end_lsn  # contiguous
            batches.append((batch, files))
            cdc_slot.advance_slot(c, slot, batch.end_lsn)


def _final(db: psycopg.Connection, table: sql.Composable) -> tuple[list[bytes], dict]:
    recs = raw_records(pinned_copy(db, sql.SQL("SELECT * FROM {}").format(table)))
    return recs[0], {(r[0],): r for r in recs[1:]}


def _make_table(db, s: str, name: str, rows: int = 3000) -> sql.Composable:
    t = sql.Identifier(s, name)
    db.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, v text, n int)").format(t))
    db.execute(
        sql.SQL("INSERT INTO {} SELECT g, md5(g::text), 0 FROM generate_series(1, %s) g").format(t),
        [rows],
    )
    return t


def test_snapshot_plus_changes_is_the_table(db, cdc_env, pg_conninfo):  # noqa: F811
    s, slot, pub = cdc_env
    t = _make_table(db, s, "live")
    cdc_slot.ensure_publication(db, pub, [QualifiedName(s, "live")])
    writer = Writer(pg_conninfo, t, seed=1)
    writer.start()
    try:
        time.sleep(0.3)
        with cdc_slot.exported_snapshot(pg_conninfo, slot) as snap:
            assert snap.slot == slot and snap.snapshot_name
            snapshot = _snapshot_copy(pg_conninfo, snap, t)
            with pytest.raises(cdc_slot.SlotExistsError):
                with cdc_slot.exported_snapshot(pg_conninfo, slot):
                    pass
        time.sleep(0.5)
    finally:
        transactions = writer.finish()
    wait_flushed(db)
    health = cdc_slot.slot_health(db, slot)
    assert health is not None and health.confirmed_flush_lsn == snap.consistent_lsn
    batches = _drain(pg_conninfo, slot, pub)
    assert batches[0][0].start_lsn == snap.consistent_lsn
    assert all(b.first_commit_lsn >= snap.consistent_lsn for b, _ in batches)
    changes = [f.data(s, "live") for _, f in batches if f.files]
    header, replayed = replay(snapshot, changes, ["id"])
    final_header, final = _final(db, t)
    assert transactions > 20 and sum(b.transactions for b, _ in batches) > 10
    assert header == final_header
    assert replayed == final


def test_a_table_added_later_is_snapshotted_through_a_temporary_slot(db, cdc_env, pg_conninfo):  # noqa: F811
    s, slot, pub = cdc_env
    _make_table(db, s, "first", rows=10)
    later = _make_table(db, s, "later")
    cdc_slot.ensure_publication(db, pub, [QualifiedName(s, "first")])
    assert cdc_slot.ensure_slot(db, slot) and not cdc_slot.ensure_slot(db, slot)
    writer = Writer(pg_conninfo, later, seed=2)
    writer.start()
    try:
        time.sleep(0.3)
        added = cdc_slot.ensure_publication(
            db, pub, [QualifiedName(s, "first"), QualifiedName(s, "later")]
        )
        assert added == [QualifiedName(s, "later")]
        with cdc_slot.exported_snapshot(pg_conninfo, slot + "_tmp", temporary=True) as snap:
            snapshot = _snapshot_copy(pg_conninfo, snap, later)
            assert cdc_slot.slot_exists(db, slot + "_tmp")
        time.sleep(0.5)
    finally:
        writer.finish()
    for _ in range(100):  # the walsender drops its temporary slot as it exits
        if not cdc_slot.slot_exists(db, slot + "_tmp"):
            break
        time.sleep(0.05)
    assert not cdc_slot.slot_exists(db, slot + "_tmp")
    wait_flushed(db)
    start = lsn_hex(snap.consistent_lsn).encode()
    changes = []
    for _, files in _drain(pg_conninfo, slot, pub):
        if files.files:
            recs = raw_records(files.data(s, "later"))
            rows = [r for r in recs[1:] if r[1] >= start]  # the snapshot has the earlier ones
            changes.append(b"".join(b",".join(r) + b"\n" for r in [recs[0], *rows]))
    header, replayed = replay(snapshot, changes, ["id"])
    assert (header, replayed) == _final(db, later)


@pytest.mark.parametrize(
    "ddl",
    ["TRUNCATE {}", "ALTER TABLE {} ALTER COLUMN n TYPE bigint"],
    ids=["truncate", "rewrite"],
)
def test_a_table_truncated_after_the_exported_snapshot_is_refused(
    db,
    cdc_env,  # noqa: F811
    pg_conninfo,
    tmp_path,
    ddl,
):
    """A TRUNCATE (or a rewriting ALTER TABLE) that commits after the slot's snapshot was
    exported and before the snapshot's COPY would make the old snapshot read the table as
    empty. Sequenced for real: the DDL takes its lock once the slot exists (the journal
    callback holds the run there), the run then waits for that lock (seen in pg_locks), and
    the DDL commits. The run must fail saying so, with nothing published; the next attempt
    takes a correct snapshot."""
    s, slot, pub = cdc_env
    t = _make_table(db, s, "racy", rows=500)
    table = QualifiedName(s, "racy")
    cdc_slot.ensure_publication(db, pub, [table])
    sink = LocalSink(tmp_path / "bronze")
    at_consistent_point, go = threading.Event(), threading.Event()

    def hold(lsn: int) -> None:  # the journal's record: the slot exists, nothing COPYed yet
        at_consistent_point.set()
        assert go.wait(60)

    def snapshot(on_consistent_point):
        return take_snapshots(
            pg_conninfo, slot=slot, temporary=True, tables=[table], source="shop", sink=sink,
            codec=get_codec("gzip"), level=1, run_id="race", block_size=1 << 16,
            on_consistent_point=on_consistent_point, lock_timeout_s=60,
        )  # fmt: skip

    with ThreadPoolExecutor(1) as pool, psycopg.connect(pg_conninfo) as ddl_conn:
        run = pool.submit(snapshot, hold)
        assert at_consistent_point.wait(60)
        ddl_conn.execute(sql.SQL(ddl).format(t))  # takes ACCESS EXCLUSIVE, not committed yet
        go.set()
        deadline = time.monotonic() + 60
        while not db.execute(  # the snapshot's transaction waits for the DDL's lock
            "SELECT EXISTS (SELECT FROM pg_locks WHERE relation = %s::regclass"
            " AND mode = 'AccessShareLock' AND NOT granted)",
            [f"{s}.racy"],
        ).fetchone()[0]:  # type: ignore[index]
            assert time.monotonic() < deadline and not run.done(), "the run never waited"
            time.sleep(0.02)
        ddl_conn.commit()
        with pytest.raises(CdcError, match=r"cdc_\w+\.racy: it was truncated or rewritten"):
            run.result(60)
    assert [f for f in sink.list_files() if "/cdc/" in f] == []  # nothing published
    db.execute(
        sql.SQL("INSERT INTO {} SELECT g, 'after', 1 FROM generate_series(10001, 10007) g").format(
            t
        )
    )
    _, (again,) = snapshot(lambda lsn: None)
    data = get_codec("gzip").decompress(sink.read_bytes(again.ref.file))
    assert data == pinned_copy(db, sql.SQL("SELECT id, v, n FROM {}").format(t))
    assert again.manifest["rows"] == (0 if ddl.startswith("TRUNCATE") else 500) + 7


def test_advance_health_and_drop(db, cdc_env):  # noqa: F811
    s, slot, pub = cdc_env
    t = _make_table(db, s, "h", rows=0)
    cdc_slot.ensure_publication(db, pub, [QualifiedName(s, "h")])
    cdc_slot.ensure_slot(db, slot)
    db.execute(
        sql.SQL(
            "INSERT INTO {} SELECT g, repeat('x', 500), 0 FROM generate_series(1, 2000) g"
        ).format(t)
    )
    wait_flushed(db)
    before = cdc_slot.slot_health(db, slot)
    assert before is not None and not before.lost and not before.at_risk
    assert before.plugin == "pgoutput" and before.wal_status == "reserved"
    assert before.retained_bytes is not None and before.retained_bytes > 1_000_000
    assert before.lag_bytes is not None and before.lag_bytes > 1_000_000
    with psycopg.connect(db.info.dsn) as reader:
        batch, _ = read(reader, slot, pub)
    assert batch.start_lsn == before.confirmed_flush_lsn and batch.changes == 2000
    assert cdc_slot.advance_slot(db, slot, batch.end_lsn) == batch.end_lsn
    # advancing backwards is ignored: a lake that is behind never rewinds the slot
    assert cdc_slot.advance_slot(db, slot, batch.start_lsn) == batch.end_lsn
    after = cdc_slot.slot_health(db, slot)
    assert after.confirmed_flush_lsn == batch.end_lsn and after.lag_bytes < before.lag_bytes
    with psycopg.connect(db.info.dsn) as reader:
        assert read(reader, slot, pub)[0].empty
    assert cdc_slot.drop_slot(db, slot) and not cdc_slot.drop_slot(db, slot)
    assert cdc_slot.slot_health(db, slot) is None
    with psycopg.connect(db.info.dsn) as reader, pytest.raises(CdcError, match="does not exist"):
        read(reader, slot, pub)
    assert cdc_slot.drop_publication(db, pub) and not cdc_slot.drop_publication(db, pub)


@pytest.mark.skipif(
    bool(os.environ.get("PG_ASSETS_TEST_CONNINFO")), reason="changes a server-wide setting"
)
def test_a_lost_slot_is_a_clear_failure(db, cdc_env):  # noqa: F811
    s, slot, pub = cdc_env
    _make_table(db, s, "gone", rows=1)
    cdc_slot.ensure_publication(db, pub, [QualifiedName(s, "gone")])
    cdc_slot.ensure_slot(db, slot)
    lose_slot(db, sql.Identifier(s, "gone"))
    health = cdc_slot.slot_health(db, slot)
    assert health is not None and health.lost and health.at_risk
    with psycopg.connect(db.info.dsn) as reader:
        with pytest.raises(CdcError, match=f"replication slot '{slot}' is lost.*re-snapshot"):
            read(reader, slot, pub)
    problems = cdc_slot.check_cdc(db, tables=[QualifiedName(s, "gone")], publication=pub, slot=slot)
    assert problems == [
        f"replication slot '{slot}' is lost (wal_status=lost); drop it and re-snapshot: "
        "`pg-assets cdc drop --yes && pg-assets cdc setup`"
    ]


def test_check_names_each_problem_in_one_line(db, cdc_env, pg_conninfo):  # noqa: F811
    s, slot, pub = cdc_env
    q = sql.Identifier
    db.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY)").format(q(s, "ok")))
    db.execute(sql.SQL("CREATE TABLE {} (id int)").format(q(s, "No Key")))
    db.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY)").format(q(s, "nothing")))
    db.execute(sql.SQL("ALTER TABLE {} REPLICA IDENTITY NOTHING").format(q(s, "nothing")))
    db.execute(sql.SQL("CREATE TABLE {} (id int NOT NULL)").format(q(s, "byindex")))
    db.execute(sql.SQL("CREATE UNIQUE INDEX byindex_id ON {} (id)").format(q(s, "byindex")))
    db.execute(
        sql.SQL("ALTER TABLE {} REPLICA IDENTITY USING INDEX byindex_id").format(q(s, "byindex"))
    )
    db.execute(
        sql.SQL("CREATE TABLE {} (id int, d date) PARTITION BY RANGE (d)").format(q(s, "parted"))
    )
    db.execute(
        sql.SQL("CREATE TABLE {} PARTITION OF {} FOR VALUES FROM ('2026-01-01') TO ('2026-02-01')")
        .format(q(s, "parted_1"), q(s, "parted"))
    )  # fmt: skip
    db.execute(sql.SQL("CREATE VIEW {} AS SELECT 1 AS id").format(q(s, "v")))
    names = ["ok", "No Key", "nothing", "byindex", "parted", "v", "missing"]
    tables = [QualifiedName(s, n) for n in names]

    assert cdc_slot.check_cdc(db, tables=tables[:1], publication=pub, slot=slot) == []
    assert cdc_slot.check_cdc(db, tables=tables[3:4], publication=pub, slot=slot) == []
    db.execute(f"DROP INDEX {s}.byindex_id")  # noqa: S608 - test-made name
    problems = cdc_slot.check_cdc(db, tables=tables, publication=pub, slot=slot)
    assert problems == [
        f'table {s}."No Key" has no primary key, so updates and deletes carry no key (add a '
        f'primary key, or ALTER TABLE {s}."No Key" REPLICA IDENTITY FULL)',
        f"table {s}.nothing has REPLICA IDENTITY NOTHING, so updates and deletes carry no key "
        f"(ALTER TABLE {s}.nothing REPLICA IDENTITY DEFAULT with a primary key, or FULL)",
        f"table {s}.byindex has REPLICA IDENTITY USING INDEX but the index is gone "
        f"(ALTER TABLE {s}.byindex REPLICA IDENTITY USING INDEX <unique index>)",
        f"table {s}.parted_1 (partition of {s}.parted) has no primary key, so updates and deletes"
        f" carry no key (add a primary key, or ALTER TABLE {s}.parted_1 REPLICA IDENTITY FULL)",
        f"{s}.v is not a table (relkind 'v'); CDC needs a table",
        f"table {s}.missing does not exist",
    ]

    # a publication made by someone else, publishing inserts only; a slot of another plugin
    db.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, v text)").format(q(s, "filtered")))
    db.execute(
        sql.SQL("CREATE PUBLICATION {} FOR TABLE {} WHERE (id > 0) WITH (publish = 'insert')")
        .format(q(pub), q(s, "filtered"))
    )  # fmt: skip
    db.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", [slot])
    role = f"r_{slot}"
    db.execute(sql.SQL("CREATE ROLE {} LOGIN").format(q(role)))
    try:
        db.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(q(s), q(role)))
        with psycopg.connect(pg_conninfo, user=role, autocommit=True) as c:
            problems = cdc_slot.check_cdc(
                c, tables=[tables[0], QualifiedName(s, "filtered")], publication=pub, slot=slot
            )
    finally:
        db.execute(sql.SQL("DROP OWNED BY {}").format(q(role)))
        db.execute(sql.SQL("DROP ROLE {}").format(q(role)))
    assert problems == [
        f"role {role} lacks the REPLICATION attribute needed to create and read the slot "
        f"'{slot}' (ALTER ROLE {role} REPLICATION)",
        f"publication '{pub}' is owned by postgres; role {role} must own it to add tables "
        f"(ALTER PUBLICATION {pub} OWNER TO {role})",
        f"publication '{pub}' does not publish every operation; CDC needs ALTER PUBLICATION "
        f"{pub} SET (publish = 'insert, update, delete, truncate')",
        f"replication slot '{slot}' uses plugin 'test_decoding', not pgoutput",
        f"table {s}.ok is owned by postgres; adding it to publication '{pub}' needs its owner "
        f"(ALTER TABLE {s}.ok OWNER TO {role}, or add it as postgres)",
        f"publication '{pub}' publishes only some rows or columns of table {s}.filtered (a WHERE"
        f" clause or column list); CDC needs all of them (ALTER PUBLICATION {pub} DROP TABLE "
        f"{s}.filtered; ALTER PUBLICATION {pub} ADD TABLE {s}.filtered)",
    ]
    assert all("\n" not in p for p in problems)


def test_a_heartbeat_lets_the_slot_move_past_unpublished_wal(db, cdc_env):  # noqa: F811
    """WAL that touches no published table gives the slot no commit to advance to; a
    heartbeat message does, so the slot stops holding WAL for a quiet table."""
    s, slot, pub = cdc_env
    _make_table(db, s, "quiet", rows=0)
    busy = _make_table(db, s, "busy", rows=0)
    cdc_slot.ensure_publication(db, pub, [QualifiedName(s, "quiet")])
    cdc_slot.ensure_slot(db, slot)
    db.execute(
        sql.SQL("INSERT INTO {} SELECT g, repeat('x', 300), 0 FROM generate_series(1, 20000) g")
        .format(busy)
    )  # fmt: skip
    wait_flushed(db)
    with psycopg.connect(db.info.dsn) as reader:
        assert read(reader, slot, pub)[0].empty
        before = cdc_slot.slot_health(db, slot)
        assert before is not None and before.lag_bytes > 4_000_000
        lsn = cdc_slot.emit_heartbeat(db, slot)
        wait_flushed(db)
        batch, files = read(reader, slot, pub)
    assert (batch.transactions, batch.changes, batch.heartbeats, batch.files) == (1, 0, 1, [])
    assert cdc_slot.advance_slot(db, slot, batch.end_lsn) > lsn
    after = cdc_slot.slot_health(db, slot)
    assert after is not None and after.lag_bytes < before.lag_bytes - 4_000_000


def test_slot_creation_behind_a_long_transaction_is_bounded(db, cdc_env, pg_conninfo):  # noqa: F811
    s, slot, pub = cdc_env
    t = _make_table(db, s, "held", rows=1)
    with psycopg.connect(pg_conninfo) as blocker:
        blocker.execute(sql.SQL("UPDATE {} SET n = 1").format(t))  # holds an xid, uncommitted
        with pytest.raises(CdcError, match=f"'{slot}' did not finish within 1 s.*long-running"):
            with cdc_slot.exported_snapshot(pg_conninfo, slot, timeout_s=1):
                pass
        blocker.rollback()
    for _ in range(100):  # the cancelled walsender drops its half-made slot as it exits
        if not cdc_slot.slot_exists(db, slot):
            break
        time.sleep(0.05)
    assert not cdc_slot.slot_exists(db, slot)
    with cdc_slot.exported_snapshot(pg_conninfo, slot, timeout_s=30) as snap:
        assert snap.consistent_lsn > 0
