"""A prepared transaction (two-phase commit) keeps its original now() and shows no start time
anywhere: while one exists the watermark must not advance, or its rows are lost when it is
committed. Needs max_prepared_transactions > 0, so this module starts its own PostgreSQL."""

import time
from collections.abc import Iterator

import psycopg
import pytest

from pg_assets.dev.embedded import _pg_ctl, start
from pg_assets_tests import test_incremental as base
from pg_assets_tests.test_incremental import (
    SETTLE_S,
    create_table,
    insert,
    latest_by_key,
    materialized,
    table_rows,
)

inc, pinst = base.inc, base.pinst  # fixtures


@pytest.fixture(scope="module")
def twopc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = start(tmp_path_factory.mktemp("pg2pc"))
    with psycopg.connect(server.conninfo, autocommit=True) as c:
        c.execute("ALTER SYSTEM SET max_prepared_transactions = 4")
    _pg_ctl(server.pgdata, ["-w", "-m", "fast", "restart"])
    yield server.conninfo
    server.stop()


def test_a_prepared_transaction_holds_the_watermark(twopc, inc, monkeypatch):
    monkeypatch.setenv("INC_2PC_CONNINFO", twopc)
    with psycopg.connect(twopc, autocommit=True) as db:
        create_table(db, "twopc")
        insert(db, "twopc", 1, 5)
        p = inc(
            [{"table": "inc.twopc", "cursor": "updated_at"}],
            postgres={"conninfo_env": "INC_2PC_CONNINFO"},
        )
        time.sleep(SETTLE_S)
        materialized(p.materialize())  # batch 0
        with psycopg.connect(twopc) as tpc:
            insert(tpc, "twopc", 100, 1)
            tpc.execute("PREPARE TRANSACTION 'inc_twopc'")
        time.sleep(SETTLE_S)
        insert(db, "twopc", 200, 3)  # committed after the prepared transaction began
        time.sleep(SETTLE_S)
        assert materialized(p.materialize()) is None  # held
        tick = p.tick(None)
        assert tick.run_requests == []
        assert "prepared transaction 'inc_twopc'" in tick.skip_message
        db.execute("COMMIT PREPARED 'inc_twopc'")
        time.sleep(SETTLE_S)
        meta = materialized(p.materialize())
        assert meta is not None and meta["batch"] == 1 and meta["rows"] == 4
        current = latest_by_key(p.batches())
        assert "100" in current and current == table_rows("twopc", twopc)
