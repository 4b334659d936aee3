"""CDC through Dagster: the source's job materializes its CDC assets from one slot; applying the
change files in LSN order onto the snapshot reproduces each table exactly (PostgreSQL's own
COPY at the end, by key), every committed change lands once (held against a test_decoding
slot), tables without changes are skipped, and every failure says what to do."""

import datetime as dt
import threading
import time

import psycopg
import pytest
from psycopg import sql

from pg_assets.assets.cdc import cdc_source
from pg_assets.build import build_resources
from pg_assets.core.cdc import slot as cdc_slot
from pg_assets.core.cdc.lsn import parse_lsn
from pg_assets.core.cdc.run import lock_key
from pg_assets.core.identifiers import QualifiedName
from pg_assets.dev.cli import main as cli
from pg_assets_tests.cdc_support import (  # noqa: F401
    Witness,
    Writer,
    assert_exactly_once,
    cdc_env,
    cdc_names,
    change_rows,
    drop_slot_and_publication,
    lose_slot,
    pinned_copy,
    raw_records,
    read_bronze_cdc,
    replay,
    wait_flushed,
)


def cdc_project(project, cdc_env, tables: list[str], cdc=None, **overrides):  # noqa: F811
    s, slot, pub = cdc_env
    entries = [{"table": f"{s}.{t}", "mode": "cdc"} for t in tables]
    cdc = {"slot": slot, "publication": pub, **(cdc or {})}
    return project(entries, source="shop", cdc=cdc, **overrides)


def run(proj):
    job = proj.defs.resolve_job_def(f"{proj.config.source}__cdc")
    wait_flushed_for(proj)
    return job.execute_in_process(instance=proj.instance, raise_on_error=False)


def wait_flushed_for(proj) -> None:
    with psycopg.connect(proj.config_conninfo, autocommit=True) as c:
        wait_flushed(c)


def materialized(result) -> dict[str, dict]:
    """{table name: metadata} of the run's materializations."""
    return {
        e.asset_key.path[2]: {k: v.value for k, v in e.materialization.metadata.items()}
        for e in result.get_asset_materialization_events()
    }


def checks(result) -> dict[str, tuple[bool, str, str]]:
    return {
        e.asset_key.path[2]: (e.passed, e.severity.value, e.description)
        for e in result.get_asset_check_evaluations()
    }


def failure(result) -> str:
    (event,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    data = event.step_failure_data
    return data.user_failure_data.description if data.user_failure_data else data.error.message


def table_now(db, t: sql.Composable) -> tuple[list[bytes], dict]:
    recs = raw_records(pinned_copy(db, sql.SQL("SELECT * FROM {}").format(t)))
    return recs[0], {(r[0],): r for r in recs[1:]}


def check_table(proj, db, s: str, name: str) -> tuple[list[bytes], dict]:
    """Replay Bronze onto the snapshot; must equal the table now. Returns the replayed rows."""
    bronze = read_bronze_cdc(proj.sink(), "shop", proj.config.slot_name, QualifiedName(s, name))
    replayed = replay(bronze.snapshot, bronze.changes, ["id"])
    assert replayed == table_now(db, sql.Identifier(s, name))
    return replayed


@pytest.fixture
def proj_factory(project, pg_conninfo):
    def make(cdc_env, tables, cdc=None, **overrides):  # noqa: F811
        p = cdc_project(project, cdc_env, tables, cdc, **overrides)
        p.config_conninfo = pg_conninfo
        return p

    return make


def _tables(db, s: str) -> None:
    q = sql.Identifier
    db.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, v text, n int)").format(q(s, "t")))
    db.execute(
        sql.SQL("INSERT INTO {} SELECT g, md5(g::text), 0 FROM generate_series(1, 3000) g").format(
            q(s, "t")
        )
    )
    db.execute(
        sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, v text, n int) PARTITION BY RANGE (id)")
        .format(q(s, "p"))
    )  # fmt: skip
    db.execute(
        sql.SQL("CREATE TABLE {} PARTITION OF {} FOR VALUES FROM (MINVALUE) TO (1500)")
        .format(q(s, "p_low"), q(s, "p"))
    )  # fmt: skip
    db.execute(
        sql.SQL("CREATE TABLE {} PARTITION OF {} FOR VALUES FROM (1500) TO (MAXVALUE)")
        .format(q(s, "p_high"), q(s, "p"))
    )  # fmt: skip
    db.execute(
        sql.SQL("INSERT INTO {} SELECT g, md5(g::text), 0 FROM generate_series(1, 3000) g").format(
            q(s, "p")
        )
    )
    db.execute(
        sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, big text, n int)").format(q(s, "toasted"))
    )
    # incompressible 8 kB values: stored out of line, so an update of `n` leaves them unsent
    db.execute(
        sql.SQL(
            "INSERT INTO {} SELECT g, (SELECT string_agg(md5(g::text || i::text), '')"
            " FROM generate_series(1, 256) i), 0 FROM generate_series(1, 20) g"
        ).format(q(s, "toasted"))
    )


