"""Build Dagster definitions (assets, resources, schedules) from a validated config.

Building reads no catalog and opens no connection (see pg_assets.catalog): the code location
loads in the webserver, the daemon and every run process, with or without the database.
"""

from dagster import Definitions, in_process_executor

from pg_assets.assets.cdc import build_cdc
from pg_assets.assets.daily import asset_key, build_daily_asset
from pg_assets.assets.incremental import build_incremental
from pg_assets.assets.silver_demo import demo_silver_assets
from pg_assets.catalog import resolve_tables
from pg_assets.checks import build_checks
from pg_assets.config import ConfigError, ProjectConfig
from pg_assets.resources.bronze import BronzeResource
from pg_assets.resources.postgres import PostgresResource
from pg_assets.schedules import build_daily_schedule


def build_resources(config: ProjectConfig) -> dict[str, object]:
    """The config file's `postgres` and `bronze` sections are the resources' own fields."""
    bronze = config.bronze.model_dump(exclude={"adls"})
    return {
        "postgres": PostgresResource(
            **config.postgres.model_dump(exclude={"retries", "lock_timeout_s"})
        ),
        "bronze": BronzeResource(
            **{**bronze, "level": config.bronze_level()}, adls=config.bronze.adls
        ),
    }


def build_definitions(config: ProjectConfig) -> Definitions:
    resolved = resolve_tables(config)
    keys: dict[object, str] = {}
    for r in resolved:
        k = asset_key(config.source, r)
        if k in keys:
            raise ConfigError(
                f"{config.table_context(r.config)}: key 'table': maps to the same asset key "
                f"{k.to_user_string()} as {keys[k]!r}"
            )
        keys[k] = r.config.table
    assets = [build_daily_asset(config, r) for r in resolved]
    checks, sensors = build_checks(config, resolved, assets)
    incremental_assets, incremental_sensors = build_incremental(config)
    cdc = build_cdc(config)  # empty without `mode: cdc` tables
    return Definitions(
        assets=[*assets, *demo_silver_assets(config, assets), *incremental_assets, *cdc.assets],
        asset_checks=checks,
        schedules=[build_daily_schedule(a) for a in assets],
        jobs=cdc.jobs,
        sensors=[*sensors, *incremental_sensors, *cdc.sensors],
        resources=build_resources(config),
        # A run here is one table's days (and their checks): the multiprocess default would
        # start a process per step, each loading the code location again, for nothing.
        executor=in_process_executor,
    )
