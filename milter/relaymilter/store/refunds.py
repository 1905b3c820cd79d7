"""NAME
    relaymilter.store.refunds - recipients counted ahead and not used: queued, then given back

DESCRIPTION
    The counter file (relaymilter.store.counters) lets a transaction count
    its next recipient ahead, so that recipient costs no lock; one left
    unused when the transaction ends is refunded. A refund is not worth a
    lock of its own: Refunds queues it in the process, and the counter file
    takes the queue off in its next operation under the lock (take()), or
    the queue's thread has it flushed within DELAY, whichever comes first.

    The queue belongs to one process. A forked child starts with an empty
    one and a thread of its own when it first refunds: what its parent had
    queued is the parent's to give back, and giving it back twice would
    make a count low.

DIAGNOSTICS
    A flush that fails (the file unavailable) is logged and the refunds stay
    queued for the next operation; a refund not made leaves a count high,
    never low.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable

from relaymilter.errors import StoreUnavailable
from relaymilter.store.gilcalls import pid

log = logging.getLogger("relaymilter.counters")

DELAY = 0.02                # seconds a refund may wait for the process's next operation on the file


class Refunds:
    """One process's queue of (identity, n, minute, generation) refunds; *flush* takes them off under the lock."""

    def __init__(self, flush: Callable[[], None]) -> None:
        self._flush = flush
        self._queue: collections.deque[tuple[str, int, int, int]] = collections.deque()
        self._pid = pid()
        self._wake: threading.Event | None = None      # the thread's, once started in this process
        self._stopped = False

    def __bool__(self) -> bool:
        return bool(self._queue)

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, identity: str, n: int, minute: int, generation: int) -> None:
        self._own()
        self._queue.append((identity, n, minute, generation))
        wake = self._wake
        if wake is None:
            wake = self._wake = threading.Event()
            self._stopped = False
            threading.Thread(target=self._run, args=(wake,), name="relaymilter-refunds", daemon=True).start()
        if not wake.is_set():
            wake.set()

    def take(self) -> list[tuple[str, int, int, int]]:
        """Everything queued in this process (the caller holds the file's lock)."""
        self._own()
        queue = self._queue
        taken = []
        while queue:
            taken.append(queue.popleft())
        return taken

    def stop(self) -> None:
        """No more flushes by the thread (the file is being closed)."""
        self._stopped = True
        if self._wake is not None and self._pid == pid():
            self._wake.set()
        self._wake = None

    def _own(self) -> None:
        if self._pid != pid():
            # A forked child: its parent's queue and thread are not its own.
            self._queue, self._wake, self._pid = collections.deque(), None, pid()

    def _run(self, wake: threading.Event) -> None:
        while True:
            wake.wait()
            time.sleep(DELAY)
            wake.clear()
            # Asked after the clear: a stop() made while this thread slept must not be waited for again.
            if self._stopped or self._wake is not wake:
                return
            try:
                self._flush()
            except StoreUnavailable as exc:
                log.warning("refunded recipients not given back yet (the next count tries again): %s", exc)
            except Exception:  # noqa: BLE001 - this thread must go on, or refunds would pile up
                log.exception("refunded recipients not given back")
