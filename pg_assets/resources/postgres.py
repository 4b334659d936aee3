"""PostgresResource: one psycopg connection pool per run process.

The pool opens when a step starts (`setup_for_execution`) and closes at teardown, so a run
pays the connection cost once and a backfill never holds more connections than `pool_max`
per process (the instance's per-source concurrency pool caps the processes). Every
extraction runs in one REPEATABLE READ, READ ONLY transaction: the catalog lookups, the
snapshot LSN and the COPY all see the same snapshot.

The connection string is read from the environment variable named by `conninfo_env` when the
pool opens; it is never stored in config, logged, or put in an error message.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from dagster import ConfigurableResource, InitResourceContext
from psycopg import IsolationLevel
from psycopg_pool import ConnectionPool
from pydantic import Field, PrivateAttr

from pg_assets.core.errors import diagnose_connect
from pg_assets.core.session import (  # re-exported: the session is defined in the pure core
    APPLICATION_NAME,
    PINNED_SETTINGS,
    MissingConninfoError,
    SessionSettingsError,
    connect_kwargs,
    read_conninfo,
)

__all__ = [
    "APPLICATION_NAME",
    "PINNED_SETTINGS",
    "MissingConninfoError",
    "PostgresResource",
    "SessionSettingsError",
    "connect_kwargs",
    "read_conninfo",
]


def _configure(conn: psycopg.Connection) -> None:
    conn.isolation_level = IsolationLevel.REPEATABLE_READ
    conn.read_only = True


def _reset(conn: psycopg.Connection) -> None:
    """A connection goes back to the pool holding no partition lock, whatever happened."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_unlock_all()")


class PostgresResource(ConfigurableResource):
    """A pooled, read-only source database."""

    conninfo_env: str = Field(
        default="PG_ASSETS_CONNINFO", description="Env var holding the libpq connection string."
    )
    pool_min: int = Field(default=1, ge=0)
    pool_max: int = Field(default=4, ge=1)
    connect_timeout_s: float = 10
    statement_timeout_s: float = Field(default=0, description="0 = no limit")

    _pool: ConnectionPool | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: InitResourceContext) -> None:
        conninfo = read_conninfo(self.conninfo_env)
        self._pool = ConnectionPool(
            conninfo,
            min_size=min(self.pool_min, self.pool_max),
            max_size=self.pool_max,
            kwargs=connect_kwargs(self.connect_timeout_s, self.statement_timeout_s, conninfo),
            configure=_configure,
            reset=_reset,
            check=ConnectionPool.check_connection,
            timeout=self.connect_timeout_s,
            name=APPLICATION_NAME,
            open=False,
        )
        # Opened lazily: a step that never touches the database opens no connection.

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        """An idle pooled connection; its transactions are REPEATABLE READ, READ ONLY."""
        if self._pool is None:
            raise RuntimeError("PostgresResource used outside a Dagster execution")
        if self._pool.closed:
            self._pool.open(wait=False)
        with self._pool.connection() as conn:
            yield conn

    @contextmanager
    def snapshot(self) -> Iterator[psycopg.Connection]:
        """A pooled connection inside one REPEATABLE READ, READ ONLY transaction."""
        with self.connection() as conn, conn.transaction():
            yield conn

    def diagnose(self) -> psycopg.OperationalError | None:
        """Why the pool could not connect, in the server's own words (a pool timeout hides
        it): one direct connection attempt, bounded by `connect_timeout_s`."""
        conninfo = read_conninfo(self.conninfo_env)
        return diagnose_connect(
            conninfo, **connect_kwargs(self.connect_timeout_s, self.statement_timeout_s, conninfo)
        )
