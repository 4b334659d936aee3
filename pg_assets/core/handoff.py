"""A bounded queue between one producer and one consumer thread in which nobody waits forever.

Both pipelines of pg_assets (COPY → compressor/writer, and compressed blocks → ADLS appender)
hand work to a background thread through a small queue. A plain `queue.Queue` with blocking
`put`/`get` and a bare `join` turns any failure on the other side into a hang: the consumer
dies and the producer blocks on a full queue, or the producer dies and the consumer waits for
an end marker nobody sends. Here every wait is a short timed wait in a loop that looks at
the other side each time round:

- the producer's `put` and `finish` raise the consumer's own exception as soon as it fails,
  raise if the consumer thread is gone without finishing, and raise `Stalled` if it has made
  no progress (`touch`) for `stall_s` seconds;
- the consumer's `get` raises `Aborted` once the producer has given up (`abort`), so the
  thread returns instead of waiting for more work;
- `abort` waits at most `grace_s` for the consumer to notice.

The consumer runs as a daemon thread only so that a write stuck in the kernel (a hung NFS
mount) can never keep the interpreter alive; in every other case it ends within a poll
interval of an abort.
"""

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

POLL_S = 0.1


class Aborted(Exception):
    """Raised in the consumer thread when the producer has given up."""


class Stalled(TimeoutError):
    """The consumer made no progress for longer than the configured bound."""


class Handoff:
    def __init__(self, depth: int, *, what: str, stall_s: float) -> None:
        self.what = what
        self.stall_s = stall_s
        self.error: BaseException | None = None
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._aborted = threading.Event()
        self._progress = time.monotonic()
        self._thread: threading.Thread | None = None

    # -- both sides -------------------------------------------------------------------------

    def start(
        self,
        target: Callable[[], None],
        *,
        name: str,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        """Run `target` in the consumer thread; its exception is kept for the producer."""

        def run() -> None:
            try:
                target()
            except Aborted:
                pass
            except BaseException as e:  # surfaced to the producer by put/finish
                self.error = e
                if on_error is not None:
                    try:
                        on_error(e)
                    except Exception:
                        pass

        self._thread = threading.Thread(target=run, name=name, daemon=True)
        self._thread.start()

    @property
    def aborted(self) -> bool:
        return self._aborted.is_set()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- producer side ----------------------------------------------------------------------

    def check(self) -> None:
        """Raise if the consumer failed or vanished."""
        if self.error is not None:
            raise self.error
        if not self.alive:
            raise RuntimeError(f"{self.what} ended without finishing its work")

    def _check_stall(self, waiting_since: float) -> None:
        # A consumer idle because the producer is slow is not stalled: only time spent
        # waiting on the consumer, with no progress from it, counts.
        idle = time.monotonic() - max(self._progress, waiting_since)
        if idle > self.stall_s:
            self._aborted.set()
            raise Stalled(f"{self.what} made no progress for {idle:.0f} s")

    def put(self, item: Any) -> None:
        since = time.monotonic()
        while True:
            self.check()
            try:
                self._queue.put(item, timeout=POLL_S)
                return
            except queue.Full:
                self._check_stall(since)

    def finish(self) -> None:
        """Wait for the consumer to end after the last item; raise its error if it failed."""
        since = time.monotonic()
        thread = self._thread
        while thread is not None and thread.is_alive() and self.error is None:
            thread.join(POLL_S)
            if thread.is_alive():
                self._check_stall(since)
        if self.error is not None:
            raise self.error

    def abort(self, grace_s: float = 10.0) -> None:
        """Tell the consumer to stop and give it `grace_s` to do so."""
        self._aborted.set()
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return
        deadline = time.monotonic() + grace_s
        while thread.is_alive() and time.monotonic() < deadline:
            thread.join(min(POLL_S, max(deadline - time.monotonic(), 0)))

    # -- consumer side ----------------------------------------------------------------------

    def get(self) -> Any:
        while True:
            if self._aborted.is_set():
                raise Aborted
            try:
                return self._queue.get(timeout=POLL_S)
            except queue.Empty:
                continue

    def touch(self) -> None:
        """Record progress (an item consumed, a block written)."""
        self._progress = time.monotonic()

    def raise_if_aborted(self) -> None:
        if self._aborted.is_set():
            raise Aborted