def test_replay_through_the_assets(db, cdc_env, proj_factory, pg_conninfo):  # noqa: F811
    s, slot, _ = cdc_env
    _tables(db, s)
    proj = proj_factory(cdc_env, ["t", "p", "toasted"])
    first = run(proj)
    assert first.success
    snaps = materialized(first)
    assert set(snaps) == {"t", "p", "toasted"}
    assert snaps["t"]["snapshot_rows"] == snaps["p"]["snapshot_rows"] == 3000
    assert snaps["toasted"]["snapshot_rows"] == 20
    assert len({m["snapshot_lsn"] for m in snaps.values()}) == 1  # one consistent point
    witness = Witness.create(db, f"{slot}_w")
    try:
        writers = [
            Writer(pg_conninfo, sql.Identifier(s, "t"), seed=1),
            Writer(pg_conninfo, sql.Identifier(s, "p"), seed=2),
        ]
        for w in writers:
            w.start()
        landed = {"t": 0, "p": 0, "toasted": 0}
        try:
            for _ in range(3):  # runs while the writers write
                time.sleep(0.4)
                result = run(proj)
                assert result.success, failure(result)
                for name, md in materialized(result).items():
                    landed[name] += md["changes"]
        finally:
            transactions = sum(w.finish() for w in writers)
        assert transactions > 20
        t, toasted = sql.Identifier(s, "t"), sql.Identifier(s, "toasted")
        db.execute(sql.SQL("TRUNCATE {}").format(t))
        db.execute(sql.SQL("INSERT INTO {} VALUES (1, 'after truncate', 1)").format(t))
        result = run(proj)
        assert result.success, failure(result)
        for name, md in materialized(result).items():
            landed[name] += md["changes"]

        # only `toasted` changes now: the other assets are skipped, not materialized empty
        before = db.execute("SELECT clock_timestamp()").fetchone()[0]  # type: ignore[index]
        db.execute(sql.SQL("UPDATE {} SET n = n + 1 WHERE id <= 3").format(toasted))
        db.execute(sql.SQL("UPDATE {} SET big = 'small now', n = 9 WHERE id = 4").format(toasted))
        db.execute(sql.SQL("DELETE FROM {} WHERE id = 5").format(toasted))
        after = db.execute("SELECT clock_timestamp()").fetchone()[0]  # type: ignore[index]
        result = run(proj)
        assert result.success, failure(result)
        md = materialized(result)
        assert set(md) == {"toasted"}
        m = md["toasted"]
        landed["toasted"] += m["changes"]
        assert (m["changes"], m["inserts"], m["updates"], m["deletes"], m["truncates"]) == (
            5, 0, 4, 1, 0,
        )  # fmt: skip
        assert before <= dt.datetime.fromisoformat(m["first_commit_time"])
        assert dt.datetime.fromisoformat(m["last_commit_time"]) <= after
        assert parse_lsn(m["first_commit_lsn"]) < parse_lsn(m["last_commit_lsn"])
        assert m["lag_seconds"] >= 0 and m["retained_wal_bytes"] >= 0
        assert set(checks(result)) == {"t", "p", "toasted"}
        assert all(c[0] for c in checks(result).values())

        for name, leaves in (("t", ["t"]), ("p", ["p_low", "p_high"]), ("toasted", ["toasted"])):
            check_table(proj, db, s, name)
            bronze = read_bronze_cdc(proj.sink(), "shop", slot, QualifiedName(s, name))
            assert_exactly_once(
                bronze.changes, witness.counts(db, *(QualifiedName(s, leaf) for leaf in leaves))
            )
            assert len(change_rows(bronze.changes)) == landed[name]
        unchanged = [r for r in change_rows(bronze.changes) if r[9]]
        assert [r[9] for r in unchanged] == [b"{big}"] * 3  # the TOAST value was not re-sent
    finally:
        witness.drop(db)


