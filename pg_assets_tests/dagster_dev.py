"""A running Dagster webserver + daemon for tests, on a temporary DAGSTER_HOME.

Uses the project's own dagster.yaml (run queue, pools, concurrency limits) and workspace.yaml,
so runs go through the daemon's queue and the code location is loaded the way a deployment
loads it — nothing here calls execute_in_process. Every wait is bounded; `stop()` kills what
is left of both process groups (their code servers and runs included).
"""

import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests
import yaml

from pg_assets.dev.services import DagsterServices

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def graphql(url: str, query: str, **variables: Any) -> dict[str, Any]:
    r = requests.post(f"{url}/graphql", json={"query": query, "variables": variables}, timeout=60)
    r.raise_for_status()
    body = r.json()
    assert "errors" not in body, body
    return body["data"]


@contextmanager
def dagster_services(
    home: Path, config: dict[str, Any], *, conninfo: str, start_daemon: bool = True
) -> Iterator[DagsterServices]:
    """Webserver (and daemon) on DAGSTER_HOME=`home` with `config` as PG_ASSETS_CONFIG."""
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    (home / "pg_assets.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    env = {
        "PG_ASSETS_CONFIG": str(home / "pg_assets.yaml"),
        "PG_ASSETS_CONNINFO": conninfo,
    }
    services = DagsterServices(
        cwd=home,
        dagster_home=home,
        workspace=ROOT / "workspace.yaml",
        port=free_port(),
        env=env,
        log_dir=home / "service_logs",
    )
    try:
        services.start_webserver()
        if start_daemon:
            services.start_daemon()
        services.wait_ready(180)
        yield services
    except BaseException:
        for log in sorted((home / "service_logs").glob("*.log")):
            print(f"--- {log.name} (last 3000 chars)\n{log.read_text(errors='replace')[-3000:]}")
        raise
    finally:
        services.stop()


LAUNCH_BACKFILL = """
mutation ($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
  }
}"""


def launch_backfill(url: str, key: list[str], partitions: list[str]) -> str:
    """What the UI's "Launch backfill" sends for a range of one asset's partitions."""
    params = {
        "assetSelection": [{"path": key}],
        "partitionNames": partitions,
        "fromFailure": False,
        "tags": [],
    }
    out = graphql(url, LAUNCH_BACKFILL, params=params)["launchPartitionBackfill"]
    assert out["__typename"] == "LaunchBackfillSuccess", out
    return out["backfillId"]


BACKFILL = """
query ($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    ... on PartitionBackfill {
      id status numPartitions
      assetBackfillData { assetBackfillStatuses {
        ... on AssetPartitionsStatusCounts { assetKey { path } numPartitionsTargeted
            numPartitionsInProgress numPartitionsMaterialized numPartitionsFailed } } }
    }
  }
}"""

TERMINAL = {"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"}


def wait_backfill(services: DagsterServices, backfill_id: str, timeout_s: float) -> dict[str, Any]:
    """Until the daemon has marked the backfill finished (it does so on its next loop after
    the last run ends, up to 30 s later)."""
    deadline = time.monotonic() + timeout_s
    while True:
        services.check_alive()
        data = graphql(services.url, BACKFILL, id=backfill_id)["partitionBackfillOrError"]
        if data.get("status") in TERMINAL:
            return data
        assert time.monotonic() < deadline, f"backfill not finished after {timeout_s} s: {data}"
        time.sleep(1)


RUNS = """
query ($tags: [ExecutionTag!]) {
  runsOrError(filter: {tags: $tags}) {
    ... on Runs { results { runId status tags { key value } } }
  }
}"""


def runs_with_tag(url: str, key: str, value: str) -> list[dict[str, Any]]:
    data = graphql(url, RUNS, tags=[{"key": key, "value": value}])
    return data["runsOrError"]["results"]


FAILURES = """
query ($runId: ID!) {
  runOrError(runId: $runId) {
    ... on Run { eventConnection(afterCursor: null) { events {
        __typename
        ... on ExecutionStepFailureEvent { error { message } failureMetadata { metadataEntries {
            label ... on JsonMetadataEntry { jsonString } } } } } } }
  }
}"""


def step_failures(url: str, run_id: str) -> list[dict[str, Any]]:
    events = graphql(url, FAILURES, runId=run_id)["runOrError"]["eventConnection"]["events"]
    return [e for e in events if e["__typename"] == "ExecutionStepFailureEvent"]


MATERIALIZATIONS = """
query ($key: AssetKeyInput!) {
  assetOrError(assetKey: $key) {
    ... on Asset { assetMaterializations {
        partition runId metadataEntries { label
          ... on IntMetadataEntry { intValue }
          ... on FloatMetadataEntry { floatValue }
          ... on TextMetadataEntry { text }
          ... on PathMetadataEntry { path }
          ... on UrlMetadataEntry { url } } } }
  }
}"""


def materializations(url: str, key: list[str]) -> list[dict[str, Any]]:
    """Every materialization of `key`, each as {partition, runId, metadata{label: value}}."""
    data = graphql(url, MATERIALIZATIONS, key={"path": key})["assetOrError"]
    out = []
    for m in data["assetMaterializations"]:
        meta = {}
        for e in m["metadataEntries"]:
            for field in ("intValue", "floatValue", "text", "path", "url"):
                if e.get(field) is not None:
                    meta[e["label"]] = e[field]
        out.append({"partition": m["partition"], "runId": m["runId"], "metadata": meta})
    return out


PARTITION_STATUS = """
query ($key: AssetKeyInput!) {
  assetNodeOrError(assetKey: $key) {
    ... on AssetNode {
      partitionStats { numMaterialized numFailed numMaterializing numPartitions }
      assetPartitionStatuses { ... on TimePartitionStatuses {
          ranges { status startKey endKey } } }
    }
  }
}"""


def partition_status(url: str, key: list[str]) -> dict[str, Any]:
    return graphql(url, PARTITION_STATUS, key={"path": key})["assetNodeOrError"]


def env_without(*names: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in names}
