"""Load and validate the pg_assets configuration file.

One YAML file declares a source (the asset-key prefix and Bronze folder), how to reach its
PostgreSQL (the connection string itself is read from an environment variable, never from
the file), where Bronze lives and which tables to land. Every mistake is reported once, as
`ConfigError`, naming the file, the table and the key, so a user can fix it without reading
a traceback. Catalog checks (does the table exist, is the column splittable by day) happen
in `pg_assets.core.planner` against the live database and carry the same context.
"""

import datetime as dt
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pg_assets.core.compression import CODECS, get_codec
from pg_assets.core.identifiers import QualifiedName, parse_column_name, parse_qualified_name
from pg_assets.core.layout import table_folder
from pg_assets.resources.bronze import AdlsSettings

CONFIG_ENV = "PG_ASSETS_CONFIG"
STATE_DIR_ENV = "PG_ASSETS_STATE_DIR"
DEMO_CONFIG = Path(__file__).parent / "dev" / "demo.yaml"


class ConfigError(ValueError):
    """A configuration mistake, with the file, table and key at fault in its message."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PostgresConfig(_Strict):
    conninfo_env: str = Field(
        default="PG_ASSETS_CONNINFO",
        description="Environment variable holding the libpq connection string.",
    )
    pool_min: int = Field(default=1, ge=0)
    pool_max: int = Field(default=4, ge=1)
    connect_timeout_s: float = Field(default=10, gt=0)
    statement_timeout_s: float = Field(default=0, ge=0, description="0 = no limit")
    retries: int = Field(default=2, ge=0, description="Retries after a lost connection.")
    lock_timeout_s: float = Field(
        default=60,
        gt=0,
        description="How long a day waits for another run of the same day, and for DDL "
        "holding a lock on the relations it reads.",
    )


class BronzeConfig(_Strict):
    root: str
    codec: str = "gzip"
    level: int | None = None
    block_size_mib: float = Field(default=4, gt=0, le=100)
    staging_max_age_h: float | None = Field(
        default=24,
        gt=0,
        description="staging files (`_staging/`) the store last modified longer ago than this, "
        "of runs the Dagster instance does not report in progress, are leftovers of killed runs "
        "and are removed at the start of each run (null: never sweep); for writers the "
        "instance does not know (extract CLI, `pg-assets cdc setup`) it must exceed the "
        "longest time one file takes to write",
    )
    adls: AdlsSettings = AdlsSettings()

    @field_validator("codec")
    @classmethod
    def _known_codec(cls, v: str) -> str:
        if v not in CODECS:
            raise ValueError(f"unknown codec {v!r}; choose one of {sorted(CODECS)}")
        return v


# Days per run of a backfill (BackfillPolicy.multi_run). Measured on the project's 2-core
# machine (bench/RESULTS.md, "Year backfill", ~1,000-row days): a run costs ~2-4 s of process
# start, code load and bookkeeping whatever its size, a day ~0.03 s inside a run. A year took
# 1043 s at 1 day a run, 225 s at 10, 72 s at 30, 58 s at 92 and 46 s at 365. 100 runs a year
# as 4 runs, one per slot of the default per-source pool (4), so bigger days still extract in
# parallel; a failed day never costs its neighbours (each day is published on its own).
DEFAULT_MAX_PARTITIONS_PER_RUN = 100


class BackfillConfig(_Strict):
    """How Dagster backfills group days into runs (per table override: same key in a table)."""

    max_partitions_per_run: int = Field(
        default=DEFAULT_MAX_PARTITIONS_PER_RUN,
        ge=1,
        le=10_000,
        description="Days extracted by one backfill run, each day published on its own.",
    )


def _time_of_day(v: Any) -> Any:
    # YAML reads an unquoted 6:30 as the base-60 integer 390; refuse rather than guess
    if isinstance(v, int | float) and not isinstance(v, bool):
        raise ValueError(f"{v!r} is not a time of day; write it quoted, as 'HH:MM' (e.g. '06:30')")
    return v


class ChecksConfig(_Strict):
    """The `checks:` section: asset checks, the late-data sensor and freshness.

    Set once for the source; a table may override any key in its own `checks:`."""

    enabled: bool = Field(
        default=True,
        description="bronze_readable, matches_source and schema_unchanged on every materialized day",
    )
    content_hash: bool = Field(
        default=False,
        description="also compare an order-independent hash of every row (costs a second scan "
        "of the day at extraction and in each check)",
    )
    read_back_budget_mib: float | None = Field(
        default=None,
        gt=0,
        description="bronze_readable reads at most this much of a day's file (null: all of it)",
    )
    late_data: Literal["rematerialize", "warn"] = Field(
        default="rematerialize",
        description="what the late-data sensor does with a changed day besides failing its "
        "matches_source check",
    )
    window_days: int = Field(
        default=30, ge=1, le=3660, description="closed days the late-data sensor re-counts"
    )
    sensor_interval_s: int = Field(default=900, ge=30, description="late-data sensor interval")
    freshness_deadline: dt.time | None = Field(
        default=dt.time(6, 0),
        description="yesterday's partition must exist by this time of day, in the table's time "
        "zone (null: no freshness check)",
    )

    _deadline = field_validator("freshness_deadline", mode="before")(_time_of_day)


class ChecksOverride(_Strict):
    """A table's `checks:`: any key of the source's section, for this table only."""

    enabled: bool | None = None
    content_hash: bool | None = None
    read_back_budget_mib: float | None = Field(default=None, gt=0)
    late_data: Literal["rematerialize", "warn"] | None = None
    window_days: int | None = Field(default=None, ge=1, le=3660)
    sensor_interval_s: int | None = Field(default=None, ge=30)
    freshness_deadline: dt.time | None = None

    _deadline = field_validator("freshness_deadline", mode="before")(_time_of_day)


class TableConfig(_Strict):
    """One table. `mode` decides how it lands: `daily` (a partition per day, by
    `partition_column`), `incremental` (watermark batches by `cursor`, driven by a sensor) or
    `cdc` (change files from the source's logical replication slot, driven by a sensor)."""

    table: str
    mode: Literal["daily", "incremental", "cdc"] = "daily"
    partition_column: str | None = None
    start: dt.date | None = None
    timezone: str = "UTC"
    max_partitions_per_run: int | None = Field(default=None, ge=1, le=10_000)
    cursor: str | None = Field(default=None, description="incremental: the watermark column")
    key: list[str] | None = Field(
        default=None, description="incremental: the row identity readers dedupe by"
    )
    lookback: str | int | None = Field(
        default=None,
        description="incremental: re-read this far below the watermark (an interval such as "
        "'5 minutes' for time cursors, a count for integer cursors)",
    )
    batch_max_rows: int | None = Field(default=None, gt=0)
    poll_interval_s: float = Field(
        default=30, gt=0, description="incremental: how often the sensor looks for new rows"
    )
    checks: ChecksOverride | None = Field(
        default=None, description="daily: overrides of the source's `checks:` for this table"
    )

    @field_validator("table")
    @classmethod
    def _valid_table(cls, v: str) -> str:
        parse_qualified_name(v)
        return v

    @field_validator("partition_column", "cursor")
    @classmethod
    def _valid_column(cls, v: str | None) -> str | None:
        if v is not None:
            parse_column_name(v)
        return v

    @field_validator("key")
    @classmethod
    def _valid_key(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            if not v:
                raise ValueError("must name at least one column")
            for column in v:
                parse_column_name(column)
        return v

    @model_validator(mode="after")
    def _keys_of_mode(self) -> "TableConfig":
        required = {"daily": ("partition_column",), "incremental": ("cursor", "key"), "cdc": ()}
        allowed = {
            "daily": {"partition_column", "start", "timezone", "checks"},
            "incremental": {
                "cursor",
                "key",
                "lookback",
                "batch_max_rows",
                "poll_interval_s",
                "timezone",  # the writers' TimeZone, for timestamp and date cursors
            },
            "cdc": {"key"},
        }
        for k in required[self.mode]:
            if getattr(self, k) is None:
                raise ValueError(f"key {k!r}: required with mode {self.mode!r}")
        for k in self.model_fields_set - allowed[self.mode] - {"table", "mode"}:
            raise ValueError(f"key {k!r}: not used with mode {self.mode!r}")
        return self

    @field_validator("timezone")
    @classmethod
    def _valid_tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown time zone {v!r} (use an IANA name such as Europe/Berlin)"
            ) from None
        return v

    @property
    def name(self) -> QualifiedName:
        return parse_qualified_name(self.table)

    @property
    def column(self) -> str:
        """The daily partition column (mode `daily` only)."""
        assert self.partition_column is not None, f"{self.table} is not a daily table"
        return parse_column_name(self.partition_column)

    @property
    def cursor_column(self) -> str:
        assert self.cursor is not None, f"{self.table} is not an incremental table"
        return parse_column_name(self.cursor)

    @property
    def key_columns(self) -> list[str]:
        return [parse_column_name(c) for c in self.key or []]

    def fingerprint(self, bronze: BronzeConfig) -> str:
        """A code_version: changes whenever what lands in Bronze for this table would change."""
        # Checks change what is verified, and how days are grouped into runs how they are
        # scheduled, never what lands: neither is part of the version.
        table = self.model_dump(mode="json", exclude={"checks", "max_partitions_per_run"})
        payload = {"table": table, "codec": bronze.codec}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


class CdcConfig(_Strict):
    """The source's logical replication: one publication and one slot for its `cdc` tables."""

    slot: str | None = Field(
        default=None, pattern=r"^[a-z0-9_]{1,63}$", description="default: pg_assets_<source>"
    )
    publication: str | None = Field(default=None, description="default: pg_assets_<source>")
    batch_max_changes: int = Field(default=100_000, gt=0)
    max_lag_mb: float = Field(default=1024, gt=0, description="retained WAL that warns")
    poll_interval_s: float = Field(default=30, gt=0)


class ProjectConfig(_Strict):
    source: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    postgres: PostgresConfig = PostgresConfig()
    bronze: BronzeConfig
    backfill: BackfillConfig = BackfillConfig()
    cdc: CdcConfig = CdcConfig()
    checks: ChecksConfig = ChecksConfig()
    tables: list[TableConfig] = Field(min_length=1)
    path: Path | None = Field(default=None, exclude=True)

    def tables_of(self, mode: str) -> list[TableConfig]:
        return [t for t in self.tables if t.mode == mode]

    @property
    def slot_name(self) -> str:
        return self.cdc.slot or f"pg_assets_{self.source.lower()}"

    @property
    def publication_name(self) -> str:
        return self.cdc.publication or f"pg_assets_{self.source.lower()}"

    def checks_for(self, table: TableConfig) -> ChecksConfig:
        """The source's `checks:` with the table's own `checks:` keys applied over it."""
        if table.checks is None:
            return self.checks
        return self.checks.model_copy(update=table.checks.model_dump(exclude_unset=True))

    def table_context(self, table: TableConfig) -> str:
        return f"{self.path or '<config>'}: table {table.table!r}"

    def max_partitions_per_run(self, table: TableConfig) -> int:
        if table.max_partitions_per_run is not None:
            return table.max_partitions_per_run
        return self.backfill.max_partitions_per_run

    @property
    def state_dir(self) -> Path:
        """Where `pg-assets check` caches what it learned from the catalog (first days):
        `$PG_ASSETS_STATE_DIR`, else `.pg_assets/` beside the config file, so the cache
        travels with the config it describes (ship both in a deployment image)."""
        explicit = os.environ.get(STATE_DIR_ENV)
        if explicit:
            return Path(explicit).resolve()
        base = self.path.parent if self.path is not None else Path.cwd()
        return base / ".pg_assets"

    def bronze_level(self) -> int:
        codec = get_codec(self.bronze.codec)
        return codec.default_level if self.bronze.level is None else self.bronze.level


def _describe_error(path: Path, raw: dict[str, Any], err: dict[str, Any]) -> str:
    loc = list(err["loc"])
    where = f"{path}"
    if len(loc) >= 2 and loc[0] == "tables" and isinstance(loc[1], int):
        tables = raw.get("tables") or []
        entry = tables[loc[1]] if loc[1] < len(tables) else {}
        name = entry.get("table") if isinstance(entry, dict) else None
        where += f": table {name!r}" if name else f": tables[{loc[1]}]"
        loc = loc[2:]
    key = ".".join(str(p) for p in loc) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    if key == "(top level)" and (m := re.match(r"key '([^']+)': (.*)", msg, re.S)):
        key, msg = m.groups()  # a rule over several keys names the one at fault
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    return f"{where}: key {key!r}: {msg}"


def load_config(path: str | os.PathLike[str] | None = None) -> ProjectConfig:
    """Read the file named by `path`, else `$PG_ASSETS_CONFIG`, else the demo file."""
    path = Path(path or os.environ.get(CONFIG_ENV) or DEMO_CONFIG).resolve()
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found (set {CONFIG_ENV})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        cfg = ProjectConfig.model_validate({**raw, "path": path})
    except ValidationError as e:
        raise ConfigError(
            "\n".join(_describe_error(path, raw, err) for err in e.errors())
        ) from None
    seen: dict[QualifiedName, str] = {}
    folders: dict[str, str] = {}
    for t in cfg.tables:
        if t.name in seen:
            raise ConfigError(f"{cfg.table_context(t)}: key 'table': listed twice")
        seen[t.name] = t.table
        # Encoded folders are distinct per table; only letter case can still make two meet
        # (a case-insensitive file system, or a reader that lower-cases paths).
        folder = table_folder(cfg.source, t.name)
        if (other := folders.get(folder.lower())) is not None:
            raise ConfigError(
                f"{cfg.table_context(t)}: key 'table': its Bronze folder {folder!r} differs "
                f"from that of {other!r} only in letter case; the two would share a folder on "
                "case-insensitive storage. Land them from separate sources."
            )
        folders[folder.lower()] = t.table
    codec = get_codec(cfg.bronze.codec)
    level = cfg.bronze_level()
    if level not in codec.levels:
        raise ConfigError(
            f"{path}: key 'bronze.level': {level} is not a valid level for {codec.name} "
            f"({codec.levels.start}..{codec.levels.stop - 1})"
        )
    if not cfg.bronze.root.startswith("abfss://"):
        # Relative local roots resolve against the working directory, as Dagster's do.
        root = Path(cfg.bronze.root.removeprefix("file://")).resolve()
        cfg = cfg.model_copy(update={"bronze": cfg.bronze.model_copy(update={"root": str(root)})})
    return cfg
