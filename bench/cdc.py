"""CDC decoding throughput against the server's own decoding limit, in one run.

    .venv/bin/python -m bench.cdc [--rows 1000000] [--small 100000]

Starts the embedded PostgreSQL (or uses $PG_ASSETS_CONNINFO), then for (a) one transaction
of N rows and (b) M single-row transactions, each in its own process on the same pending
changes:

    server     SELECT count(*) FROM pg_logical_slot_peek_binary_changes(...): the limit
    fetch      the named cursor alone (rows reach Python, nothing decoded)
    decode     + pgoutput decoding
    core       + change CSV + gzip level 1 (`read_batch`, blocks discarded)
    asset      the source's Dagster job materialized in-process: decode, publish to a local
               Bronze (staging, rename, batch manifests), advance the slot; what a run costs

printing seconds, changes/s, ratio to `server`, and the process's peak RSS. The first four
only peek (the slot stays where it is); `asset` consumes, so it runs last. The table is
created empty and snapshotted (`pg_assets.core.cdc.run.setup`) before the changes are made,
as a user's setup would be.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
SLOT = PUB = "bench_cdc"
PEEK = (
    "pg_logical_slot_peek_binary_changes(%s, NULL, NULL, 'proto_version', '1',"
    " 'publication_names', %s)"
)


class _Null:
    def __init__(self) -> None:
        self.bytes = 0

    def write(self, block: bytes, /) -> None:
        self.bytes += len(block)


def peak_rss_mb() -> float:
    """VmHWM belongs to this address space; ru_maxrss would include the forking parent's."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(conninfo: str, method: str, config: str = "") -> dict:
    from pg_assets.core.cdc.pgoutput import decode
    from pg_assets.core.cdc.reader import iter_messages, read_batch
    from pg_assets.core.compression import get_codec

    started = time.perf_counter()
    out: dict = {"method": method}
    if method == "asset":
        os.environ["PG_ASSETS_CONNINFO"] = conninfo
        from dagster import DagsterInstance

        from pg_assets.build import build_definitions
        from pg_assets.config import load_config

        cfg = load_config(config)
        job = build_definitions(cfg).resolve_job_def(f"{cfg.source}__cdc")
        with DagsterInstance.ephemeral() as instance:
            started = time.perf_counter()  # the run, not the imports
            result = job.execute_in_process(
                instance=instance,
                raise_on_error=True,
                run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
            )
            out["seconds"] = time.perf_counter() - started
        (mat,) = result.get_asset_materialization_events()
        md = {k: v.value for k, v in mat.materialization.metadata.items()}
        out["messages"] = "?"
        out["changes"] = md["changes"]
        out["batches"] = md["batches"]
        out["raw_bytes"] = md["raw_bytes"]
        out["compressed_bytes"] = md["compressed_bytes"]
        out["peak_rss_mb"] = peak_rss_mb()
        return out
    with psycopg.connect(conninfo) as conn:
        if method == "server":
            (out["messages"],) = conn.execute(
                f"SELECT count(*) FROM {PEEK}",  # noqa: S608 - constant
                [SLOT, PUB],
            ).fetchone()  # type: ignore[misc]
        elif method in ("fetch", "decode"):
            n = 0
            with conn.transaction():
                for _, data in iter_messages(conn, SLOT, PUB):
                    if method == "decode":
                        decode(data)
                    n += 1
            out["messages"] = n
        else:
            sinks: list[_Null] = []

            def open_part(table, part):
                sinks.append(_Null())
                return sinks[-1]

            batch = read_batch(
                conn, SLOT, PUB, open_part, lambda: get_codec("gzip").compressor(1),
                max_messages=None,
            )  # fmt: skip
            out["messages"] = batch.messages
            out["changes"] = batch.changes
            out["raw_bytes"] = sum(f.raw_bytes for f in batch.files)
            out["compressed_bytes"] = sum(s.bytes for s in sinks)
    out["seconds"] = time.perf_counter() - started
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def _wait_flushed(conn: psycopg.Connection) -> None:
    (target,) = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()  # type: ignore[misc]
    deadline = time.monotonic() + 60
    while not conn.execute("SELECT pg_current_wal_flush_lsn() >= %s::pg_lsn", [target]).fetchone()[
        0
    ]:  # type: ignore[index]
        if time.monotonic() > deadline:
            raise TimeoutError("WAL not flushed")
        time.sleep(0.05)


