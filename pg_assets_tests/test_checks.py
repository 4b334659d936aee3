"""Checks and late data as a user meets them: real PostgreSQL, real Dagster runs on a persistent
instance, the real late-data sensor evaluated as the daemon evaluates it (its asset events
reported to the instance, its run requests executed), and every outcome read back through a
running dagster-webserver's GraphQL API, the data the UI renders.

The tests of this module share one instance and one webserver (starting one costs ~20 s) and
run in file order: materialize, late data, corruption, schema drift."""

import datetime as dt
import gzip
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests
import yaml
from dagster import (
    AssetCheckKey,
    AssetKey,
    AssetSelection,
    BackfillPolicy,
    DagsterInstance,
    DefaultSensorStatus,
    build_sensor_context,
    materialize,
)
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)
from psycopg import errors as pg_errors
from psycopg import sql

from pg_assets.build import build_definitions, build_resources
from pg_assets.catalog import resolve_tables
from pg_assets.checks import CHECK_NAMES
from pg_assets.config import load_config
from pg_assets.core.identifiers import QualifiedName
from pg_assets.core.layout import daily_paths
from pg_assets.dev.demo_data import create_daily_partitioned, insert_orders
from pg_assets.sensors.late_data import build_late_data_sensor, day_ranges

ROOT = Path(__file__).resolve().parent.parent
TODAY = dt.datetime.now(dt.UTC).date()
DAYS = [TODAY - dt.timedelta(days=n) for n in range(6, 0, -1)]  # six closed days, oldest first
CHILDLESS = DAYS[5]  # yesterday: no child of its own, its rows live in DEFAULT
ORDERS = QualifiedName("chk", "orders")
FRESH = QualifiedName("chk", "fresh")
ORDERS_KEY = ["checks", "chk", "orders"]
FRESH_KEY = ["checks", "chk", "fresh"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def graphql(url: str, query: str, **variables: object) -> dict:
    r = requests.post(f"{url}/graphql", json={"query": query, "variables": variables}, timeout=60)
    r.raise_for_status()
    body = r.json()
    assert "errors" not in body, body
    return body["data"]


class Env:
    def __init__(self, home: Path, conninfo: str) -> None:
        self.home = home
        self.conninfo = conninfo
        self.config = load_config(home / "pg_assets.yaml")
        self.defs = build_definitions(self.config)
        self.instance = DagsterInstance.from_config(str(home))
        self.url = ""

    def asset(self, key: list[str]):
        return next(a for a in self.defs.assets or [] if list(a.key.path) == key)

    def day_checks(self, key: list[str]):
        return next(
            c
            for c in self.defs.asset_checks or []
            if AssetCheckKey(self.asset(key).key, "bronze_readable") in c.check_keys
        )

    def run(self, key: list[str], day: dt.date | None = None, *, checks_only=False, **kw):
        asset = self.asset(key)
        selection = AssetSelection.checks_for_assets(asset) if checks_only else None
        if checks_only and day is not None:  # a check-only run names its days as a range
            kw["tags"] = {ASSET_PARTITION_RANGE_START_TAG: day.isoformat(),
                          ASSET_PARTITION_RANGE_END_TAG: day.isoformat()}  # fmt: skip
            day = None
        result = materialize(
            [asset, self.day_checks(key)],
            partition_key=day.isoformat() if day else None,
            selection=selection,
            resources=build_resources(self.config),
            instance=self.instance,
            raise_on_error=False,
            **kw,
        )
        return result

    def sensor(self, name: str):
        return next(s for s in self.defs.sensors or [] if s.name == name)

    def context(self, cursor: str | None = None, name: str | None = None):
        """A sensor context as the code server builds one for the daemon
        (dagster._grpc.impl.get_external_sensor_execution): the repository's top-level
        resources, the real instance."""
        repo = self.defs.get_repository_def()
        return build_sensor_context(
            instance=self.instance, cursor=cursor, repository_def=repo, sensor_name=name,
            resources=dict(repo.get_top_level_resources()),
        )  # fmt: skip

    def tick(self, name: str, cursor: str | None):
        """One sensor evaluation as the daemon performs it; the asset events it returns are
        reported to the instance, as the daemon does."""
        with self.context(cursor, name) as context:  # resources set up and torn down
            data = self.sensor(name).evaluate_tick(context)
        for event in data.asset_events:
            self.instance.report_runless_asset_event(event)
        return data

    def manifest(self, table: QualifiedName, day: dt.date) -> dict[str, Any]:
        import json

        sink = build_resources(self.config)["bronze"].get_sink()  # type: ignore[attr-defined]
        return json.loads(sink.read_bytes(daily_paths("checks", table, day).manifest))

    def data_path(self, day: dt.date) -> Path:
        m = self.manifest(ORDERS, day)
        return Path(self.config.bronze.root) / daily_paths("checks", ORDERS, day).folder / m["file"]


@pytest.fixture(scope="module")
def env(pg_conninfo: str, tmp_path_factory: pytest.TempPathFactory):
    with psycopg.connect(pg_conninfo, autocommit=True) as c:
        c.execute("DROP SCHEMA IF EXISTS chk CASCADE")
        create_daily_partitioned(c, "chk", "orders", DAYS[:5], 400)
        insert_orders(c, sql.Identifier("chk", "orders"), CHILDLESS, 50, 70_000_000)
        create_daily_partitioned(c, "chk", "fresh", DAYS[4:], 20)
    home = tmp_path_factory.mktemp("checks_home")
    (home / "dagster.yaml").write_text(
        yaml.safe_dump(
            {
                "storage": {"sqlite": {"base_dir": str(home / "storage")}},
                "telemetry": {"enabled": False},
            }  # fmt: skip
        )
    )
    config = {
        "source": "checks",
        "postgres": {"conninfo_env": "PG_ASSETS_CONNINFO", "retries": 0},
        "bronze": {"root": str(home / "bronze"), "codec": "gzip"},
        "checks": {
            "content_hash": True,
            "window_days": 10,
            "sensor_interval_s": 120,
            "freshness_deadline": "00:00",
        },  # fmt: skip
        "tables": [
            {
                "table": "chk.orders",
                "partition_column": "order_date",
                "start": DAYS[0].isoformat(),
                "checks": {"freshness_deadline": None},
            },
            {"table": "chk.fresh", "partition_column": "order_date", "start": DAYS[4].isoformat()},
        ],  # fmt: skip
    }
    (home / "pg_assets.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    e = Env(home, pg_conninfo)
    port = _free_port()
    environ = {**os.environ, "DAGSTER_HOME": str(home),
               "PG_ASSETS_CONFIG": str(home / "pg_assets.yaml")}  # fmt: skip
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster-webserver"), "-w", str(ROOT / "workspace.yaml"),
         "-h", "127.0.0.1", "-p", str(port)],
        cwd=home, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    e.url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if requests.get(f"{e.url}/server_info", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "webserver did not start"
            time.sleep(0.5)
        yield e
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        e.instance.dispose()


EXECUTIONS = """
query ($key: AssetKeyInput!, $check: String!, $partition: String) {
  assetCheckExecutions(assetKey: $key, checkName: $check, partition: $partition, limit: 1) {
    status partition runId
    evaluation { success severity description partition
      metadataEntries { label ... on IntMetadataEntry { intValue }
                              ... on TextMetadataEntry { text } } }
  }
}"""

STATUSES = """
query ($key: AssetKeyInput!) {
  assetNodeOrError(assetKey: $key) { ... on AssetNode {
    assetChecksOrError { ... on AssetChecks { checks { name partitionDefinition { type }
      partitionStatuses { ... on AssetCheckTimePartitionStatuses {
        ranges { startKey endKey status } } } } } } } }
}"""


def latest(env: Env, key: list[str], check: str, day: dt.date | None) -> dict[str, Any]:
    """The latest execution of `check` for `day`, as the UI's check history shows it."""
    data = graphql(env.url, EXECUTIONS, key={"path": key}, check=check,
                   partition=day.isoformat() if day else None)  # fmt: skip
    (execution,) = data["assetCheckExecutions"]
    ev = execution["evaluation"]
    ev["metadata"] = {
        m["label"]: m.get("intValue", m.get("text")) for m in ev.pop("metadataEntries")
    }
    return {**execution, **ev}


def statuses(env: Env, key: list[str]) -> dict[str, dict[str, str]]:
    """Per check, per day: the status the UI's partition bar shows."""
    node = graphql(env.url, STATUSES, key={"path": key})["assetNodeOrError"]
    out: dict[str, dict[str, str]] = {}
    for check in node["assetChecksOrError"]["checks"]:
        days: dict[str, str] = {}
        for r in (check["partitionStatuses"] or {}).get("ranges", []):
            day = dt.date.fromisoformat(r["startKey"])
            while day <= dt.date.fromisoformat(r["endKey"]):
                days[day.isoformat()] = r["status"]
                day += dt.timedelta(days=1)
        out[check["name"]] = days
    return out


# -- the checks after materialization ------------------------------------------------------------


def test_materialized_days_pass_every_check_per_partition(env):
    for day in DAYS:
        assert env.run(ORDERS_KEY, day).success
    s = statuses(env, ORDERS_KEY)
    for name in CHECK_NAMES:
        assert s[name] == {d.isoformat(): "SUCCEEDED" for d in DAYS}, name
    ev = latest(env, ORDERS_KEY, "matches_source", CHILDLESS)
    assert ev["partition"] == CHILDLESS.isoformat() and ev["success"]
    assert ev["metadata"]["source_rows"] == ev["metadata"]["bronze_rows"] == 50
    assert ev["metadata"]["source_relation"] == "chk.orders"  # the day lives in DEFAULT
    assert "rows and content hash" in ev["description"]
    ev = latest(env, ORDERS_KEY, "bronze_readable", DAYS[0])
    assert ev["success"] and ev["metadata"]["rows_read_back"] == 400
    assert "sha256 and 400 rows match the manifest" in ev["description"]


def test_checks_are_partitioned_in_the_ui_and_the_sensor_is_stopped(env):
    node = graphql(env.url, STATUSES, key={"path": ORDERS_KEY})["assetNodeOrError"]
    checks = {c["name"]: c for c in node["assetChecksOrError"]["checks"]}
    assert set(checks) == set(CHECK_NAMES)
    assert all(c["partitionDefinition"]["type"] == "TIME_WINDOW" for c in checks.values())
    sensor = env.sensor("checks__chk__orders__late_data")
    assert sensor.default_status == DefaultSensorStatus.STOPPED
    assert sensor.minimum_interval_seconds == 120


# -- late data ---------------------------------------------------------------------------------


def test_late_rows_reopen_exactly_their_days_until_rematerialized(env, db):
    name = "checks__chk__orders__late_data"
    quiet = env.tick(name, None)
    assert quiet.run_requests == [] and quiet.asset_events == []
    # a late row for a day with its own child, and one for yesterday, which lives in DEFAULT
    insert_orders(db, sql.Identifier("chk", "orders"), DAYS[1], 1, 80_000_000)
    insert_orders(db, sql.Identifier("chk", "orders"), CHILDLESS, 2, 80_000_100)
    # PostgreSQL never lets DEFAULT hold a row of a day that has its own child, so the plan's
    # COPY of the child alone is complete (and the parent's recount sees the same rows)
    with pytest.raises(pg_errors.CheckViolation):
        insert_orders(db, sql.Identifier("chk", "orders_default"), DAYS[2], 1, 80_000_200)

    data = env.tick(name, quiet.cursor)
    by_day = {ev.partition: ev for ev in data.asset_events}
    assert set(by_day) == {DAYS[1].isoformat(), CHILDLESS.isoformat()}
    for day, before, after in ((DAYS[1], 400, 401), (CHILDLESS, 50, 52)):
        ev = by_day[day.isoformat()]
        assert ev.check_name == "matches_source" and not ev.passed
        assert ev.metadata["bronze_rows"].value == before
        assert ev.metadata["source_rows"].value == after
        assert f"PostgreSQL now has {after:,} rows, Bronze has {before:,}" in ev.description
    assert sorted(r.partition_key for r in data.run_requests) == [
        DAYS[1].isoformat(),
        CHILDLESS.isoformat(),
    ]
    assert all(r.asset_selection == [env.asset(ORDERS_KEY).key] for r in data.run_requests)

    # the UI shows the failure on those days only, with both counts
    ui = latest(env, ORDERS_KEY, "matches_source", DAYS[1])
    assert not ui["success"] and ui["metadata"]["source_rows"] == 401
    assert ui["metadata"]["bronze_rows"] == 400 and ui["runId"] == ""
    s = statuses(env, ORDERS_KEY)["matches_source"]
    assert s[DAYS[1].isoformat()] == s[CHILDLESS.isoformat()] == "FAILED"
    assert s[DAYS[0].isoformat()] == s[DAYS[2].isoformat()] == "SUCCEEDED"

    # the same state is reported once, not once per tick
    again = env.tick(name, data.cursor)
    assert again.run_requests == [] and again.asset_events == []

    # the check itself, run on its own, finds the same
    assert env.run(ORDERS_KEY, DAYS[1], checks_only=True).success
    own = latest(env, ORDERS_KEY, "matches_source", DAYS[1])
    assert own["runId"] and not own["success"]
    assert "PostgreSQL now has 401 rows, Bronze has 400" in own["description"]

    # the requested runs, executed: Bronze catches up, the manifest keeps what it replaced
    old = env.manifest(ORDERS, DAYS[1])
    for request in data.run_requests:
        assert env.run(ORDERS_KEY, dt.date.fromisoformat(request.partition_key),
                       tags=request.tags).success  # fmt: skip
    new = env.manifest(ORDERS, DAYS[1])
    assert new["rows"] == 401 and new["history"][0]["rows"] == 400
    assert new["history"][0]["sha256"] == old["sha256"] != new["sha256"]
    for day in (DAYS[1], CHILDLESS):
        ev = latest(env, ORDERS_KEY, "matches_source", day)
        assert ev["success"] and ev["metadata"]["source_rows"] == ev["metadata"]["bronze_rows"]
    assert statuses(env, ORDERS_KEY)["matches_source"] == {d.isoformat(): "SUCCEEDED" for d in DAYS}
    settled = env.tick(name, again.cursor)
    assert settled.run_requests == [] and settled.asset_events == []


def test_an_update_that_keeps_the_count_is_seen_through_the_content_hash(env, db):
    name = "checks__chk__orders__late_data"
    base = env.tick(name, None)
    assert base.asset_events == []
    (note,) = db.execute("SELECT note FROM chk.orders WHERE id = 5").fetchone()
    db.execute("UPDATE chk.orders SET note = 'corrected' WHERE id = 5")
    try:
        data = env.tick(name, base.cursor)
        (ev,) = data.asset_events
        assert ev.partition == DAYS[0].isoformat() and not ev.passed
        assert "same 400 rows but different content" in ev.description
        check = env.run(ORDERS_KEY, DAYS[0], checks_only=True)
        assert check.success
        ui = latest(env, ORDERS_KEY, "matches_source", DAYS[0])
        assert not ui["success"] and "rows were updated since the extraction" in ui["description"]
    finally:
        db.execute("UPDATE chk.orders SET note = %s WHERE id = 5", (note,))
    assert env.run(ORDERS_KEY, DAYS[0], checks_only=True).success
    assert latest(env, ORDERS_KEY, "matches_source", DAYS[0])["success"]


def test_warn_mode_reports_without_runs_and_ranges_respect_the_backfill_policy(env, db):
    table = env.config.tables[0]
    resolved = next(r for r in resolve_tables(env.config) if r.config == table)
    ranged = env.asset(ORDERS_KEY).with_attributes(backfill_policy=BackfillPolicy.multi_run(2))
    sensor = build_late_data_sensor(env.config, resolved, ranged)
    for day in DAYS[1:4]:
        insert_orders(db, sql.Identifier("chk", "orders"), day, 1, 90_000_000 + day.day * 10)
    try:
        with env.context() as ctx:
            data = sensor.evaluate_tick(ctx)
        spans = [(r.tags.get(ASSET_PARTITION_RANGE_START_TAG), r.tags.get(ASSET_PARTITION_RANGE_END_TAG),
                  r.partition_key) for r in data.run_requests]  # fmt: skip
        # three contiguous days, at most two per run
        assert spans == [(DAYS[1].isoformat(), DAYS[2].isoformat(), None),
                         (None, None, DAYS[3].isoformat())]  # fmt: skip
        warn_cfg = env.config.model_copy(
            update={"checks": env.config.checks.model_copy(update={"late_data": "warn"})}
        )
        with env.context() as ctx:
            warn = build_late_data_sensor(warn_cfg, resolved, ranged).evaluate_tick(ctx)
        assert warn.run_requests == []
        assert sorted(e.partition for e in warn.asset_events) == [d.isoformat() for d in DAYS[1:4]]
        assert all("late_data: warn, no run requested" in e.description for e in warn.asset_events)
    finally:
        db.execute("DELETE FROM chk.orders WHERE id >= 90000000")
    assert day_ranges([DAYS[3], DAYS[1], DAYS[0]], None) == [(DAYS[0], DAYS[1]), (DAYS[3], DAYS[3])]


# -- corruption --------------------------------------------------------------------------------


def test_corrupt_files_fail_bronze_readable_naming_the_file_and_the_problem(env):
    truncated, flipped, deleted = DAYS[2], DAYS[3], DAYS[4]
    files = {d: env.data_path(d) for d in (truncated, flipped, deleted)}
    data = files[truncated].read_bytes()
    files[truncated].write_bytes(data[: len(data) // 2])
    data = bytearray(files[flipped].read_bytes())
    data[len(data) // 2] ^= 0x01
    files[flipped].write_bytes(bytes(data))
    files[deleted].unlink()

    # one check-only run over the three days (a partition range), nothing re-extracted
    result = env.run(ORDERS_KEY, checks_only=True,
                     tags={ASSET_PARTITION_RANGE_START_TAG: truncated.isoformat(),
                           ASSET_PARTITION_RANGE_END_TAG: deleted.isoformat()})  # fmt: skip
    assert result.success
    assert not result.get_asset_materialization_events()
    for day, problem in ((truncated, "truncated: the store holds"), (flipped, "sha256 mismatch"),
                         (deleted, "missing: the manifest names this file")):  # fmt: skip
        ev = latest(env, ORDERS_KEY, "bronze_readable", day)
        assert not ev["success"] and ev["severity"] == "ERROR"
        assert ev["description"].startswith(f"checks/chk.orders/date={day}/{files[day].name}: "), (
            ev["description"]
        )
        assert problem in ev["description"]
    s = statuses(env, ORDERS_KEY)["bronze_readable"]
    assert [s[d.isoformat()] for d in DAYS] == ["SUCCEEDED"] * 2 + ["FAILED"] * 3 + ["SUCCEEDED"]
    # re-materializing repairs a day, and its check passes again
    assert env.run(ORDERS_KEY, deleted).success
    assert latest(env, ORDERS_KEY, "bronze_readable", deleted)["success"]


# -- schema drift ------------------------------------------------------------------------------


def test_added_column_warns_naming_it(env, db):
    db.execute("ALTER TABLE chk.orders ADD COLUMN coupon_code text")
    try:
        assert env.run(ORDERS_KEY, DAYS[3]).success
    finally:
        db.execute("ALTER TABLE chk.orders DROP COLUMN coupon_code")
    ev = latest(env, ORDERS_KEY, "schema_unchanged", DAYS[3])
    assert not ev["success"] and ev["severity"] == "WARN"
    assert ev["description"].endswith(f"columns changed since {DAYS[2]}: added coupon_code (text)")
    assert statuses(env, ORDERS_KEY)["schema_unchanged"][DAYS[3].isoformat()] == "FAILED"
    assert (
        gzip.decompress(env.data_path(DAYS[3]).read_bytes())
        .split(b"\n", 1)[0]
        .endswith(b",coupon_code")
    )


# -- freshness ---------------------------------------------------------------------------------


def test_freshness_fails_until_yesterday_is_materialized(env):
    asset = env.asset(FRESH_KEY)
    freshness = next(c for c in env.defs.asset_checks or []
                     if AssetCheckKey(asset.key, "freshness_check") in c.check_keys)  # fmt: skip

    def run_freshness():
        return materialize([asset, freshness], selection=AssetSelection.checks(freshness),
                           resources=build_resources(env.config), instance=env.instance)  # fmt: skip

    assert env.run(FRESH_KEY, DAYS[4]).success  # the day before yesterday is not enough
    run_freshness()
    ev = latest(env, FRESH_KEY, "freshness_check", None)
    assert not ev["success"] and f"partition {CHILDLESS}" in ev["description"]
    assert env.run(FRESH_KEY, CHILDLESS).success
    run_freshness()
    ev = latest(env, FRESH_KEY, "freshness_check", None)
    assert ev["success"] and f"partition {CHILDLESS}" in ev["description"]
    sensor = env.sensor("checks__freshness")
    assert sensor.default_status == DefaultSensorStatus.STOPPED


# -- ranged runs whose asset yields no output ------------------------------------------------


def test_an_asset_without_output_reports_each_days_checks_itself(env):
    """An asset that yields one AssetMaterialization per day and no output (ranged runs,
    `output_required=False`) makes Dagster skip the separate check step. Such an asset yields
    `day_check_evaluations` after each day instead; each day then carries its own results."""
    from dagster import AssetMaterialization, DailyPartitionsDefinition, asset

    from pg_assets.checks import day_check_evaluations, day_checks_for
    from pg_assets.core.extract import extract_day
    from pg_assets.resources.bronze import BronzeResource
    from pg_assets.resources.postgres import PostgresResource

    table = env.config.tables[1]  # chk.fresh
    real = env.asset(FRESH_KEY)
    partitions = DailyPartitionsDefinition(start_date=DAYS[4].isoformat())

    @asset(key=real.key, partitions_def=partitions, output_required=False,
           backfill_policy=BackfillPolicy.multi_run(10))  # fmt: skip
    def ranged(context, postgres: PostgresResource, bronze: BronzeResource):
        sink = bronze.get_sink()
        checks = day_checks_for(env.config, table, context.asset_key)
        for key in context.partition_keys:
            day = dt.date.fromisoformat(key)
            with postgres.connection() as conn:
                extract_day(conn, source="checks", table=table.name, column=table.column,
                            day=day, timezone="UTC", sink=sink, codec=bronze.get_codec(),
                            level=1, run_id=context.run.run_id)  # fmt: skip
            yield AssetMaterialization(asset_key=context.asset_key, partition=key)
            yield from day_check_evaluations(checks, [day], sink=sink, postgres=postgres,
                                             instance=context.instance)  # fmt: skip

    with DagsterInstance.ephemeral() as instance:
        result = materialize(
            [ranged, env.day_checks(FRESH_KEY)], instance=instance,
            resources=build_resources(env.config),
            tags={ASSET_PARTITION_RANGE_START_TAG: DAYS[4].isoformat(),
                  ASSET_PARTITION_RANGE_END_TAG: DAYS[5].isoformat()},
        )  # fmt: skip
        assert result.success
        skipped = [e.step_key for e in result.all_events if e.event_type_value == "STEP_SKIPPED"]
        assert skipped == ["checks__chk__fresh__checks"]
        infos = instance.event_log_storage.get_asset_check_partition_info(
            [AssetCheckKey(real.key, n) for n in CHECK_NAMES]
        )
    got = {(i.check_key.name, i.partition_key): i.latest_execution_status.value for i in infos}
    assert got == {(n, d.isoformat()): "SUCCEEDED" for n in CHECK_NAMES for d in DAYS[4:]}


def test_hashed_recount_falls_back_to_counting_when_it_runs_out_of_time(pg_conninfo, tmp_path):
    from pg_assets.checks import day_checks_for
    from pg_assets.sensors.late_data import find_changes
    from pg_assets_tests.conftest import write_config

    days = [dt.date(2026, 8, 1) + dt.timedelta(days=n) for n in range(3)]
    with psycopg.connect(pg_conninfo, autocommit=True) as c:
        create_daily_partitioned(c, "chkslow", "orders", days, 40_000)
    config = write_config(
        tmp_path / "c.yaml",
        [{"table": "chkslow.orders", "partition_column": "order_date", "start": "2026-08-01"}],
        checks={"content_hash": True},
    )
    checks = day_checks_for(config, config.tables[0], AssetKey(["chkslow"]))
    columns = [{"name": n, "type": "x"} for n in (
        "id", "order_date", "created_at", "customer_id", "amount", "status", "attrs", "tags",
        "note")]  # fmt: skip
    # manifests with the right counts and a content hash that no longer matches
    manifests = {d: {"rows": 40_000, "columns": columns, "sha256": "s",
                     "content_hash": {"value": "1"}} for d in days}  # fmt: skip
    with psycopg.connect(pg_conninfo) as conn:
        full = find_changes(conn, checks, manifests, days[0], days[-1])
        assert full.hashed and full.note == ""
        assert [c.day for c in full.changes] == days  # the hash sees the difference
        hurried = find_changes(conn, checks, manifests, days[0], days[-1], hash_timeout_s=0.001)
    assert not hurried.hashed and hurried.changes == []  # counted only: the counts agree
    assert hurried.note.startswith(f"content hash of {days[0]}..{days[-1]} not compared")
    assert {d: c.rows for d, c in hurried.counts.items()} == dict.fromkeys(days, 40_000)


def test_freshness_deadline_is_in_each_tables_time_zone(env):
    from pg_assets.checks import build_freshness
    from pg_assets.config import ProjectConfig

    raw = env.config.model_dump(mode="json", exclude={"path"}, exclude_unset=True)
    raw["tables"][1] |= {"timezone": "Europe/Berlin", "checks": {"freshness_deadline": "06:30"}}
    raw["tables"][0]["checks"] = {"freshness_deadline": "23:05"}
    config = ProjectConfig.model_validate(raw)
    pairs = [(t, env.asset(k)) for t, k in zip(config.tables, (ORDERS_KEY, FRESH_KEY), strict=True)]
    checks, sensors = build_freshness(config, pairs)
    params = {}
    for c in checks:
        for spec in c.check_specs:
            params[spec.asset_key.path[-1]] = spec.metadata["dagster/freshness_params"].value
    assert params == {
        "orders": {"timezone": "UTC", "deadline_cron": "5 23 * * *"},
        "fresh": {"timezone": "Europe/Berlin", "deadline_cron": "30 6 * * *"},
    }
    (sensor,) = sensors
    assert sensor.name == "checks__freshness" and sensor.minimum_interval_seconds == 120


def test_a_check_that_cannot_reach_postgres_fails_naming_the_day_not_the_secret(env, monkeypatch):
    monkeypatch.setenv("CHK_BAD_CONNINFO", "host=127.0.0.1 port=1 user=u password=s3kr1t dbname=x")
    config = env.config.model_copy(
        update={"postgres": env.config.postgres.model_copy(
            update={"conninfo_env": "CHK_BAD_CONNINFO", "connect_timeout_s": 2})}
    )  # fmt: skip
    result = materialize(
        [env.asset(ORDERS_KEY), env.day_checks(ORDERS_KEY)],
        selection=AssetSelection.checks(AssetCheckKey(env.asset(ORDERS_KEY).key, "matches_source")),
        resources=build_resources(config), instance=env.instance, raise_on_error=False,
        tags={ASSET_PARTITION_RANGE_START_TAG: DAYS[0].isoformat(),
              ASSET_PARTITION_RANGE_END_TAG: DAYS[0].isoformat()},
    )  # fmt: skip
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.step_failure_data.error.message
    assert f"table chk.orders, partition {DAYS[0]}: counting the day in PostgreSQL failed" in (
        message
    )
    assert "s3kr1t" not in str(failure.step_failure_data.error.to_string())
