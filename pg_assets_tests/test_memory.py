"""Peak memory of one extraction does not grow with the partition's size.

Each extraction runs as its own process (`python -m pg_assets.core.extract`) so its peak RSS
is its own. Memory, unlike time, is deterministic enough to assert; speed lives in bench/.
"""

import datetime as dt
import json
import os
import subprocess
import sys

import psycopg
import pytest

from pg_assets.dev.demo_data import create_daily_partitioned

SMALL, LARGE = 250_000, 1_500_000  # both large enough to fill the pipeline
DAYS = [dt.date(2026, 10, 1), dt.date(2026, 10, 2)]


@pytest.fixture(scope="module")
def sized(pg_conninfo: str) -> None:
    with psycopg.connect(pg_conninfo, autocommit=True) as c:
        create_daily_partitioned(c, "mem", "small", DAYS[:1], SMALL)
        create_daily_partitioned(c, "mem", "large", DAYS[1:], LARGE)


def extract(table: str, day: dt.date, root: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "pg_assets.core.extract", "--table", table,
         "--column", "order_date", "--day", day.isoformat(), "--root", root],
        check=True, capture_output=True, text=True, env=os.environ,
    )  # fmt: skip
    return json.loads(out.stdout)


def test_peak_rss_is_flat_across_partition_sizes(sized, tmp_path):
    small = extract("mem.small", DAYS[0], str(tmp_path))
    large = extract("mem.large", DAYS[1], str(tmp_path))
    assert (small["rows"], large["rows"]) == (SMALL, LARGE)
    assert large["raw_bytes"] > 5 * small["raw_bytes"]
    print(
        f"peak RSS: {small['peak_rss_mb']:.0f} MB at {SMALL} rows, "
        f"{large['peak_rss_mb']:.0f} MB at {LARGE} rows ({large['raw_bytes'] / 1e6:.0f} MB CSV)"
    )
    # bounded by gather × queue depth + block size (~12 MB), not by the data (+250 MB of CSV)
    assert large["peak_rss_mb"] - small["peak_rss_mb"] < 10
    assert large["peak_rss_mb"] < 100