def test_tables_added_removed_and_added_back(db, cdc_env, proj_factory):  # noqa: F811
    s, slot, pub = cdc_env
    q = sql.Identifier
    for name in ("a", "b"):
        db.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, v text)").format(q(s, name)))
        db.execute(sql.SQL("INSERT INTO {} VALUES (1, 'one'), (2, 'two')").format(q(s, name)))
    only_a = proj_factory(cdc_env, ["a"])
    assert run(only_a).success
    db.execute(sql.SQL("INSERT INTO {} VALUES (3, 'three')").format(q(s, "a")))
    db.execute(sql.SQL("INSERT INTO {} VALUES (3, 'not published yet')").format(q(s, "b")))
    both = proj_factory(cdc_env, ["a", "b"])
    result = run(both)
    assert result.success, failure(result)
    md = materialized(result)
    assert md["a"]["inserts"] == 1 and "changes" not in md["b"]
    assert parse_lsn(md["b"]["snapshot_lsn"]) > parse_lsn(md["a"]["first_commit_lsn"])
    assert md["b"]["snapshot_rows"] == 3
    db.execute(sql.SQL("UPDATE {} SET v = 'b changed' WHERE id = 1").format(q(s, "b")))
    assert run(both).success

    # `a` leaves the config: its changes are not kept; back in, it gets a new snapshot
    only_b = proj_factory(cdc_env, ["b"])
    db.execute(sql.SQL("DELETE FROM {} WHERE id = 2").format(q(s, "a")))
    result = run(only_b)
    assert result.success and set(materialized(result)) <= {"b"}
    db.execute(sql.SQL("UPDATE {} SET v = 'a changed' WHERE id = 1").format(q(s, "a")))
    result = run(both)
    assert result.success, failure(result)
    md = materialized(result)
    assert md["a"]["snapshot_rows"] == 2 and "changes" not in md["a"]
    db.execute(sql.SQL("INSERT INTO {} VALUES (4, 'four')").format(q(s, "a")))
    db.execute(sql.SQL("INSERT INTO {} VALUES (4, 'four')").format(q(s, "b")))
    assert run(both).success
    for name in ("a", "b"):
        check_table(both, db, s, name)


