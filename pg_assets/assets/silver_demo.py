"""A downstream example: a Silver table built from a Bronze asset with the typed reader.

`daily_order_totals` (key `[<source>, silver, daily_order_totals]`) reads one committed day
of the Bronze orders with `pg_assets.read` (amount arrives as decimal128(12,2), exact) and
writes the day's orders and amount per status as one Parquet file under the Bronze root's
sibling folder `silver/`:

    <bronze root>/../silver/<source>/daily_order_totals/date=YYYY-MM-DD/part.parquet

It declares `deps` on the Bronze asset and uses the same daily partitions, so the lineage
graph shows Bronze → Silver and a backfill of a date range can include both (each Silver day
runs after its Bronze day). Its metadata names the Bronze file and sha256 it was built from.
"""

import datetime as dt
import io
from typing import TYPE_CHECKING, Any

from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)

from pg_assets.config import ProjectConfig
from pg_assets.core.identifiers import QualifiedName
from pg_assets.resources.bronze import BronzeResource
from pg_assets.sinks.base import Sink

if TYPE_CHECKING:
    import pyarrow as pa

DEMO_ORDERS = QualifiedName("public", "orders")


def silver_root(bronze_root: str) -> str:
    """The Bronze root's sibling folder `silver` (`…/bronze` → `…/silver`)."""
    parent = bronze_root.rstrip("/").rsplit("/", 1)[0]
    return f"{parent}/silver"


def _silver_sink(bronze: BronzeResource) -> Sink:
    root = silver_root(bronze.root)
    if root.startswith("abfss://"):
        from pg_assets.sinks.adls import AdlsSink

        return AdlsSink.from_uri(root, **bronze.adls.model_dump())
    from pg_assets.sinks.local import LocalSink

    return LocalSink(root)


def order_totals(orders: "pa.Table") -> "pa.Table":
    """Orders and amount per status of one day (amount stays an exact decimal)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    totals = orders.group_by("status").aggregate([("id", "count"), ("amount", "sum")])
    totals = totals.rename_columns(["status", "orders", "amount"])
    return totals.sort_by("status").set_column(
        1, "orders", pc.cast(totals.column("orders"), pa.int64())
    )


def build_order_totals(
    project: ProjectConfig, bronze_asset: AssetsDefinition, table: QualifiedName = DEMO_ORDERS
) -> AssetsDefinition:
    """The Silver asset over `bronze_asset`, the Bronze asset of `table` (id, status, amount)."""
    key = AssetKey([project.source, "silver", "daily_order_totals"])
    source = project.source

    @asset(
        key=key,
        deps=[bronze_asset.key],
        partitions_def=bronze_asset.partitions_def,
        group_name=f"{source}_silver",
        kinds={"parquet"},
        description=f"Orders and amount per status and day, from the Bronze extract of {table} "
        "(read with pg_assets.read: committed days only, PostgreSQL types).",
    )
    def _silver(context: AssetExecutionContext, bronze: BronzeResource) -> MaterializeResult:
        day = dt.date.fromisoformat(context.partition_key)
        where = f"silver daily_order_totals, partition {day}"
        try:  # the `read` extra; the code location loads without it
            import pyarrow.compute as pc
            import pyarrow.parquet as pq

            from pg_assets import read
        except ImportError as e:
            raise Failure(f"{where}: needs pyarrow: pip install 'pg_assets[read]' ({e})") from e
        adls: dict[str, Any] = bronze.adls.model_dump()
        days = read.committed_days(bronze.root, source, table, start=day, end=day, adls=adls)
        if not days:
            raise Failure(
                f"{where}: Bronze table {table} has no committed day {day}; materialize the "
                "Bronze partition first (or backfill both)"
            )
        orders = read.read_table(
            bronze.root, source, table, start=day, end=day, verify=True, adls=adls
        )
        totals = order_totals(orders)
        buf = io.BytesIO()
        pq.write_table(totals, buf)
        sink = _silver_sink(bronze)
        relpath = f"{source}/daily_order_totals/date={day.isoformat()}/part.parquet"
        published = sink.write_bytes(
            context.run.run_id, relpath, buf.getvalue(), "application/vnd.apache.parquet"
        )
        return MaterializeResult(
            metadata={
                "dagster/uri": published.uri,
                "dagster/row_count": totals.num_rows,
                "orders": int(pc.sum(totals.column("orders")).as_py() or 0),
                "bronze_file": MetadataValue.path(days[0].data),
                "bronze_sha256": str(days[0].manifest.get("sha256")),
            }
        )

    return _silver


def demo_silver_assets(
    project: ProjectConfig, bronze_assets: list[AssetsDefinition]
) -> list[AssetsDefinition]:
    """The Silver example for the demo: present when the config lands `public.orders`."""
    key = AssetKey([project.source, DEMO_ORDERS.schema, DEMO_ORDERS.name])
    return [build_order_totals(project, a) for a in bronze_assets if a.key == key]
