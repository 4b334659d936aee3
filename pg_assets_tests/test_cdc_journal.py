"""The CDC journal's bookkeeping in the lake, without a slot: which files a later run may delete.

A run that finds `_head.json` missing rebuilds it from listings, and cannot tell which change
files from the next position belong to which attempt. Two attempts from the same position can
exist (one killed before its commit, one that lost the slot's lock but is still running); the
second may commit after the rebuild. Whatever the next run settles, it must never delete a file
that a committed batch manifest names.
"""

import json

from pg_assets.core.cdc.batch import Journal, Pending
from pg_assets.core.cdc.snapshot import SnapshotRef
from pg_assets.core.identifiers import QualifiedName
from pg_assets.core.layout import (
    cdc_batch_manifest,
    cdc_change_file,
    cdc_snapshot_file,
    cdc_snapshot_manifest,
)
from pg_assets.sinks.local import LocalSink

SOURCE, SLOT = "shop", "s1"
TABLE = QualifiedName("public", "inv")
S0, E0, E1, E2 = 0x100, 0x200, 0x300, 0x380


def _manifest(start: int, end: int, files: list[str], run: str) -> bytes:
    return json.dumps(
        {
            "start_lsn": f"{start:016X}",
            "end_lsn": f"{end:016X}",
            "run_id": run,
            "tables": [
                {"schema_name": "public", "table_name": "inv", "snapshot_lsn": f"{0x50:016X}"}
            ],
            "files": [{"path": f} for f in files],
        }
    ).encode()


def test_a_rebuilt_head_never_deletes_a_file_a_committed_batch_names(tmp_path):
    sink = LocalSink(tmp_path / "bronze")
    first = cdc_change_file(SOURCE, TABLE, S0, E0, "00000000", 0, ".gz")
    sink.write_bytes("r0", first, b"batch 0", "application/gzip")
    sink.write_bytes(
        "r0", cdc_batch_manifest(SOURCE, SLOT, S0), _manifest(S0, E0, [first], "r0"), "x"
    )
    killed = cdc_change_file(SOURCE, TABLE, E0, E1, "aaaaaaaa", 0, ".gz")  # never commits
    alive = cdc_change_file(SOURCE, TABLE, E0, E2, "bbbbbbbb", 0, ".gz")  # lost its lock
    sink.write_bytes("x", killed, b"changes of the killed attempt", "application/gzip")
    sink.write_bytes("z", alive, b"changes of the attempt that commits", "application/gzip")

    # run B: no head, so one record from E0 holds both attempts' files; nothing is deleted
    Journal(sink, SOURCE, SLOT, "run-b").load([TABLE])
    assert sink.stat(killed) is not None and sink.stat(alive) is not None

    # the attempt that lost its lock commits from E0 (create-only), naming its own file
    sink.write_bytes(
        "z",
        cdc_batch_manifest(SOURCE, SLOT, E0),
        _manifest(E0, E2, [alive], "z"),
        "x",
        if_none_match=True,
    )

    # run C settles B's record: the committed batch's file stays, the other attempt's goes
    head, notes = Journal(sink, SOURCE, SLOT, "run-c").load([TABLE])
    assert sink.read_bytes(alive) == b"changes of the attempt that commits", notes
    assert sink.stat(killed) is None, notes
    assert head.committed is not None and head.committed.end_lsn == E2
    assert not head.unsettled


def test_a_snapshot_that_lost_to_another_at_the_same_point_leaves_only_the_winner(tmp_path):
    """Two runs took a snapshot of the table at the same consistent point (one had lost the
    source's lock); each wrote its own file (their names carry the run's token), and the other
    run's create-only manifest won. Settling this run's record deletes only this run's file,
    and the head points at the file the manifest names."""
    sink = LocalSink(tmp_path / "bronze")
    lsn = 0x900
    mine = cdc_snapshot_file(SOURCE, TABLE, lsn, "run-x", ".gz")
    theirs = cdc_snapshot_file(SOURCE, TABLE, lsn, "run-y", ".gz")
    assert mine != theirs
    manifest = cdc_snapshot_manifest(SOURCE, TABLE, lsn)
    journal = Journal(sink, SOURCE, SLOT, "run-x")
    head, _ = journal.load([TABLE])
    journal.begin(
        head,
        Pending("snapshot", [manifest], [mine], "run-x",
                snapshots=[SnapshotRef(TABLE, lsn, manifest, mine)], committing=True),
    )  # fmt: skip
    sink.write_bytes("run-x", mine, b"x's snapshot", "application/gzip")
    sink.write_bytes("run-y", theirs, b"y's snapshot", "application/gzip")
    sink.write_bytes(
        "run-y", manifest, json.dumps({"path": theirs, "lsn": f"{lsn:016X}"}).encode(), "x",
        if_none_match=True,
    )  # fmt: skip

    head, notes = Journal(sink, SOURCE, SLOT, "run-c").load([TABLE])
    assert sink.stat(mine) is None, notes
    assert sink.read_bytes(theirs) == b"y's snapshot"
    assert head.snapshots[TABLE].file == theirs and not head.unsettled
