"""The decision log writer hands lines over in chunks, in order, and lets other threads run between them."""

from __future__ import annotations

import threading
import time

from relaymilter import decisionlog
from relaymilter.decisionlog import DecisionLog


def test_flush_writes_every_line_in_order_in_chunks():
    batches: list[list[str]] = []
    dl = DecisionLog(lambda batch: batches.append(list(batch)), interval=3600)
    n = decisionlog.CHUNK * 3 + 5
    for i in range(n):
        dl.log("%06X: pass: RCPT rule=%s", i, "local_domain")
    dl.flush(pause=0.0001)
    dl.close()
    assert [len(b) for b in batches] == [decisionlog.CHUNK] * 3 + [5]
    assert [line for b in batches for line in b] == ["%06X: pass: RCPT rule=local_domain" % i for i in range(n)]


def test_writer_pauses_between_chunks():
    # A thread that wants the GIL gets it between two chunks, not after the whole batch.
    seen_between: list[int] = []
    written: list[int] = []

    dl = DecisionLog(lambda batch: written.append(len(batch)), interval=3600)
    for i in range(decisionlog.CHUNK * 4):
        dl.log("%d", i)
    stop = threading.Event()

    def other():
        while not stop.is_set():
            seen_between.append(len(written))
            time.sleep(0.00005)

    t = threading.Thread(target=other)
    t.start()
    try:
        time.sleep(0.01)
        dl.flush(pause=0.005)
    finally:
        stop.set()
        t.join(5)
        dl.close()
    assert written == [decisionlog.CHUNK] * 4
    # The other thread ran while 1, 2 and 3 chunks were written: the flush was interleaved.
    assert {1, 2, 3} <= set(seen_between)
