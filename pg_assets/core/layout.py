"""The Bronze layout contract: where each partition's data and manifest live.

    <root>/<source>/<schema>.<table>/date=YYYY-MM-DD/<table>-YYYY-MM-DD.csv<ext>
    <root>/<source>/<schema>.<table>/date=YYYY-MM-DD/_manifest.json
    <root>/_staging/<run_id>/…                                   (never read)

Names are deterministic so that re-materializing a day overwrites instead of duplicating.
"""

import datetime as dt
from dataclasses import dataclass

from pg_assets.core.identifiers import QualifiedName

MANIFEST = "_manifest.json"


@dataclass(frozen=True)
class PartitionPaths:
    folder: str
    data: str
    manifest: str


def daily_paths(source: str, table: QualifiedName, day: dt.date, extension: str) -> PartitionPaths:
    folder = f"{source}/{table.schema}.{table.name}/date={day.isoformat()}"
    return PartitionPaths(
        folder=folder,
        data=f"{folder}/{table.name}-{day.isoformat()}.csv{extension}",
        manifest=f"{folder}/{MANIFEST}",
    )
