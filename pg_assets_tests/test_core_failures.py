"""The core under real faults: a file size limit (RLIMIT_FSIZE, as a full disk or a quota
would) hitting the first, a middle or the last block, a failing compressor, a COPY that fails
mid-stream and a cancellation. Each must end the extraction within seconds with the error
in the caller's thread, leave the previous version as it was and nothing in staging, and
leave no PostgreSQL session behind; a short write must never be published."""

import _thread
import datetime as dt
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from pg_assets.core.compression import get_codec
from pg_assets.core.copy_stream import stream_copy
from pg_assets.core.extract import extract_day
from pg_assets.core.identifiers import QualifiedName
from pg_assets.core.session import connect_kwargs
from pg_assets.dev.demo_data import create_daily_partitioned
from pg_assets.sinks.adls import AdlsSink
from pg_assets.sinks.local import LocalSink, LocalStagingFile
from pg_assets_tests.adls_server import Fault

DAY = dt.date(2026, 10, 5)
NAME = QualifiedName("corefail", "t")
ROWS = 90_000  # ~2.4 MB of gzip: more than two 1 MiB blocks, less than three
MIB = 1 << 20
DEADLINE_S = 90  # the CLI must have ended by then; a hang is a timeout
ADLS_ROOT = "abfss://bronze@devstoreaccount1.dfs.core.windows.net/lake"


@pytest.fixture(scope="module")
def table(pg_conninfo: str) -> None:
    with psycopg.connect(pg_conninfo, autocommit=True) as c:
        create_daily_partitioned(c, NAME.schema, NAME.name, [DAY], ROWS)


def run_cli(
    root: Path | str, *, fsize: int | None = None, block_mib: float = 1, extra: tuple = ()
) -> subprocess.CompletedProcess:
    """The extract CLI in its own process, optionally under a file size limit. CPython
    ignores SIGXFSZ, so a write past the limit is cut short, then fails with EFBIG."""
    args = ["-m", "pg_assets.core.extract", "--table", str(NAME), "--column", "order_date",
            "--day", DAY.isoformat(), "--root", str(root), "--block-size-mib", str(block_mib),
            *extra]  # fmt: skip
    limit = "" if fsize is None else f"resource.setrlimit(resource.RLIMIT_FSIZE, ({fsize},) * 2);"
    launcher = f"import os, resource, sys; {limit} os.execv(sys.executable, sys.argv[1:])"
    return subprocess.run(
        [sys.executable, "-c", launcher, sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )


def snapshot(root: Path) -> dict[str, bytes]:
    sink = LocalSink(root)
    return {p: sink.read_bytes(p) for p in sink.list_files()}


def sessions_left(conn: psycopg.Connection, since: dt.datetime) -> list[tuple]:
    """pg_assets sessions started since `since` that are still there after a few seconds."""
    rows: list[tuple] = []
    for _ in range(100):
        rows = conn.execute(
            "SELECT pid, state, left(query, 60) FROM pg_stat_activity"
            " WHERE application_name = 'pg_assets' AND backend_start >= %s",
            (since,),
        ).fetchall()
        if not rows:
            break
        time.sleep(0.1)
    return rows


@pytest.fixture(scope="module")
def reference(table, tmp_path_factory) -> dict:
    """One unconstrained run: the compressed size the limits are chosen from."""
    root = tmp_path_factory.mktemp("reference")
    done = run_cli(root)
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)
    assert 2 * MIB + 100_000 < stats["compressed_bytes"] < 3 * MIB, stats
    return stats


@pytest.mark.parametrize(
    "where",
    ["first block", "middle block", "last block at a block boundary", "last block, short write"],
)
def test_file_size_limit_fails_fast_and_keeps_previous_version(where, reference, db, tmp_path):
    size = reference["compressed_bytes"]
    fsize = {
        "first block": MIB // 2,
        "middle block": MIB + MIB // 2,
        "last block at a block boundary": 2 * MIB,  # two blocks fit, the final one fails
        "last block, short write": (2 * MIB + size) // 2,  # the final write is cut short
    }[where]
    root = tmp_path / "bronze"
    assert run_cli(root).returncode == 0  # version 1, written without a limit
    before = snapshot(root)

    since = db.execute("SELECT now()").fetchone()[0]
    started = time.monotonic()
    done = run_cli(root, fsize=fsize)  # raises TimeoutExpired if the extraction hangs
    print(f"{where}: failed in {time.monotonic() - started:.1f} s")

    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "corefail.t" in last and "partition 2026-10-05" in last and "File too large" in last
    assert snapshot(root) == before  # old data and manifest, nothing beside them
    assert not (root / "_staging").exists()
    assert sessions_left(db, since) == []


