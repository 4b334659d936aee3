"""A backfill launched as the UI launches it, run by a real dagster-daemon.

40 days of a daily-partitioned table, 8 days a run: 5 ranged runs through the daemon's run
queue and pools. Each day must be its own materialization carrying its own truth (rows, bytes,
sha256, relation: equal to that day's manifest in Bronze and to PostgreSQL's count(*)), and a
day that cannot be read (its child partition under a row-level security policy for the reader
role: PostgreSQL refuses the COPY rather than filter it, a real fault) must fail alone: the
other days of its run are published and recorded, the run fails naming that day and its
cause, and the backfill and partition status show that one day as failed.
"""

import datetime as dt
import gzip
import hashlib
import json
import threading
import time

import psycopg
import pytest
from dagster import materialize
from psycopg import sql

from pg_assets.build import build_resources
from pg_assets.core.identifiers import QualifiedName
from pg_assets.core.layout import daily_paths
from pg_assets.dev.demo_data import create_daily_partitioned, daily_volumes
from pg_assets.sinks.local import LocalSink
from pg_assets_tests.conftest import day_query, postgres_copy
from pg_assets_tests.dagster_dev import (
    dagster_services,
    launch_backfill,
    materializations,
    partition_status,
    runs_with_tag,
    step_failures,
    wait_backfill,
)

FIRST = dt.date(2026, 9, 1)
DAYS = [FIRST + dt.timedelta(days=n) for n in range(40)]
BAD_DAY = dt.date(2026, 9, 17)  # 17th day: in the 3rd run (days 17-24), not at its edges
PER_RUN = 8
KEY = ["bf", "bf", "orders"]
READER = "bf_restricted_reader"


@pytest.fixture(scope="module")
def backfill(pg_conninfo: str, tmp_path_factory: pytest.TempPathFactory):
    volumes = daily_volumes(DAYS, 300, "backfill-test")
    with psycopg.connect(pg_conninfo, autocommit=True) as c:
        c.execute("DROP SCHEMA IF EXISTS bf CASCADE")
        create_daily_partitioned(c, "bf", "orders", DAYS, volumes, default_partition=False)
        c.execute(f"DROP ROLE IF EXISTS {READER}")
        c.execute(f"CREATE ROLE {READER} LOGIN")
        c.execute(f"GRANT USAGE ON SCHEMA bf TO {READER}")
        c.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA bf TO {READER}")
        # One day's child under row-level security for the reader: PostgreSQL would hand
        # it a filtered day, which pg_assets refuses to publish (a real fault, one day only).
        bad = sql.Identifier("bf", f"orders_{BAD_DAY:%Y_%m_%d}")
        c.execute(sql.SQL("ALTER TABLE {} ENABLE ROW LEVEL SECURITY").format(bad))
        c.execute(
            sql.SQL("CREATE POLICY only_some ON {} TO {} USING (id % 2 = 0)").format(
                bad, sql.Identifier(READER)
            )
        )
    home = tmp_path_factory.mktemp("backfill_home")
    config = {
        "source": "bf",
        "postgres": {"conninfo_env": "PG_ASSETS_CONNINFO", "retries": 1, "pool_max": 2},
        "bronze": {"root": str(home / "bronze"), "codec": "gzip", "level": 1},
        "backfill": {"max_partitions_per_run": PER_RUN},
        "tables": [{"table": "bf.orders", "partition_column": "order_date", "start": str(FIRST)}],
    }
    # the embedded server trusts loopback: the same server, as the restricted reader role
    reader = f"{pg_conninfo} user={READER}"
    # The webserver first, the backfill, then the daemon: its first loop picks the backfill
    # up at once instead of up to 30 s later.
    with dagster_services(home, config, conninfo=reader, start_daemon=False) as services:
        backfill_id = launch_backfill(services.url, KEY, [d.isoformat() for d in DAYS])
        services.start_daemon()
        status = wait_backfill(services, backfill_id, timeout_s=300)
        yield {
            "url": services.url,
            "id": backfill_id,
            "status": status,
            "sink": LocalSink(config["bronze"]["root"]),
            "volumes": volumes,
        }


def test_each_day_records_its_own_manifest_and_count(backfill, db):
    mats = materializations(backfill["url"], KEY)
    by_day = {}
    for m in mats:
        assert m["partition"] not in by_day, f"two materializations of {m['partition']}"
        by_day[m["partition"]] = m["metadata"]
    good = [d for d in DAYS if d != BAD_DAY]
    assert sorted(by_day) == [d.isoformat() for d in good]
    sink = backfill["sink"]
    for day in good:
        meta = by_day[day.isoformat()]
        paths = daily_paths("bf", QualifiedName("bf", "orders"), day)
        manifest = json.loads(sink.read_bytes(paths.manifest))
        data = sink.read_bytes(f"{paths.folder}/{manifest['file']}")
        query = day_query(sql.Identifier("bf", "orders"), "order_date", day)
        (count,) = db.execute(sql.SQL("SELECT count(*) FROM ({}) q").format(query)).fetchone()
        assert meta["dagster/partition_row_count"] == meta["rows"] == manifest["rows"] == count
        assert count == backfill["volumes"][day]
        assert meta["sha256"] == manifest["sha256"] == hashlib.sha256(data).hexdigest()
        assert meta["compressed_bytes"] == manifest["compressed_bytes"] == len(data)
        assert meta["raw_bytes"] == manifest["raw_bytes"]
        assert meta["uri"] == meta["dagster/uri"] == manifest["uri"]
        assert meta["source_relation"] == manifest["source_relation"] == f"bf.orders_{day:%Y_%m_%d}"
        assert meta["strategy"] == manifest["strategy"] == "exact_child"
        assert gzip.decompress(data) == postgres_copy(db, query)
    # each day its own figures, not one result stamped on every day of a run
    assert len({m["rows"] for m in by_day.values()}) == len(good)
    assert len({m["sha256"] for m in by_day.values()}) == len(good)


