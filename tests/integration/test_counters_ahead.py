"""Recipients counted ahead in the counter file, and refunded: a count is never low, and exact once refunded.

A count within half the limit takes the transaction's next recipient too
(Charge.reserved); one left unused is refunded - queued in the process and
taken off by its next operation on the file or by its refund thread within
refunds.DELAY. Eight writer processes running transactions of 1 to 4
recipients that way, side by side, must leave exactly the recipients they
relayed. Near the limit nothing is counted ahead, so the limit stays exact.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import threading
import time
from pathlib import Path
from typing import Optional

import pytest

from relaymilter.store import refunds
from relaymilter.store.counters import Charge, CounterFile

pytestmark = pytest.mark.integration

WRITERS = 8
TRANSACTIONS = 150


def _count(store: CounterFile, identity: str, family: str = "recipients") -> int:
    return sum(u.count for u in store.usage(time.time()) if u.family == family and u.identity == identity)


def _raw_count(path: str, identity: str) -> int:
    """The count as another process sees it, without taking off this process's queue first."""
    return _count(CounterFile(path), identity)


def _ahead(store: CounterFile, identity: str, now: Optional[float] = None) -> Charge:
    """One recipient counted for *identity*, with the next counted ahead (no limit: always)."""
    return store.charge(identity, time.time() if now is None else now, {"recipients": 1}, {}, ahead=1)


def _file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, delay: float) -> tuple[str, CounterFile]:
    """A fresh counter file's path and this process's CounterFile of it, refunds flushed after *delay*."""
    monkeypatch.setattr(refunds, "DELAY", delay)
    path = str(tmp_path / "c")
    return path, CounterFile(path)


def _give_back(store: CounterFile, identity: str, held: Charge) -> None:
    store.refund(identity, held.reserved, held.minute, held.generation)


def test_counted_ahead_within_half_the_limit_only(tmp_path: Path) -> None:
    store = CounterFile(str(tmp_path / "c"))
    now = time.time()
    first = store.charge("ann", now, {"recipients": 1, "messages": 1}, {"recipients": 8}, ahead=1)
    assert first.reserved == 1 and first.minute == int(now) // 60
    assert first.counts == {"recipients": 2, "messages": 1}
    # 2 counted; 2 + 1 + 1 is half of 8: still ahead. 4 + 1 + 1 is not: one at a time from here.
    assert store.charge("ann", now, {"recipients": 1}, {"recipients": 8}, ahead=1).reserved == 1
    assert [store.charge("ann", now, {"recipients": 1}, {"recipients": 8}, ahead=1).reserved
            for _ in range(4)] == [0] * 4
    over = store.charge("ann", now, {"recipients": 1}, {"recipients": 8}, ahead=1)
    assert over.over == "recipients" and over.reserved == 0 and over.counts["recipients"] == 8
    # No recipients limit: always ahead (nothing to check, the count is for the admin's listing).
    assert store.charge("bea", now, {"recipients": 1}, {"messages": 5}, ahead=1).reserved == 1


def test_a_refund_is_taken_off_by_the_next_operation_or_the_thread(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "c")
    store = CounterFile(path)
    now = time.time()
    reserved = _ahead(store, "cid", now)
    assert _raw_count(path, "cid") == 2
    # Taken off by this process's next charge, under the same lock.
    monkeypatch.setattr(refunds, "DELAY", 30.0)
    _give_back(store, "cid", reserved)
    assert _raw_count(path, "cid") == 2                 # queued: another process still sees it
    assert store.charge("dot", now, {"recipients": 1}, {}).counts["recipients"] == 1
    assert _raw_count(path, "cid") == 1
    store.close()
    # Taken off by the thread when the process does nothing more.
    monkeypatch.setattr(refunds, "DELAY", 0.02)
    store = CounterFile(path)
    reserved = _ahead(store, "cid", now)
    assert _raw_count(path, "cid") == 3
    _give_back(store, "cid", reserved)
    deadline = time.monotonic() + 5
    while _raw_count(path, "cid") != 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _raw_count(path, "cid") == 2
    # Closing gives back what is still queued.
    monkeypatch.setattr(refunds, "DELAY", 30.0)
    _give_back(store, "cid", _ahead(store, "cid", now))
    store.close()
    assert _raw_count(path, "cid") == 3