def test_a_gap_or_a_dropped_slot_fails_clearly_until_re_snapshotted(
    db,
    cdc_env,  # noqa: F811
    proj_factory,
    monkeypatch,
    capsys,
):
    s, slot, pub = cdc_env
    t = sql.Identifier(s, "g")
    db.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, v text)").format(t))
    db.execute(sql.SQL("CREATE TABLE {} (id int)").format(sql.Identifier(s, "other")))
    proj = proj_factory(cdc_env, ["g"], {"max_lag_mb": 0.01})
    monkeypatch.setenv("PG_ASSETS_CONFIG", str(proj.config.path))
    result = run(proj)
    assert result.success and checks(result)["g"][0]

    # a transaction left open holds the slot's restart point: the WAL after it is retained
    with psycopg.connect(db.info.dsn) as open_tx:
        open_tx.execute(sql.SQL("INSERT INTO {} VALUES (1)").format(sql.Identifier(s, "other")))
        db.execute(
            sql.SQL("INSERT INTO {} SELECT g, md5(g::text) FROM generate_series(1, 1000) g")
            .format(t)
        )  # fmt: skip
        result = run(proj)
        open_tx.rollback()
    assert result.success
    passed, severity, description = checks(result)["g"]
    assert (passed, severity) == (False, "WARN")
    assert "retains 0 MB of WAL (cdc.max_lag_mb: 0)" in description
    db.execute(sql.SQL("TRUNCATE {}").format(t))
    assert run(proj).success

    # the slot consumed changes that never reached Bronze
    db.execute(sql.SQL("INSERT INTO {} VALUES (1, 'lost')").format(t))
    wait_flushed(db)
    (current,) = db.execute("SELECT pg_current_wal_lsn()::text").fetchone()  # type: ignore[misc]
    db.execute("SELECT pg_replication_slot_advance(%s, %s)", [slot, current])
    result = run(proj)
    assert not result.success
    message = failure(result)
    assert f"replication slot '{slot}' is at {current}" in message
    assert f"changes of {s}.g in between were consumed without landing in Bronze" in message
    assert "`pg-assets cdc setup --resnapshot`" in message
    assert cli(["cdc", "setup", "--resnapshot"]) == 0
    assert f"snapshot {s}.g: 1 rows" in capsys.readouterr().out
    db.execute(sql.SQL("DELETE FROM {} WHERE id = 1").format(t))
    db.execute(sql.SQL("INSERT INTO {} VALUES (2, 'kept')").format(t))
    assert run(proj).success
    check_table(proj, db, s, "g")

    # the slot is dropped: the run refuses to start over silently; setup recreates it
    db.execute("SELECT pg_drop_replication_slot(%s)", [slot])
    db.execute(sql.SQL("INSERT INTO {} VALUES (3, 'while no slot')").format(t))
    result = run(proj)
    assert not result.success
    assert f"replication slot '{slot}' does not exist, but Bronze holds CDC data" in failure(result)
    passed, severity, description = checks(result)["g"]
    assert (passed, severity) == (False, "ERROR") and "does not exist" in description
    assert cli(["cdc", "status"]) == 1
    assert f"ERROR: replication slot '{slot}' does not exist" in capsys.readouterr().out
    assert cli(["cdc", "setup"]) == 0
    assert f"snapshot {s}.g: 2 rows" in capsys.readouterr().out
    db.execute(sql.SQL("UPDATE {} SET v = 'after' WHERE id = 3").format(t))
    assert run(proj).success
    check_table(proj, db, s, "g")
    assert cli(["cdc", "status"]) == 0
    out = capsys.readouterr().out
    assert f"{s}.g: snapshot at" in out and "Bronze: last batch" in out

    # drop asks first, then removes the slot and the publication, not Bronze
    assert cli(["cdc", "drop"]) == 2
    assert cli(["cdc", "drop", "--yes"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"dropped replication slot '{slot}'",
        f"dropped publication '{pub}'",
    ]
    assert not cdc_slot.slot_exists(db, slot)
    assert read_bronze_cdc(proj.sink(), "shop", slot, QualifiedName(s, "g")).changes


def test_misconfigurations_fail_with_one_line_each(db, cdc_env, proj_factory, monkeypatch, capsys):  # noqa: F811
    s, slot, pub = cdc_env
    q = sql.Identifier
    db.execute(sql.SQL("CREATE TABLE {} (id int)").format(q(s, "nokey")))
    db.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, _op text)").format(q(s, "clash")))
    db.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, _old_id int)").format(q(s, "clash2")))
    db.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY)").format(q(s, "ok")))
    proj = proj_factory(cdc_env, ["nokey", "missing", "clash", "clash2", "ok"])
    monkeypatch.setenv("PG_ASSETS_CONFIG", str(proj.config.path))
    result = run(proj)
    assert not result.success
    lines = failure(result).splitlines()
    assert lines == [
        f"CDC of source 'shop' (slot '{slot}'): the database is not ready:",
        f"table {s}.nokey has no primary key, so updates and deletes carry no key (add a "
        f"primary key, or ALTER TABLE {s}.nokey REPLICA IDENTITY FULL)",
        f"table {s}.missing does not exist",
        f"table {s}.clash: column '_op' clashes with a change-file column of the same name; "
        "rename the column or exclude the table from CDC",
        f"table {s}.clash2: column '_old_id' clashes with a change-file column of the same "
        "name; rename the column or exclude the table from CDC",
    ]
    assert not cdc_slot.slot_exists(db, slot)  # nothing was created
    capsys.readouterr()
    assert cli(["check"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"error: {line}" for line in lines[1:]]

    # a role without the REPLICATION attribute
    role = f"r_{slot}"
    db.execute(sql.SQL("CREATE ROLE {} LOGIN").format(q(role)))
    try:
        db.execute(sql.SQL("ALTER TABLE {} OWNER TO {}").format(q(s, "ok"), q(role)))
        db.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(q(s), q(role)))
        db.execute(sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
            q(db.info.dbname), q(role)))  # fmt: skip
        monkeypatch.setenv("PG_ASSETS_CONNINFO", f"{db.info.dsn} user={role}")
        proj = proj_factory(cdc_env, ["ok"])
        result = run(proj)
        assert failure(result).splitlines()[1:] == [
            f"role {role} lacks the REPLICATION attribute needed to create and read the slot "
            f"'{slot}' (ALTER ROLE {role} REPLICATION)"
        ]
        db.execute(sql.SQL("ALTER ROLE {} REPLICATION").format(q(role)))
        db.execute(sql.SQL("INSERT INTO {} VALUES (1)").format(q(s, "ok")))
        result = run(proj)
        assert result.success, failure(result)
        db.execute(sql.SQL("INSERT INTO {} VALUES (2)").format(q(s, "ok")))
        result = run(proj)
        assert result.success, failure(result)
        check_table(proj, db, s, "ok")
    finally:
        monkeypatch.undo()
        drop_slot_and_publication(db.info.dsn, slot, pub)
        with psycopg.connect(db.info.dsn, autocommit=True) as c:
            c.execute(sql.SQL("DROP TABLE {}").format(q(s, "ok")))
            c.execute(sql.SQL("DROP OWNED BY {}").format(q(role)))
            c.execute(sql.SQL("DROP ROLE {}").format(q(role)))


