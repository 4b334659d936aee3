"""What the code location needs to know about each table, without touching the database.

Dagster loads the code location in the webserver, the daemon and every run process, so loading
must be cheap and must not depend on PostgreSQL being up. Building the definitions therefore
reads no catalog: each table's first day (where its daily partitions start) is its `start` from
the config, or the first day `pg-assets check` (or `pg-assets demo`) read from the catalog and
cached in `<state dir>/first_days.json` (see `ProjectConfig.state_dir`). A table with neither
is a clear load error telling the user which to do.

Catalog validation (does the table exist, is the column there and splittable by day) runs in
`check_tables` — `pg-assets check` — and again in every materialization, which describes the
table once per run before extracting its days.
"""

import datetime as dt
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psycopg

from pg_assets.config import ConfigError, ProjectConfig, TableConfig
from pg_assets.core.planner import CatalogError, TableInfo, describe_table, first_day
from pg_assets.resources.postgres import connect_kwargs, read_conninfo

CACHE_FILE = "first_days.json"


@dataclass(frozen=True)
class ResolvedTable:
    config: TableConfig
    start: dt.date
    start_from: str  # "config" or the cache file it came from


def cache_key(config: ProjectConfig, table: TableConfig) -> str:
    """Everything the first day depends on: a changed column or time zone is a new entry."""
    return f"{config.source}|{table.name}|{table.column}|{table.timezone}"


def cache_path(config: ProjectConfig) -> Path:
    return config.state_dir / CACHE_FILE


def read_cache(config: ProjectConfig) -> dict[str, str]:
    try:
        data = json.loads(cache_path(config).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ConfigError(f"{cache_path(config)}: unreadable first-day cache ({e})") from None
    days = data.get("first_days") if isinstance(data, dict) else None
    return days if isinstance(days, dict) else {}


def write_cache(config: ProjectConfig, first_days: dict[str, dt.date]) -> Path:
    """Merge `first_days` into the cache, atomically (a concurrent reader sees old or new)."""
    path = cache_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = {**read_cache(config), **{k: v.isoformat() for k, v in first_days.items()}}
    body = {
        "written_by": "pg-assets check",
        "written_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "first_days": dict(sorted(merged.items())),
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".first_days-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(body, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def resolve_tables(config: ProjectConfig) -> list[ResolvedTable]:
    """Each table's first day from the config or the cache. Makes no connection."""
    cached: dict[str, str] | None = None
    resolved = []
    for t in config.tables_of("daily"):
        if t.start is not None:
            resolved.append(ResolvedTable(t, t.start, "config"))
            continue
        if cached is None:
            cached = read_cache(config)
        day = cached.get(cache_key(config, t))
        if day is None:
            raise ConfigError(
                f"{config.table_context(t)}: key 'start': not set, and no first day is cached "
                f"for this table in {cache_path(config)}; run `pg-assets check` to read it "
                "from the catalog once, or set 'start' (YYYY-MM-DD)"
            )
        resolved.append(ResolvedTable(t, dt.date.fromisoformat(day), str(cache_path(config))))
    return resolved


@dataclass(frozen=True)
class CheckedTable:
    config: TableConfig
    info: TableInfo
    start: dt.date
    start_from: str  # "config" or "catalog"


class UncheckableError(RuntimeError):
    """The catalog could not be read at all (no conninfo, database unreachable)."""


def check_tables(config: ProjectConfig) -> list[CheckedTable]:
    """Validate every table against the live catalog and cache the first days it discovers.

    Raises ConfigError (naming file, table and key) for a mistake in the config, and
    UncheckableError when the database cannot be reached: a check that could not check must
    never look like a pass.
    """
    pg = config.postgres
    try:
        conninfo = read_conninfo(pg.conninfo_env)
    except RuntimeError as e:
        raise UncheckableError(str(e)) from None
    checked: list[CheckedTable] = []
    errors: list[str] = []
    try:
        with psycopg.connect(
            conninfo,
            **connect_kwargs(
                min(pg.connect_timeout_s, 10), 0, conninfo, lock_timeout_s=pg.lock_timeout_s
            ),
            autocommit=True,
        ) as conn:
            for t in config.tables_of("daily"):
                try:
                    info = describe_table(conn, t.name, t.column)
                except CatalogError as e:
                    errors.append(f"{config.table_context(t)}: key {e.key!r}: {e}")
                    continue
                if t.start is not None:
                    checked.append(CheckedTable(t, info, t.start, "config"))
                    continue
                day = first_day(info, t.timezone)
                if day is None:
                    errors.append(
                        f"{config.table_context(t)}: key 'start': not set and {t.name} has no "
                        "partition bounds to take it from; set the first day to extract"
                    )
                    continue
                checked.append(CheckedTable(t, info, day, "catalog"))
    except psycopg.OperationalError as e:
        # psycopg's message names host and port, never the password
        raise UncheckableError(f"PostgreSQL is unreachable: {str(e).strip()}") from None
    if errors:
        raise ConfigError("\n".join(errors))
    discovered = {cache_key(config, c.config): c.start for c in checked if c.start_from != "config"}
    if discovered:
        write_cache(config, discovered)
    return checked
