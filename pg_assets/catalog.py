"""Check the configuration against the live catalog when the code location loads.

Dagster needs each table's first day to build its partitions; when the config leaves
`start` out we take the lowest partition bound from the catalog. While connected we also
check every table and column, so a typo fails the load with the file, table and key named
instead of failing a run hours later. If the database is unreachable and every table has a
`start`, the location still loads (the same checks then run inside each materialization).
"""

import datetime as dt
import logging
from dataclasses import dataclass

import psycopg

from pg_assets.config import ConfigError, ProjectConfig, TableConfig
from pg_assets.core.planner import CatalogError, TableInfo, describe_table, first_day
from pg_assets.resources.postgres import connect_kwargs, read_conninfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedTable:
    config: TableConfig
    start: dt.date
    info: TableInfo | None  # None when the catalog could not be read at load


def resolve_tables(config: ProjectConfig) -> list[ResolvedTable]:
    pg = config.postgres
    infos: dict[str, TableInfo] = {}
    try:
        conninfo = read_conninfo(pg.conninfo_env)
        with psycopg.connect(
            conninfo,
            **connect_kwargs(
                min(pg.connect_timeout_s, 5), 0, conninfo, lock_timeout_s=pg.lock_timeout_s
            ),
            autocommit=True,
        ) as conn:
            for t in config.tables_of("daily"):
                try:
                    infos[t.table] = describe_table(conn, t.name, t.column)
                except CatalogError as e:
                    raise ConfigError(f"{config.table_context(t)}: key {e.key!r}: {e}") from None
    except (psycopg.OperationalError, RuntimeError) as e:
        missing = [t for t in config.tables_of("daily") if t.start is None]
        if missing:
            raise ConfigError(
                f"{config.table_context(missing[0])}: key 'start': not set, and the first day "
                f"cannot be read from the catalog because PostgreSQL is unreachable ({e}); "
                "set 'start' or make the database reachable"
            ) from None
        log.warning("PostgreSQL unreachable at load; catalog checks deferred to runs: %s", e)
    resolved = []
    for t in config.tables_of("daily"):
        info = infos.get(t.table)
        start = t.start or (first_day(info, t.timezone) if info else None)
        if start is None:
            raise ConfigError(
                f"{config.table_context(t)}: key 'start': not set and {t.name} has no "
                "partition bounds to take it from; set the first day to extract"
            )
        resolved.append(ResolvedTable(t, start, info))
    return resolved
