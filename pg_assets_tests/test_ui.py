"""The Dagster webserver, as a user meets it: the code location loads from workspace.yaml,
lists one partitioned asset per demo table, and a materialized day shows its metadata.
Queried over the webserver's GraphQL API (what the UI itself calls), and, where Debian's
chromium is installed (.ci/run installs it), rendered in a headless browser."""

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
import requests
import yaml
from dagster import DagsterInstance

from pg_assets.build import build_definitions
from pg_assets.config import DEMO_CONFIG, load_config
from pg_assets.dev.cli import DEMO_DAYS, DEMO_END
from pg_assets.dev.demo_data import load_demo

ROOT = Path(__file__).resolve().parent.parent
DAY = "2026-11-03"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def webserver(pg_conninfo: str, tmp_path_factory: pytest.TempPathFactory):
    with psycopg.connect(pg_conninfo, autocommit=True) as c, c.transaction():
        load_demo(c, DEMO_END, DEMO_DAYS, rows_per_day=200)
    home = tmp_path_factory.mktemp("dagster_home")
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    config = yaml.safe_load(DEMO_CONFIG.read_text())
    config["bronze"]["root"] = str(home / "bronze")
    (home / "pg_assets.yaml").write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "PG_ASSETS_CONFIG": str(home / "pg_assets.yaml"),
    }

    # materialize one day of each table into the same instance the webserver reads
    # (dagster.yaml's storage paths are relative to the working directory, as in the README)
    os.environ.update(env)
    cwd = os.getcwd()
    os.chdir(home)
    try:
        defs = build_definitions(load_config())
        instance = DagsterInstance.get()
        for schedule in defs.schedules or []:
            job = defs.resolve_job_def(schedule.job_name)
            assert job.execute_in_process(partition_key=DAY, instance=instance).success
    finally:
        os.chdir(cwd)
        for k in ("DAGSTER_HOME", "PG_ASSETS_CONFIG"):
            os.environ.pop(k, None)

    port = _free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster-webserver"), "-w", str(ROOT / "workspace.yaml"),
         "-h", "127.0.0.1", "-p", str(port)],
        cwd=home, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if requests.get(f"{url}/server_info", timeout=2).ok:
                break
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline and proc.poll() is None, "webserver did not start"
        time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(30)


def graphql(url: str, query: str, **variables: object) -> dict:
    r = requests.post(f"{url}/graphql", json={"query": query, "variables": variables}, timeout=60)
    r.raise_for_status()
    body = r.json()
    assert "errors" not in body, body
    return body["data"]


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
    daily = {"demo/public/orders", "demo/public/events", "demo/public/customers"}
    assert set(nodes) == daily | {"demo/public/payments"}  # payments: incremental
    for key in daily:
        assert nodes[key]["isPartitioned"] and nodes[key]["groupName"] == "demo"
        assert DAY in nodes[key]["partitionKeys"]


def test_materialized_day_shows_its_metadata(webserver):
    data = graphql(
        webserver,
        """query ($day: String!) {
            assetOrError(assetKey: {path: ["demo", "public", "orders"]}) {
              ... on Asset { assetMaterializations(partitions: [$day]) {
                  partition metadataEntries { label
                    ... on IntMetadataEntry { intValue }
                    ... on TextMetadataEntry { text }
                    ... on PathMetadataEntry { path } } } } } }""",
        day=DAY,
    )
    (mat,) = data["assetOrError"]["assetMaterializations"]
    meta = {
        e["label"]: e.get("intValue") or e.get("text") or e.get("path")
        for e in mat["metadataEntries"]
    }
    assert mat["partition"] == DAY
    assert meta["rows"] == 200 and meta["dagster/partition_row_count"] == 200
    assert (
        meta["strategy"] == "exact_child" and meta["source_relation"] == "public.orders_2026_11_03"
    )
    assert re.search(
        r"/date=2026-11-03/orders-2026-11-03-\d{8}T\d{6}Z-[0-9a-f]{8}\.csv\.gz$", meta["uri"]
    )
    for key in ("raw_bytes", "compressed_bytes", "compression_ratio", "mb_per_s", "snapshot"):
        assert key in meta


@pytest.mark.skipif(not shutil.which("chromium"), reason="Debian's chromium is not installed")
def test_browser_renders_the_asset_catalog(webserver, tmp_path):
    out = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=20000", "--dump-dom", f"{webserver}/assets/demo/public"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    dom = out.stdout
    for table in ("orders", "events", "customers"):
        assert table in dom, f"{table} not rendered"