def test_closing_while_the_thread_waits_to_flush_ends_the_thread(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path, store = _file(tmp_path, monkeypatch, 0.3)
    held = _ahead(store, "jon")
    before = set(threading.enumerate())
    _give_back(store, "jon", held)
    (thread,) = set(threading.enumerate()) - before     # this file's refund thread
    time.sleep(0.05)                                    # the thread waits out DELAY
    store.close()                                       # gives the refund back itself
    assert _raw_count(path, "jon") == 1
    thread.join(5)
    assert not thread.is_alive()                        # not left waiting for ever


def test_a_refund_never_takes_off_what_is_not_there(tmp_path: Path) -> None:
    path = str(tmp_path / "c")
    store = CounterFile(path)
    t0 = (int(time.time()) // 60) * 60.0
    old = _ahead(store, "eve", t0)
    store.charge("eve", t0 + 61 * 60, {"recipients": 1}, {})          # that minute has left the hour
    _give_back(store, "eve", old)
    store.flush()
    assert store.charge("eve", t0 + 61 * 60, {"recipients": 0}, {}).counts["recipients"] == 1
    now = time.time()
    held = _ahead(store, "fay", now)
    store.forget("fay")                                                 # an admin lifted fay meanwhile
    _give_back(store, "fay", held)
    store.flush()
    assert _count(store, "fay") == 0
    assert store.charge("fay", now, {"recipients": 1}, {}).counts["recipients"] == 1


@pytest.mark.parametrize("start_afresh", ["removed", "cut short"])
def test_a_refund_of_a_count_in_a_file_since_replaced_leaves_the_new_file_alone(tmp_path: Path,
                                                                                start_afresh: str) -> None:
    path = str(tmp_path / "relayers-counters")
    store = CounterFile(path)
    now = time.time()
    held = _ahead(store, "ida", now)
    # The admin starts counting afresh (rm, or ': >'), and another process counts ida in the new file.
    if start_afresh == "removed":
        os.unlink(path)
    else:
        os.truncate(path, 0)
    other = CounterFile(path)
    assert other.charge("ida", now, {"recipients": 1}, {}).counts["recipients"] == 1
    assert other.charge("ida", now, {"recipients": 1}, {}).counts["recipients"] == 2
    _give_back(store, "ida", held)
    store.flush()
    assert _raw_count(path, "ida") == 2


def test_a_forked_child_does_not_give_back_its_parents_refunds(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    path, store = _file(tmp_path, monkeypatch, 30.0)
    _give_back(store, "gus", _ahead(store, "gus"))
    pid = os.fork()
    if pid == 0:
        try:
            store.charge("other", time.time(), {"recipients": 1}, {})
            store.flush()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert _raw_count(path, "gus") == 2                 # the child took nothing off
    store.flush()
    assert _raw_count(path, "gus") == 1


def _writer(path: str, start: "multiprocessing.synchronize.Event", seed: int,
            results: "multiprocessing.Queue") -> None:
    store = CounterFile(path, lock_wait=10.0)
    rnd = random.Random(seed)
    start.wait(10)
    relayed = 0
    now = time.time()
    for _ in range(TRANSACTIONS):
        reserved, minute, generation = 0, 0, 0
        for i in range(rnd.randint(1, 4)):              # one transaction, as policy.limits runs it
            relayed += 1
            if reserved:
                reserved -= 1
                continue
            charge = store.charge("hal", now, {"recipients": 1, "messages": 0 if i else 1}, {"recipients": 10 ** 6},
                                  ahead=1)
            reserved, minute, generation = charge.reserved, charge.minute, charge.generation
        if reserved:
            store.refund("hal", reserved, minute, generation)
    store.close()
    results.put(relayed)


def test_eight_processes_counting_ahead_and_refunding_leave_the_exact_count(tmp_path: Path) -> None:
    path = str(tmp_path / "relayers-counters")
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    results = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(path, start, seed, results)) for seed in range(WRITERS)]
    for p in procs:
        p.start()
    start.set()
    relayed = sum(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    store = CounterFile(path)
    assert _count(store, "hal") == relayed
    assert _count(store, "hal", "messages") == WRITERS * TRANSACTIONS
