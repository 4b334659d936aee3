"""BronzeResource: where Bronze lives, and the sink that writes there.

The root decides the sink: `abfss://<filesystem>@<account>.dfs.core.windows.net/<prefix>`
gives ADLS Gen2, anything else a local folder. Codec, level and block size travel with it so
an asset needs nothing but this resource to write a partition.
"""

from typing import Literal

from dagster import Config, ConfigurableResource
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


class BronzeResource(ConfigurableResource):
    root: str = Field(description="Local path, file:// URI or abfss:// URI of the Bronze root.")
    codec: str = "gzip"
    level: int | None = None
    block_size_mib: float = 4
    staging_max_age_h: float | None = Field(
        default=24,
        description="Staging files older than this (hours, by the store's last-modified "
        "time) are removed at the start of each daily run (null: never).",
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