@pytest.mark.skipif(
    bool(__import__("os").environ.get("PG_ASSETS_TEST_CONNINFO")),
    reason="changes a server-wide setting",
)
def test_a_lost_slot_fails_and_the_check_errors(db, cdc_env, proj_factory):  # noqa: F811
    s, slot, _ = cdc_env
    t = sql.Identifier(s, "gone")
    db.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, n int)").format(t))
    db.execute(sql.SQL("INSERT INTO {} VALUES (1, 0)").format(t))
    proj = proj_factory(cdc_env, ["gone"])
    assert run(proj).success
    lose_slot(db, t)
    result = run(proj)
    assert not result.success
    assert failure(result).splitlines()[1:] == [
        f"replication slot '{slot}' is lost (wal_status=lost); drop it and re-snapshot: "
        "`pg-assets cdc drop --yes && pg-assets cdc setup`"
    ]
    passed, severity, description = checks(result)["gone"]
    assert (passed, severity) == (False, "ERROR")
    assert (
        "is lost" in description
        and "pg-assets cdc drop --yes && pg-assets cdc setup" in description
    )


def test_one_run_at_a_time(db, cdc_env, proj_factory, pg_conninfo):  # noqa: F811
    """A second run waits for the slot's lock, then fails naming the holder's wait."""
    s, slot, _ = cdc_env
    db.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY)").format(sql.Identifier(s, "one")))
    proj = proj_factory(cdc_env, ["one"], postgres={"lock_timeout_s": 1})

    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with psycopg.connect(pg_conninfo, autocommit=True) as c:
            c.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", [lock_key(source)])
            held.set()
            release.wait(30)

    source = cdc_source(proj.config, *build_resources(proj.config).values())
    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert held.wait(10)
    try:
        result = run(proj)
    finally:
        release.set()
        holder.join(10)
    assert not result.success
    message = failure(result)
    assert (
        f"replication slot '{slot}': another run (" in message and "PostgreSQL backend" in message
    )
    assert "holds it; gave up after waiting" in message
    assert run(proj).success