def test_backfill_ran_ranged_runs_through_the_daemon(backfill):
    runs = runs_with_tag(backfill["url"], "dagster/backfill", backfill["id"])
    assert len(runs) == len(DAYS) // PER_RUN
    ranges = sorted(
        (t["dagster/asset_partition_range_start"], t["dagster/asset_partition_range_end"])
        for t in ({x["key"]: x["value"] for x in r["tags"]} for r in runs)
    )
    assert ranges == [
        (DAYS[i].isoformat(), DAYS[i + PER_RUN - 1].isoformat())
        for i in range(0, len(DAYS), PER_RUN)
    ]


def test_a_failing_day_fails_alone(backfill):
    url, bad = backfill["url"], BAD_DAY.isoformat()
    runs = runs_with_tag(url, "dagster/backfill", backfill["id"])
    failed = [r for r in runs if r["status"] == "FAILURE"]
    assert len(failed) == 1 and sum(r["status"] == "SUCCESS" for r in runs) == len(runs) - 1
    (failure,) = step_failures(url, failed[0]["runId"])
    message = failure["error"]["message"]
    assert "bf.orders" in message and bad in message and "row-level security" in message
    assert "not retried" in message
    # the other 7 days of the failed run were published and recorded
    in_failed_run = {
        m["partition"] for m in materializations(url, KEY) if m["runId"] == failed[0]["runId"]
    }
    assert in_failed_run == {
        (BAD_DAY + dt.timedelta(days=n)).isoformat() for n in range(1, PER_RUN)
    }
    # what the UI shows: the backfill page and the asset's partition bar
    (counts,) = backfill["status"]["assetBackfillData"]["assetBackfillStatuses"]
    assert counts["numPartitionsTargeted"] == len(DAYS)
    assert counts["numPartitionsMaterialized"] == len(DAYS) - 1
    assert counts["numPartitionsFailed"] == 1
    assert backfill["status"]["status"] in ("COMPLETED_FAILED", "FAILED", "COMPLETED")
    node = partition_status(url, KEY)
    assert node["partitionStats"]["numMaterialized"] == len(DAYS) - 1
    assert node["partitionStats"]["numFailed"] == 1
    failed_ranges = [r for r in node["assetPartitionStatuses"]["ranges"] if r["status"] == "FAILED"]
    assert failed_ranges == [{"status": "FAILED", "startKey": bad, "endKey": bad}]
    # nothing of the failed day in Bronze, nothing left in staging
    sink = backfill["sink"]
    folder = daily_paths("bf", QualifiedName("bf", "orders"), BAD_DAY).folder
    assert sink.list_files(folder) == []
    assert sink.list_files("_staging") == []


RETRY_DAYS = [dt.date(2026, 9, 1) + dt.timedelta(days=n) for n in range(4)]


def kill_copy_of(conninfo: str, relation: str, killed: list[int], timeout: float = 60) -> None:
    """Terminate the backend running a COPY of `relation`, well inside the stream."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(conninfo, autocommit=True) as c:
        while time.monotonic() < deadline:
            row = c.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'pg_assets%%' "
                "AND state = 'active' AND query LIKE 'COPY %%' AND strpos(query, %s) > 0",
                (relation,),
            ).fetchone()
            if row:
                time.sleep(0.2)
                c.execute("SELECT pg_terminate_backend(%s)", row)
                killed.append(row[0])
                return
            time.sleep(0.01)


def test_lost_connection_retries_only_the_failed_day(pg_conninfo, project):
    """A ranged run whose third day loses its connection mid-COPY: the other days are
    published once, the retry (RetryRequested) redoes only the third."""
    big = RETRY_DAYS[2]
    volumes = {d: 200 for d in RETRY_DAYS} | {big: 300_000}
    with psycopg.connect(pg_conninfo, autocommit=True) as c:
        create_daily_partitioned(c, "retry", "t", RETRY_DAYS, volumes, default_partition=False)
    p = project(
        [{"table": "retry.t", "partition_column": "order_date", "start": str(RETRY_DAYS[0])}],
        postgres={"retries": 2},
        backfill={"max_partitions_per_run": 4},
    )
    killed: list[int] = []
    killer = threading.Thread(target=kill_copy_of, args=(pg_conninfo, f"t_{big:%Y_%m_%d}", killed))
    killer.start()
    result = materialize(
        [p.asset()],
        resources=build_resources(p.config),
        instance=p.instance,
        raise_on_error=False,
        tags={
            "dagster/asset_partition_range_start": RETRY_DAYS[0].isoformat(),
            "dagster/asset_partition_range_end": RETRY_DAYS[-1].isoformat(),
        },
    )
    killer.join()
    assert killed, "the COPY finished before it could be killed"
    assert result.success
    types = [e.event_type_value for e in result.all_events]
    assert types.count("STEP_UP_FOR_RETRY") == 1
    mats = [e.materialization for e in result.get_asset_materialization_events()]
    # each day exactly once: the retry did not redo the three days already published
    assert sorted(m.partition for m in mats) == [d.isoformat() for d in RETRY_DAYS]
    assert mats[-1].partition == big.isoformat()
    assert {m.partition: m.metadata["rows"].value for m in mats} == {
        d.isoformat(): n for d, n in volumes.items()
    }
    assert LocalSink(p.config.bronze.root).list_files("_staging") == []
