"""The hand-off between a producer and its background thread: whatever happens on one
side, the other side's wait ends and learns why."""

import threading

import pytest

from pg_assets.core.handoff import Aborted, Handoff, Stalled


def test_consumer_failure_reaches_a_blocked_producer():
    handoff = Handoff(1, what="the consumer", stall_s=60)

    def consume() -> None:
        handoff.get()
        raise OSError(28, "No space left on device")

    handoff.start(consume, name="test-consumer")
    with pytest.raises(OSError, match="No space left"):
        for _ in range(10):  # the queue holds one item: the producer would block for good
            handoff.put(b"x")
    with pytest.raises(OSError, match="No space left"):
        handoff.finish()


def test_a_consumer_that_stops_making_progress_fails_the_producer():
    release = threading.Event()
    handoff = Handoff(1, what="the stuck consumer", stall_s=0.5)

    def consume() -> None:
        handoff.get()
        release.wait(30)  # stuck, as in a write to a hung mount

    handoff.start(consume, name="test-consumer")
    try:
        with pytest.raises(Stalled, match="the stuck consumer made no progress"):
            for _ in range(10):
                handoff.put(b"x")
    finally:
        release.set()


def test_a_consumer_that_vanishes_fails_the_producer():
    handoff = Handoff(1, what="the consumer", stall_s=60)
    handoff.start(lambda: None, name="test-consumer")  # ends without taking anything
    with pytest.raises(RuntimeError, match="ended without finishing"):
        for _ in range(10):
            handoff.put(b"x")


def test_abort_ends_a_waiting_consumer():
    handoff = Handoff(1, what="the consumer", stall_s=60)
    ended = threading.Event()

    def consume() -> None:
        try:
            handoff.get()  # nothing will come
        except Aborted:
            ended.set()
            raise

    handoff.start(consume, name="test-consumer")
    handoff.abort(grace_s=10)
    assert ended.is_set() and not handoff.alive
    assert handoff.error is None  # an abort is not the consumer's failure
