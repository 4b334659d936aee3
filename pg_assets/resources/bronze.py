"""BronzeResource: where Bronze lives, and the sink that writes there.

The root decides the sink: `abfss://<filesystem>@<account>.dfs.core.windows.net/<prefix>`
gives ADLS Gen2, anything else a local folder. Codec, level and block size travel with it so
an asset needs nothing but this resource to write a partition.
"""

from typing import Literal

from dagster import (
    AssetExecutionContext,
    Config,
    ConfigurableResource,
    DagsterRunStatus,
    RunsFilter,
)
from pydantic import ConfigDict, Field

from pg_assets.core.compression import Codec, get_codec
from pg_assets.sinks.base import Sink


class AdlsSettings(Config):
    """How to reach ADLS Gen2; the `bronze.adls` section of the config file."""

    model_config = ConfigDict(extra="forbid")

    auth: Literal["connection_string", "account_key", "sas", "default_credential"] = (
        "default_credential"
    )
    secret_env: str | None = Field(
        default=None,
        description="Environment variable holding the connection string, key or SAS token.",
    )
    endpoint: str | None = Field(
        default=None,
        description="Explicit account URL (emulators, test servers); default is the public cloud.",
    )
    create_filesystem: bool = False
    max_retries: int = Field(
        default=5,
        ge=0,
        description="Retries of one request after a connection error, a lost response or a "
        "retryable status (408, 5xx but 501/505), all counted together.",
    )
    retry_backoff_s: float = Field(
        default=2.0, ge=0, description="Wait before the first retry (± 20 % jitter)."
    )
    retry_backoff_base: float = Field(
        default=2.0,
        ge=0,
        description="Each later wait is the previous one times this (± 20 % jitter).",
    )
    queue_depth: int = Field(default=4, ge=1, description="Blocks in flight to the appender.")
    timeout_s: float = Field(
        default=120, gt=0, description="Read timeout of one request (connect: min(20, this))."
    )


# Runs that have ended; the staging files of every other run the instance knows (queued,
# starting, started, canceling, suspended, managed elsewhere...) are never swept.
_ENDED = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}
_NOT_ENDED = [status for status in DagsterRunStatus if status not in _ENDED]
# Runs of this process that already swept `_staging/`: the definitions use the in-process
# executor, so every step and every retry of a run runs here, and sweeps once.
_SWEPT_RUNS: set[str] = set()


class BronzeResource(ConfigurableResource):
    root: str = Field(description="Local path, file:// URI or abfss:// URI of the Bronze root.")
    codec: str = "gzip"
    level: int | None = None
    block_size_mib: float = 4
    staging_max_age_h: float | None = Field(
        default=24,
        gt=0,
        description="Staging files older than this (hours, by the store's last-modified "
        "time) whose run is not in progress are removed at the start of each run (null: never).",
    )
    adls: AdlsSettings = AdlsSettings()

    @property
    def block_size(self) -> int:
        return int(self.block_size_mib * 1024 * 1024)

    def get_codec(self) -> Codec:
        return get_codec(self.codec)

    def get_level(self) -> int:
        return self.get_codec().default_level if self.level is None else self.level

    def get_sink(self) -> Sink:
        if self.root.startswith("abfss://"):
            from pg_assets.sinks.adls import AdlsSink

            return AdlsSink.from_uri(self.root, **self.adls.model_dump())
        from pg_assets.sinks.local import LocalSink

        return LocalSink(self.root.removeprefix("file://"))

    def sweep_staging_once(self, context: AssetExecutionContext, sink: Sink) -> None:
        """Remove staging files of killed runs, once per run: one listing of `_staging/` and
        one query of the instance for the runs in progress, whose files are kept whatever
        their age. A run killed without Dagster noticing stays STARTED (the default run
        launcher has no health check) and keeps its files until it is marked failed or
        canceled. A failure is logged, never fatal: it costs storage, not data."""
        run_id, max_age_h = context.run.run_id, self.staging_max_age_h
        if max_age_h is None or run_id in _SWEPT_RUNS:
            return
        _SWEPT_RUNS.add(run_id)
        try:
            alive = context.instance.get_run_ids(RunsFilter(statuses=_NOT_ENDED))
            removed = sink.sweep_staging(max_age_h * 3600, keep_runs=alive)
        except Exception as e:
            context.log.warning(
                f"sweeping staging files older than {max_age_h:g} h (bronze.staging_max_age_h) "
                f"failed: {e}"
            )
            return
        if removed:
            context.log.info(
                f"removed {len(removed)} staging file(s) older than {max_age_h:g} h left by "
                f"killed runs (bronze.staging_max_age_h): {', '.join(removed)}"
            )
