"""How every pg_assets connection to PostgreSQL is opened (pool, catalog checks, the CLI).

No Dagster here: the extract CLI and the benchmark open connections the same way the
Dagster resource does, so a file extracted by either is the same byte for byte.
"""

import os

APPLICATION_NAME = "pg_assets"


class MissingConninfoError(RuntimeError):
    pass


def read_conninfo(env_var: str) -> str:
    value = os.environ.get(env_var)
    if not value:
        raise MissingConninfoError(
            f"environment variable {env_var} is not set; it must hold the PostgreSQL "
            "connection string (e.g. 'host=db.example.com dbname=shop user=reader')"
        )
    return value


def connect_kwargs(connect_timeout_s: float, statement_timeout_s: float) -> dict[str, object]:
    kwargs: dict[str, object] = {
        "application_name": APPLICATION_NAME,
        "connect_timeout": max(1, int(connect_timeout_s)),
    }
    if statement_timeout_s:
        kwargs["options"] = f"-c statement_timeout={int(statement_timeout_s * 1000)}"
    return kwargs
