"""The Dagster webserver and daemon, as a user meets them: the code location loads from
workspace.yaml, lists one partitioned asset per demo table, a day materialized from the UI
goes through the daemon's run queue and shows its own metadata. Queried over the webserver's
GraphQL API (what the UI itself calls) and, where Debian's chromium is installed (.ci/run
installs it), clicked through in a headless browser."""

import datetime as dt
import re
import time

import psycopg
import pytest
import yaml
from psycopg import sql

from pg_assets.config import DEMO_CONFIG
from pg_assets.dev.demo_data import load_demo
from pg_assets_tests.browser import CHROMIUM, Browser
from pg_assets_tests.conftest import day_query
from pg_assets_tests.dagster_dev import dagster_services, graphql

END = dt.date(2026, 11, 4)
DAY = "2026-11-03"
TABLES = {
    "orders": ("order_date", "date", "UTC"),
    "events": ("occurred_at", "timestamptz", "Europe/Berlin"),
    "customers": ("signup_date", "date", "UTC"),
}

LAUNCH_RUN = """
mutation ($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId status } }
    ... on PythonError { message }
  }
}"""

RUN = """
query ($id: ID!) {
  runOrError(runId: $id) {
    ... on Run { status eventConnection(afterCursor: null) {
        events { __typename ... on MessageEvent { message } } } }
  }
}"""


def launch_asset_run(url: str, table: str, day: str) -> str:
    """What the UI's "Materialize" sends for one partition of one asset."""
    params = {
        "selector": {
            "repositoryLocationName": "pg_assets",
            "repositoryName": "__repository__",
            "jobName": "__ASSET_JOB",
            "assetSelection": [{"path": ["demo", "public", table]}],
        },
        "mode": "default",
        "executionMetadata": {"tags": [{"key": "dagster/partition", "value": day}]},
    }
    out = graphql(url, LAUNCH_RUN, params=params)["launchRun"]
    assert out["__typename"] == "LaunchRunSuccess", out
    return out["run"]["runId"]


@pytest.fixture(scope="module")
def webserver(pg_conninfo: str, tmp_path_factory: pytest.TempPathFactory):
    with psycopg.connect(pg_conninfo, autocommit=True) as c, c.transaction():
        load_demo(c, END, rows_per_day=200)
    home = tmp_path_factory.mktemp("dagster_home")
    config = yaml.safe_load(DEMO_CONFIG.read_text())
    config["bronze"]["root"] = str(home / "bronze")
    with dagster_services(home, config, conninfo=pg_conninfo) as services:
        runs = {t: launch_asset_run(services.url, t, DAY) for t in TABLES}
        deadline = time.monotonic() + 240
        for table, run_id in runs.items():
            while True:
                services.check_alive()
                run = graphql(services.url, RUN, id=run_id)["runOrError"]
                if run["status"] in ("SUCCESS", "FAILURE", "CANCELED"):
                    break
                assert time.monotonic() < deadline, f"run of {table} still {run['status']}"
                time.sleep(0.5)
            assert run["status"] == "SUCCESS", (table, run)
            types = {e["__typename"] for e in run["eventConnection"]["events"]}
            # queued by the webserver, taken off the queue and launched by the daemon
            assert {"RunEnqueuedEvent", "RunStartingEvent", "RunStartEvent"} <= types
            # one step, run in the run's own process: no second process loading the code
            messages = [e.get("message") or "" for e in run["eventConnection"]["events"]]
            assert any(m.startswith("Executing steps in process") for m in messages)
        yield services.url


def test_ui_lists_one_partitioned_asset_per_demo_table(webserver):
    data = graphql(
        webserver,
        "{ assetNodes { assetKey { path } groupName isPartitioned partitionKeys"
        " dependencyKeys { path } } }",
    )
    nodes = {"/".join(n["assetKey"]["path"]): n for n in data["assetNodes"]}
    cdc = nodes.pop("demo/public/inventory/cdc")  # the demo's CDC table: not partitioned
    assert not cdc["isPartitioned"] and cdc["groupName"] == "demo"
    silver = nodes.pop("demo/silver/daily_order_totals")  # the downstream example (Silver)
    assert silver["dependencyKeys"] == [{"path": ["demo", "public", "orders"]}]
    assert silver["isPartitioned"] and DAY in silver["partitionKeys"]
    daily = {f"demo/public/{t}" for t in TABLES}
    assert set(nodes) == daily | {"demo/public/payments"}  # payments: incremental
    for key in daily:
        assert nodes[key]["isPartitioned"] and nodes[key]["groupName"] == "demo"
        assert DAY in nodes[key]["partitionKeys"]


METADATA = """
query ($key: [String!]!, $day: String!) {
  assetOrError(assetKey: {path: $key}) {
    ... on Asset { assetMaterializations(partitions: [$day]) {
        partition metadataEntries { label
          ... on IntMetadataEntry { intValue }
          ... on TextMetadataEntry { text }
          ... on PathMetadataEntry { path } } } } } }"""


@pytest.mark.parametrize("table", list(TABLES))
def test_materialized_day_shows_its_metadata(webserver, db, table):
    data = graphql(webserver, METADATA, key=["demo", "public", table], day=DAY)
    (mat,) = data["assetOrError"]["assetMaterializations"]
    meta = {
        e["label"]: e.get("intValue") or e.get("text") or e.get("path")
        for e in mat["metadataEntries"]
    }
    column, kind, tz = TABLES[table]
    query = day_query(sql.Identifier("public", table), column, dt.date.fromisoformat(DAY), kind, tz)
    (count,) = db.execute(sql.SQL("SELECT count(*) FROM ({}) q").format(query)).fetchone()
    assert mat["partition"] == DAY
    assert meta["rows"] == meta["dagster/partition_row_count"] == count > 0
    assert re.search(
        rf"/date={DAY}/{table}-{DAY}-\d{{8}}T\d{{12}}Z-[0-9a-f]{{8}}\.csv\.gz$", meta["uri"]
    )
    for key in (
        "raw_bytes",
        "compressed_bytes",
        "compression_ratio",
        "mb_per_s",
        "sha256",
        "snapshot",
    ):
        assert key in meta
    if table == "orders":
        assert (meta["strategy"], meta["source_relation"]) == (
            "exact_child",
            "public.orders_2026_11_03",
        )


@pytest.mark.skipif(not CHROMIUM, reason="Debian's chromium is not installed")
def test_browser_shows_the_catalog_behind_the_first_visit_dialog(webserver, tmp_path):
    browser = Browser(tmp_path / "profile")
    try:
        browser.goto(f"{webserver}/assets/demo/public")
        # a first visit opens Dagster's community dialog over the page; a user skips it
        browser.wait_text("Join the Dagster community")
        assert browser.click_button("Skip")
        deadline = time.monotonic() + 30
        while "Join the Dagster community" in browser.text():
            assert time.monotonic() < deadline, "the dialog did not close"
            time.sleep(0.25)
        text = browser.wait_text("orders", "events", "customers", "demo")
        assert "Daily extract of PostgreSQL table public.orders" in text
        browser.screenshot(tmp_path / "catalog.png")
        # the materialized day, on the orders asset's partitions view
        browser.goto(f"{webserver}/assets/demo/public/orders?view=partitions&partition={DAY}")
        text = browser.wait_text(DAY, "public.orders_2026_11_03", "exact_child")
        assert "Join the Dagster community" not in text  # skipping is remembered
        browser.screenshot(tmp_path / "partition.png")
    finally:
        browser.close()
    print(f"screenshots: {tmp_path}/catalog.png {tmp_path}/partition.png")
