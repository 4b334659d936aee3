"""One large transaction is streamed, not held: the reading process's peak RSS does not grow
with the transaction's size (20k vs 200k rows here, 46 MB of change CSV; the 1M-row case, through
the Dagster asset too, is in `python -m bench.cdc`). Each read runs in its own process so its
peak RSS is its own; memory, unlike time, is deterministic enough to assert."""

import json
import os
import subprocess
import sys

import psycopg
from psycopg import sql

from pg_assets.core.cdc import slot as cdc_slot
from pg_assets.core.identifiers import QualifiedName
from pg_assets_tests.cdc_support import cdc_names, wait_flushed  # noqa: F401

SMALL, LARGE = 20_000, 200_000

READER = """
import json, resource, sys
import psycopg
from pg_assets.core.cdc.reader import read_batch
from pg_assets.core.compression import get_codec

class Null:
    size = 0
    def write(self, block):
        Null.size += len(block)

def peak_rss_mb():
    # VmHWM belongs to this address space; ru_maxrss would include the forking parent's
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

conninfo, slot, pub = sys.argv[1:4]
with psycopg.connect(conninfo) as conn:
    batch = read_batch(conn, slot, pub, lambda t, p: Null(),
                       lambda: get_codec("gzip").compressor(1), max_messages=None)
print(json.dumps({"changes": batch.changes, "transactions": batch.transactions,
                  "raw_bytes": sum(f.raw_bytes for f in batch.files), "gzip_bytes": Null.size,
                  "peak_rss_mb": peak_rss_mb()}))
"""


def _read(conninfo: str, slot: str, pub: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", READER, conninfo, slot, pub],
        check=True, capture_output=True, text=True, env=os.environ, timeout=900,
    )  # fmt: skip
    return json.loads(out.stdout)


def test_peak_rss_is_flat_across_transaction_sizes(db: psycopg.Connection, cdc_names, pg_conninfo):  # noqa: F811
    results = {}
    for rows in (SMALL, LARGE):
        slot, pub = cdc_names()
        t = sql.Identifier(f"mem_{slot}")
        db.execute(
            sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, v text, at timestamptz)").format(t)
        )
        try:
            cdc_slot.ensure_publication(db, pub, [QualifiedName("public", f"mem_{slot}")])
            cdc_slot.ensure_slot(db, slot)
            db.execute(
                sql.SQL(
                    "INSERT INTO {} SELECT g, md5(g::text) || ', \"' || g, now()"
                    " FROM generate_series(1, %s) g"
                ).format(t),
                [rows],
            )
            wait_flushed(db, timeout=60)
            results[rows] = _read(pg_conninfo, slot, pub)
        finally:
            db.execute(sql.SQL("DROP TABLE {}").format(t))
    small, large = results[SMALL], results[LARGE]
    assert (small["changes"], large["changes"]) == (SMALL, LARGE)
    assert small["transactions"] == large["transactions"] == 1
    print(
        f"peak RSS: {small['peak_rss_mb']:.0f} MB at {SMALL:,} rows, {large['peak_rss_mb']:.0f} MB "
        f"at {LARGE:,} rows in one transaction ({large['raw_bytes'] / 1e6:.0f} MB of change CSV)"
    )
    # bounded by the cursor's itersize, the gather buffer and a block, not by the data
    assert large["raw_bytes"] > 9 * small["raw_bytes"]
    assert large["peak_rss_mb"] - small["peak_rss_mb"] < 15
    assert large["peak_rss_mb"] < 120
