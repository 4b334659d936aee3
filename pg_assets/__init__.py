"""pg_assets: PostgreSQL tables landed in a Bronze lake by Dagster, via streamed, compressed COPY."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pg_assets")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+source"
