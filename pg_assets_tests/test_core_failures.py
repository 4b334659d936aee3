"""The core without Dagster: a disk error and a cancellation mid-stream leave the previous
version published and nothing in staging."""

import _thread
import datetime as dt
import errno
import threading
import time

import psycopg
import pytest

from pg_assets.core.compression import get_codec
from pg_assets.core.extract import ExtractionError, extract_day
from pg_assets.core.identifiers import QualifiedName
from pg_assets.core.layout import daily_paths
from pg_assets.dev.demo_data import create_daily_partitioned
from pg_assets.sinks.local import LocalSink, LocalStagingFile

DAY = dt.date(2026, 10, 5)
NAME = QualifiedName("corefail", "t")


@pytest.fixture(scope="module")
def table(pg_conninfo: str) -> None:
    with psycopg.connect(pg_conninfo, autocommit=True) as c:
        create_daily_partitioned(c, NAME.schema, NAME.name, [DAY], 300_000)


class FullDisk(LocalSink):
    """A local sink whose disk fills up after a few blocks."""

    def open_staging(self, run_id: str, relpath: str, content_type: str) -> LocalStagingFile:
        staging = super().open_staging(run_id, relpath, content_type)
        written = 0

        def write(block: bytes, /) -> None:
            nonlocal written
            written += 1
            if written > 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            LocalStagingFile.write(staging, block)

        staging.write = write  # type: ignore[method-assign]
        return staging


def extract(conninfo: str, sink: LocalSink, run_id: str):
    with psycopg.connect(conninfo, application_name="pg_assets") as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        return extract_day(
            conn, source="core", table=NAME, column="order_date", day=DAY, timezone="UTC",
            sink=sink, codec=get_codec("gzip"), level=1, run_id=run_id, block_size=256 * 1024,
        )  # fmt: skip


def test_disk_full_keeps_previous_version(table, pg_conninfo, tmp_path):
    good = LocalSink(tmp_path)
    extract(pg_conninfo, good, "v1")
    paths = daily_paths("core", NAME, DAY)
    before = {p: good.read_bytes(p) for p in good.list_files()}
    with pytest.raises(ExtractionError, match=r"corefail\.t, partition 2026-10-05.*No space left"):
        extract(pg_conninfo, FullDisk(tmp_path), "v2")
    assert {p: good.read_bytes(p) for p in good.list_files()} == before
    assert paths.manifest in before and len(before) == 2


def test_cancellation_mid_copy_leaves_nothing(table, pg_conninfo, tmp_path):
    sink = LocalSink(tmp_path)

    def interrupt_when_copying() -> None:
        with psycopg.connect(pg_conninfo, autocommit=True) as c:
            for _ in range(3000):
                if c.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE state = 'active' AND query LIKE 'COPY %'"
                    " AND pid <> pg_backend_pid()"
                ).fetchone():
                    time.sleep(0.1)
                    _thread.interrupt_main()  # what a run termination delivers: a signal
                    return
                time.sleep(0.01)

    threading.Thread(target=interrupt_when_copying, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        extract(pg_conninfo, sink, "cancelled")
    assert sink.list_files() == []
    # the server is not left with a stuck COPY
    with psycopg.connect(pg_conninfo, autocommit=True) as c:
        for _ in range(100):
            if not c.execute(
                "SELECT 1 FROM pg_stat_activity WHERE query LIKE 'COPY %' AND state = 'active'"
                " AND pid <> pg_backend_pid()"
            ).fetchone():
                break
            time.sleep(0.1)
        else:
            pytest.fail("the cancelled COPY is still running on the server")