def write_config(folder: Path) -> Path:
    """The asset's config: one CDC table, Bronze in `folder`."""
    import shutil

    import yaml

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    path = folder / "pg_assets.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "source": "bench",
                "bronze": {"root": str(folder / "bronze"), "codec": "gzip", "level": 1},
                "cdc": {"slot": SLOT, "publication": PUB},
                "tables": [{"table": "public.bench_cdc_events", "mode": "cdc"}],
            }
        )
    )
    return path


def prepare(conn: psycopg.Connection, kind: str, n: int, config: Path) -> int:
    conn.execute("DROP TABLE IF EXISTS bench_cdc_events")
    if conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", [SLOT]).fetchone():
        conn.execute("SELECT pg_drop_replication_slot(%s)", [SLOT])
    conn.execute("DROP PUBLICATION IF EXISTS bench_cdc")
    conn.execute(
        "CREATE TABLE bench_cdc_events (event_id bigint PRIMARY KEY, occurred_at timestamptz,"
        " kind text, payload jsonb, score double precision, ok boolean, ref uuid)"
    )
    from pg_assets.assets.cdc import cdc_source
    from pg_assets.build import build_resources
    from pg_assets.config import load_config
    from pg_assets.core.cdc.run import setup

    cfg = load_config(write_config(config.parent))
    resources = build_resources(cfg)
    setup(cdc_source(cfg, resources["postgres"], resources["bronze"]), "bench-setup")
    row = (
        "g, '2026-11-01'::timestamptz + g * interval '37 seconds', (ARRAY['view','click','buy'])"
        "[1 + mod(g, 3)], jsonb_build_object('path', '/p/' || mod(g, 500), 'ua', 'Mozilla/5.0 \"x\"'),"
        " mod(g, 1000) / 7.0, mod(g, 2) = 0, md5(g::text)::uuid"
    )
    if kind == "one":
        insert = f"INSERT INTO bench_cdc_events SELECT {row} FROM generate_series(1, %s) g"  # noqa: S608
        conn.execute(insert, [n])
    else:
        conn.execute(
            "CREATE OR REPLACE PROCEDURE bench_cdc_fill(n int) LANGUAGE plpgsql AS $$"
            f" BEGIN FOR g IN 1..n LOOP INSERT INTO bench_cdc_events SELECT {row}; COMMIT;"  # noqa: S608
            " END LOOP; END $$"
        )
        conn.execute("CALL bench_cdc_fill(%s)", [n])
    _wait_flushed(conn)
    return n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=100_000)
    parser.add_argument("--child", nargs="+", metavar="ARG")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    conninfo = os.environ.get("PG_ASSETS_CONNINFO")
    if not conninfo:
        from pg_assets.dev.embedded import start

        conninfo = start(ROOT / ".pg_assets" / "bench").conninfo
        os.environ["PG_ASSETS_CONNINFO"] = conninfo
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    config = ROOT / ".pg_assets" / "bench_cdc" / "pg_assets.yaml"
    with psycopg.connect(conninfo, autocommit=True) as conn:
        for kind, n in (("one", args.rows), ("small", args.small)):
            label = f"1 transaction of {n:,} rows" if kind == "one" else f"{n:,} 1-row transactions"
            prepare(conn, kind, n, config)
            print(f"\n{label}")
            base = None
            for method in ("server", "fetch", "decode", "core", "asset"):
                out = subprocess.run(
                    [sys.executable, "-m", "bench.cdc", "--child", conninfo, method, str(config)],
                    check=True, capture_output=True, text=True, env=env, cwd=ROOT, timeout=3600,
                )  # fmt: skip
                r = json.loads(out.stdout)
                base = base or r["seconds"]
                extra = ""
                if method in ("core", "asset"):
                    extra = (
                        f"  {r['raw_bytes'] / 1e6:.0f} MB CSV → {r['compressed_bytes'] / 1e6:.0f}"
                        " MB gzip"
                    )
                if method == "asset":
                    extra += f", {r['batches']} batch(es), {r['changes']:,} changes published"
                print(
                    f"  {method:7} {r['seconds']:7.2f} s  {n / r['seconds']:>10,.0f} changes/s"
                    f"  ×{r['seconds'] / base:4.2f}  peak RSS {r['peak_rss_mb']:5.0f} MB"
                    f"  ({r['messages']} messages){extra}"
                )
        conn.execute("SELECT pg_drop_replication_slot(%s)", [SLOT])
        conn.execute("DROP PUBLICATION bench_cdc")
        conn.execute("DROP TABLE bench_cdc_events")


if __name__ == "__main__":
    main()
