"""The code location loads without the database; `pg-assets check` is where the catalog is
read, and a check that could not check never exits 0.

Loading is what the webserver, the daemon and every run process do first, so it must neither
need PostgreSQL nor pay for it: a 200-table config is imported in a fresh interpreter with its
conninfo pointing at a loopback listener that counts connection attempts (it must see none).
"""

import datetime as dt
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import yaml

from pg_assets.catalog import CACHE_FILE, UncheckableError, check_tables
from pg_assets.config import load_config

PG_ASSETS = str(Path(sys.executable).parent / "pg-assets")


class CountingListener:
    """A TCP port on loopback that accepts and counts connections (and answers nothing)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[CountingListener]:
    server = CountingListener()
    yield server
    server.close()


def config_file(path: Path, n: int, *, start: bool = True, **table: str) -> Path:
    tables = [
        {"table": f"public.t{i:03d}", "partition_column": "d", **table}
        | ({"start": "2025-01-01"} if start else {})
        for i in range(n)
    ]
    doc = {"source": "load", "bronze": {"root": str(path.parent / "bronze")}, "tables": tables}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def import_definitions(config: Path, conninfo: str, **env: str) -> subprocess.CompletedProcess:
    code = "import pg_assets.definitions as d; print(len(d.defs.assets))"
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PG_ASSETS_CONFIG": str(config), "PG_ASSETS_CONNINFO": conninfo, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_200_tables_load_with_the_database_unreachable(tmp_path, listener):
    config = config_file(tmp_path / "big.yaml", 200)
    out = import_definitions(
        config, f"host=127.0.0.1 port={listener.port} user=x password=s3cret connect_timeout=2"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "200"
    assert listener.accepted == 0, "loading the definitions connected to PostgreSQL"


def test_missing_start_without_cache_says_what_to_do(tmp_path, listener):
    config = config_file(tmp_path / "nostart.yaml", 2, start=False)
    out = import_definitions(config, f"host=127.0.0.1 port={listener.port} user=x")
    assert out.returncode != 0
    assert "table 'public.t000': key 'start': not set" in out.stderr
    assert "run `pg-assets check`" in out.stderr
    assert listener.accepted == 0


@pytest.fixture
def checkable(db: psycopg.Connection) -> None:
    db.execute("DROP SCHEMA IF EXISTS loadcheck CASCADE")
    db.execute("CREATE SCHEMA loadcheck")
    db.execute("CREATE TABLE loadcheck.t (id int, d date) PARTITION BY RANGE (d)")
    db.execute(
        "CREATE TABLE loadcheck.t_2025_03 PARTITION OF loadcheck.t "
        "FOR VALUES FROM ('2025-03-01') TO ('2025-04-01')"
    )


def loadcheck_config(tmp_path: Path, column: str, **table: str) -> Path:
    """A config of source `lc` with the one table loadcheck.t, Bronze under tmp_path."""
    config = tmp_path / "c.yaml"
    entry = {"table": "loadcheck.t", "partition_column": column, **table}
    config.write_text(
        yaml.safe_dump(
            {"source": "lc", "bronze": {"root": str(tmp_path / "bronze")}, "tables": [entry]}
        )
    )
    return config


def cli(args: list[str], config: Path, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PG_ASSETS, *args],
        cwd=cwd,
        env={**os.environ, "PG_ASSETS_CONFIG": str(config), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_check_caches_the_first_day_and_loading_uses_it(checkable, tmp_path, pg_conninfo):
    config = loadcheck_config(tmp_path, "d")
    out = cli(["check"], config, tmp_path, PG_ASSETS_CONNINFO=pg_conninfo)
    assert out.returncode == 0, out.stderr
    assert "loadcheck.t: ok" in out.stdout and "first day 2025-03-01" in out.stdout
    assert (tmp_path / ".pg_assets" / CACHE_FILE).exists()
    # now the location loads, from the cache, with the database gone
    code = (
        "import pg_assets.definitions as d; "
        "print(next(iter(d.defs.assets)).partitions_def.start.date())"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code],
        env={
            **os.environ,
            "PG_ASSETS_CONFIG": str(config),
            "PG_ASSETS_CONNINFO": "host=127.0.0.1 port=1 user=x connect_timeout=1",
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip().splitlines()[-1] == "2025-03-01"


def test_check_fails_when_it_cannot_check(checkable, tmp_path, pg_conninfo, listener, monkeypatch):
    config = loadcheck_config(tmp_path, "dd", start="2025-03-01")
    # a misspelled column: a config error, exit 2, naming file, table and key
    out = cli(["check"], config, tmp_path, PG_ASSETS_CONNINFO=pg_conninfo)
    assert out.returncode == 2, out
    assert f"{config}: table 'loadcheck.t': key 'partition_column'" in out.stderr
    assert "has no column dd" in out.stderr
    # an unreachable database: could not check, exit 1, the secret not printed
    down = "host=127.0.0.1 port=1 user=x password=s3cret connect_timeout=2"
    out = cli(["check"], config, tmp_path, PG_ASSETS_CONNINFO=down)
    assert out.returncode == 1, out
    assert "could not check" in out.stderr and "s3cret" not in out.stderr + out.stdout
    monkeypatch.setenv("PG_ASSETS_CONNINFO", f"host=127.0.0.1 port={listener.port} user=x")
    with pytest.raises(UncheckableError, match="PostgreSQL is unreachable"):
        check_tables(load_config(config))


def test_backfill_outside_the_tables_days_is_one_line(checkable, tmp_path, pg_conninfo):
    """`pg-assets backfill` of days before the first day or not yet ended names the table and
    the days it has, and runs nothing."""
    config = loadcheck_config(tmp_path, "d", start="2025-03-01")
    today = dt.datetime.now(dt.UTC).date()
    for start, end in [("2025-02-27", "2025-03-02"), (str(today), str(today))]:
        out = cli(["backfill", "--start", start, "--end", end], config, tmp_path,
                  PG_ASSETS_CONNINFO=pg_conninfo, DAGSTER_HOME=str(tmp_path / "dh"))  # fmt: skip
        assert out.returncode == 2, out.stdout + out.stderr
        assert "Traceback" not in out.stderr
        assert out.stderr.startswith(f"error: table loadcheck.t: {start} to {end} is not within")
        assert f"2025-03-01 to {today - dt.timedelta(days=1)}" in out.stderr
    assert not (tmp_path / "bronze").exists()


def test_backfill_of_a_table_that_is_not_daily_says_so(checkable, tmp_path, pg_conninfo):
    config = loadcheck_config(tmp_path, "d", start="2025-03-01")
    doc = yaml.safe_load(config.read_text())
    doc["tables"].append({"table": "loadcheck.i", "mode": "incremental", "cursor": "at",
                          "key": ["id"]})  # fmt: skip
    config.write_text(yaml.safe_dump(doc))
    for table, said in [
        ("loadcheck.i", "table loadcheck.i is incremental, not daily"),
        ("loadcheck.nope", f"table loadcheck.nope is not in {config}"),
    ]:
        out = cli(["backfill", "--start", "2025-03-01", "--end", "2025-03-01", "--table", table],
                  config, tmp_path, PG_ASSETS_CONNINFO=pg_conninfo)  # fmt: skip
        assert out.returncode == 2 and out.stderr.startswith(f"error: {said}"), out.stderr