def test_short_write_is_never_published(reference, tmp_path):
    """One 4 MiB block written at the end, cut short by the limit: the write of the rest
    fails, and even a silently short file would be refused by publish's size check."""
    root = tmp_path / "bronze"
    done = run_cli(root, fsize=1_000_000, block_mib=4)
    assert done.returncode != 0
    assert "File too large" in done.stderr or "short write" in done.stderr
    assert LocalSink(root).list_files() == []
    assert not (root / "_staging").exists()


@pytest.mark.parametrize("block", [1, 2, 3], ids=["first", "middle", "last"])
def test_rejected_adls_append_fails_fast(block, reference, adls, db):
    """The same through the ADLS sink: the service rejects the append of one block (400,
    not retried); the last is sent only after the COPY has ended."""
    assert -(-reference["compressed_bytes"] // MIB) == 3  # three 1 MiB blocks
    AdlsSink.from_uri(ADLS_ROOT, auth="account_key", secret_env="PG_ASSETS_TEST_ADLS_KEY",
                      endpoint=adls.url, create_filesystem=True)  # fmt: skip
    adls_args = ("--endpoint", adls.url, "--auth", "account_key",
                 "--secret-env", "PG_ASSETS_TEST_ADLS_KEY")  # fmt: skip
    assert run_cli(ADLS_ROOT, extra=adls_args).returncode == 0
    before = adls.files("bronze")

    adls.faults.append(Fault("append", nth=block, status=400, code="InvalidInput", path=".csv"))
    since = db.execute("SELECT now()").fetchone()[0]
    done = run_cli(ADLS_ROOT, extra=adls_args)  # raises TimeoutExpired if it hangs

    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "corefail.t" in last and "partition 2026-10-05" in last
    assert "HTTP 400 InvalidInput" in last
    assert adls.faults[0].hits == 1
    assert adls.files("bronze") == before
    assert "lake/_staging" not in adls.directories["bronze"]
    assert sessions_left(db, since) == []


class FailingCompressor:
    """A real gzip compressor whose final flush fails, as a codec error would."""

    def __init__(self) -> None:
        self._inner = get_codec("gzip").compressor(1)

    def compress(self, data: bytes) -> bytes:
        return self._inner.compress(data)

    def flush(self) -> bytes:
        raise MemoryError("compressor could not finish")


class Blocks:
    def __init__(self) -> None:
        self.blocks: list[bytes] = []

    def write(self, block: bytes, /) -> None:
        self.blocks.append(block)


def run_bounded(fn, seconds: float = 60):
    """Run `fn` in a thread; fail the test (instead of hanging it) if it does not return."""
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as e:
            outcome["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds} s"
    return outcome


def no_worker_left() -> bool:
    for _ in range(100):
        if not any(t.name == "pg_assets-compress" for t in threading.enumerate()):
            return True
        time.sleep(0.05)
    return False


def test_failing_compressor_ends_the_copy(table, pg_conninfo):
    statement = sql.SQL("COPY (SELECT * FROM {}) TO STDOUT (FORMAT csv)").format(
        sql.Identifier("corefail", "t")
    )
    with psycopg.connect(pg_conninfo) as conn, conn.cursor() as cur:
        outcome = run_bounded(
            lambda: stream_copy(cur, statement, Blocks(), FailingCompressor(), block_size=MIB)
        )
        assert isinstance(outcome.get("error"), MemoryError)
        conn.rollback()
        assert conn.execute("SELECT 1").fetchone() == (1,)  # the session is usable
    assert no_worker_left()


def test_copy_failing_mid_stream_stops_the_worker(pg_conninfo):
    # fails on the server after ~20 MB of output, with blocks already written
    statement = sql.SQL(
        "COPY (SELECT i, repeat('x', 100), 1 / (i - 200000) FROM generate_series(1, 300000) i)"
        " TO STDOUT (FORMAT csv)"
    )
    blocks = Blocks()
    with psycopg.connect(pg_conninfo) as conn, conn.cursor() as cur:
        codec = get_codec("gzip")
        outcome = run_bounded(
            lambda: stream_copy(cur, statement, blocks, codec.compressor(1), block_size=64 << 10)
        )
        assert isinstance(outcome.get("error"), psycopg.errors.DivisionByZero)
        assert blocks.blocks  # it did fail mid-stream
    assert no_worker_left()


def test_failing_writer_cancels_a_copy_that_is_still_scanning(pg_conninfo):
    """The query goes quiet for a minute after its first rows (a long scan finding nothing,
    a lock) and the disk fills up meanwhile: the failure must not wait for the next row.
    (Uncompressed, so the first block is written as soon as its bytes arrive.)"""
    statement = sql.SQL(
        "COPY (SELECT i, md5(i::text) FROM generate_series(1, 1000) i"
        " UNION ALL SELECT 0, pg_sleep(60)::text) TO STDOUT (FORMAT csv)"
    )
    with psycopg.connect(pg_conninfo) as conn, conn.cursor() as cur:
        pid = conn.info.backend_pid

        class DiskFullWhileQuiet(Blocks):
            def write(self, block: bytes, /) -> None:
                with psycopg.connect(pg_conninfo, autocommit=True) as c:
                    while not c.execute(
                        "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND wait_event = 'PgSleep'",
                        (pid,),
                    ).fetchone():
                        time.sleep(0.05)
                raise OSError(28, "No space left on device")

        outcome = run_bounded(
            lambda: stream_copy(cur, statement, DiskFullWhileQuiet(),
                                get_codec("none").compressor(), block_size=16 << 10,
                                gather_bytes=16 << 10),
            seconds=30,
        )  # fmt: skip
        assert isinstance(outcome.get("error"), OSError), outcome
    assert not copy_left_running(pg_conninfo)


def extract(conninfo: str, sink: LocalSink, run_id: str):
    with psycopg.connect(conninfo, **connect_kwargs(10, 0, conninfo)) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        return extract_day(
            conn, source="core", table=NAME, column="order_date", day=DAY, timezone="UTC",
            sink=sink, codec=get_codec("gzip"), level=1, run_id=run_id, block_size=256 * 1024,
        )  # fmt: skip


def copy_left_running(conninfo: str) -> bool:
    with psycopg.connect(conninfo, autocommit=True) as c:
        for _ in range(100):
            if not c.execute(
                "SELECT 1 FROM pg_stat_activity WHERE query LIKE 'COPY %' AND state = 'active'"
                " AND pid <> pg_backend_pid()"
            ).fetchone():
                return False
            time.sleep(0.1)
    return True


class SignalledSink(LocalSink):
    """A local sink during whose second block a run termination's signal arrives."""

    def open_staging(self, run_id: str, relpath: str, content_type: str) -> LocalStagingFile:
        staging = super().open_staging(run_id, relpath, content_type)
        blocks = 0

        def write(block: bytes, /) -> None:
            nonlocal blocks
            LocalStagingFile.write(staging, block)  # the real write, then the signal
            blocks += 1
            if blocks == 2:
                _thread.interrupt_main()

        staging.write = write  # type: ignore[method-assign]
        return staging


def test_cancellation_mid_extraction_leaves_nothing(table, pg_conninfo, tmp_path):
    """The main thread is still reading the COPY when the signal comes: the bounded queue
    keeps it at most a few chunks ahead of the writer."""
    sink = SignalledSink(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        extract(pg_conninfo, sink, "cancelled")
    assert sink.list_files() == []
    assert not (tmp_path / "_staging").exists()
    assert no_worker_left()
    assert not copy_left_running(pg_conninfo)


def test_cancellation_mid_stream_stops_worker_and_copy(pg_conninfo):
    """A signal while blocks are flowing: the worker stops and the server's COPY too."""
    statement = sql.SQL(
        "COPY (SELECT i, repeat('x', 100) FROM generate_series(1, 100000000) i)"
        " TO STDOUT (FORMAT csv)"
    )

    class InterruptingWriter(Blocks):
        def write(self, block: bytes, /) -> None:
            super().write(block)
            if len(self.blocks) == 2:
                _thread.interrupt_main()  # what a run termination delivers: a signal

    writer = InterruptingWriter()
    with psycopg.connect(pg_conninfo) as conn, conn.cursor() as cur:
        with pytest.raises(KeyboardInterrupt):
            stream_copy(cur, statement, writer, get_codec("gzip").compressor(1),
                        block_size=64 << 10)  # fmt: skip
        assert len(writer.blocks) >= 2
    assert no_worker_left()
    assert not copy_left_running(pg_conninfo)
