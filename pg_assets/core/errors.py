"""Which failures are worth retrying, and how to say what went wrong.

A retry helps only when the next attempt can meet a different world: the connection was
lost (network, failover, `pg_terminate_backend`), the server had no free connection slot, or
a serialization conflict. Everything else — a statement timeout, a full disk, an exhausted
memory, a lock wait that timed out, a wrong password, a missing privilege — fails the same way
again, so retrying it only delays the error a user needs to see (2.5 minutes of retries for a
wrong password, before this module existed).

psycopg reports lost connections as `OperationalError`, sometimes with an SQLSTATE (57P01
when the backend was terminated), sometimes without one (the socket just closed). Errors
raised while connecting carry no SQLSTATE at all, only libpq's message, which is why
authentication failures are recognised by their text.
"""

import re
from dataclasses import dataclass

import psycopg
import psycopg_pool

from pg_assets.core.planner import ConcurrentChangeError, LockTimeoutError

# SQLSTATE → class name, for those worth retrying
_RETRYABLE_STATES = {
    "57P01": "lost connection (admin shutdown)",
    "57P02": "lost connection (crash shutdown)",
    "57P03": "lost connection (server cannot accept connections now)",
    "53300": "too many connections",
    "40001": "serialization failure",
    "40P01": "deadlock detected",
}
_NAMED_STATES = {
    "57014": "statement timeout or cancel",
    "55P03": "lock not available (lock timeout)",
    "53100": "disk full",
    "53200": "out of memory",
    "42501": "insufficient privilege",
}
_AUTH = re.compile(
    r"password authentication failed|no pg_hba\.conf entry|role \"?[^\"]+\"? does not exist|"
    r"database \"?[^\"]+\"? does not exist|permission denied|no password supplied|"
    r"certificate verify failed|server does not support SSL|authentication failed|"
    r"SCRAM authentication|GSSAPI",
    re.I,
)
_LOST = re.compile(
    r"server closed the connection|terminating connection|connection refused|"
    r"could not connect|timeout expired|connection timed out|connection reset|"
    r"consuming input failed|sending query failed|the connection is lost|"
    r"no route to host|could not translate host name|network is unreachable|"
    r"connection is closed|connection to server .* failed",
    re.I,
)


@dataclass(frozen=True)
class Classified:
    retryable: bool
    kind: str  # "lost connection", "authentication", "statement timeout or cancel", ...


def classify(error: BaseException | None) -> Classified:
    """Walk the cause chain; the first PostgreSQL/pool error decides."""
    seen = 0
    while error is not None and seen < 20:
        seen += 1
        if isinstance(error, psycopg.Error):
            state = error.sqlstate
            if state in _RETRYABLE_STATES:
                return Classified(True, _RETRYABLE_STATES[state])
            if state and state.startswith("08"):
                return Classified(True, f"lost connection (SQLSTATE {state})")
            if state and state.startswith("28"):
                return Classified(False, "authentication")
            if state:
                return Classified(False, _NAMED_STATES.get(state, f"SQLSTATE {state}"))
            if isinstance(error, psycopg.OperationalError):
                text = str(error)
                if _AUTH.search(text):
                    return Classified(False, "authentication")
                if _LOST.search(text) or _broken(error):
                    return Classified(True, "lost connection")
            return Classified(False, type(error).__name__)
        if isinstance(error, psycopg_pool.PoolTimeout):
            return Classified(True, "no connection from the pool")
        if isinstance(error, LockTimeoutError):  # DDL held a lock too long; nothing was read
            return Classified(True, "lock timeout (concurrent DDL)")
        if isinstance(error, ConcurrentChangeError):  # the catalog moved twice; nothing read
            return Classified(True, "concurrent DDL")
        error = error.__cause__ or error.__context__
    return Classified(False, "error")


def _broken(error: psycopg.Error) -> bool:
    conn = getattr(getattr(error, "pgconn", None), "status", None)
    return conn is not None and conn != 0  # CONNECTION_OK == 0


def diagnose_connect(conninfo: str, **kwargs: object) -> psycopg.OperationalError | None:
    """Open one direct connection to learn why a pool could not: a pool timeout hides the
    server's own message (a wrong password, a missing database)."""
    try:
        psycopg.connect(conninfo, **kwargs).close()  # type: ignore[arg-type]
    except psycopg.OperationalError as e:
        return e
    return None
