"""Build Dagster definitions (assets, resources, schedules) from a validated config."""

from dagster import Definitions

from pg_assets.assets.daily import asset_key, build_daily_asset
from pg_assets.catalog import resolve_tables
from pg_assets.config import ConfigError, ProjectConfig
from pg_assets.resources.bronze import BronzeResource
from pg_assets.resources.postgres import PostgresResource
from pg_assets.schedules import build_daily_schedule


def build_resources(config: ProjectConfig) -> dict[str, object]:
    pg, b = config.postgres, config.bronze
    return {
        "postgres": PostgresResource(
            conninfo_env=pg.conninfo_env,
            pool_min=pg.pool_min,
            pool_max=pg.pool_max,
            connect_timeout_s=pg.connect_timeout_s,
            statement_timeout_s=pg.statement_timeout_s,
        ),
        "bronze": BronzeResource(
            root=b.root,
            codec=b.codec,
            level=config.bronze_level(),
            block_size_mib=b.block_size_mib,
            adls_auth=b.adls.auth,
            adls_secret_env=b.adls.secret_env,
            adls_endpoint=b.adls.endpoint,
            adls_create_filesystem=b.adls.create_filesystem,
            adls_max_retries=b.adls.max_retries,
            adls_retry_backoff_s=b.adls.retry_backoff_s,
            adls_retry_backoff_base=b.adls.retry_backoff_base,
            adls_queue_depth=b.adls.queue_depth,
            adls_timeout_s=b.adls.timeout_s,
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
    return Definitions(
        assets=assets,
        schedules=[build_daily_schedule(a) for a in assets],
        resources=build_resources(config),
    )
