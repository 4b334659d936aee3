"""BronzeResource: where Bronze lives, and the sink that writes there.

The root decides the sink: `abfss://<filesystem>@<account>.dfs.core.windows.net/<prefix>`
gives ADLS Gen2, anything else a local folder. Codec, level and block size travel with it so
an asset needs nothing but this resource to write a partition.
"""

from dagster import ConfigurableResource
from pydantic import Field

from pg_assets.core.compression import Codec, get_codec
from pg_assets.sinks.base import Sink


class BronzeResource(ConfigurableResource):
    root: str = Field(description="Local path, file:// URI or abfss:// URI of the Bronze root.")
    codec: str = "gzip"
    level: int | None = None
    block_size_mib: float = 4
    adls_auth: str = "default_credential"
    adls_secret_env: str | None = None
    adls_endpoint: str | None = None
    adls_create_filesystem: bool = False
    adls_max_retries: int = 5
    adls_retry_backoff_s: float = 2.0
    adls_retry_backoff_base: float = 2.0
    adls_queue_depth: int = 4
    adls_timeout_s: float = 120

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

            return AdlsSink.from_uri(
                self.root,
                auth=self.adls_auth,
                secret_env=self.adls_secret_env,
                endpoint=self.adls_endpoint,
                create_filesystem=self.adls_create_filesystem,
                max_retries=self.adls_max_retries,
                retry_backoff_s=self.adls_retry_backoff_s,
                retry_backoff_base=self.adls_retry_backoff_base,
                queue_depth=self.adls_queue_depth,
                timeout_s=self.adls_timeout_s,
            )
        from pg_assets.sinks.local import LocalSink

        return LocalSink(self.root.removeprefix("file://"))
