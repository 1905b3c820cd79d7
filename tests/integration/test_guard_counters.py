"""The single-host relaying counters (relaymilter-counters, one mapped file): exact under concurrency.

Eight writer processes (and, separately, eight threads of one process) charge
the same identity at once, each a known number of times; the file must hold
exactly the sum - no increment lost. The limit is enforced exactly across
processes too: with a limit of L and more attempts than L, exactly L are
admitted. Also: the sliding hour, the address family, a stuck lock holder
(the store reports itself unavailable within its wait instead of blocking),
and a file that is not a counter file.
"""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import threading
import time
from pathlib import Path

import pytest

from relaymilter.errors import StoreUnavailable
from relaymilter.store.counters import CounterFile

pytestmark = pytest.mark.integration

WRITERS = 8
EACH = 400


def _writer(path: str, start: "multiprocessing.synchronize.Event", identity: str, limit: int,
            results: "multiprocessing.Queue") -> None:
    store = CounterFile(path, lock_wait=10.0)
    start.wait(10)
    admitted = 0
    now = time.time()
    for i in range(EACH):
        charge = store.charge(identity, now, {"recipients": 1, "messages": 1 if i % 4 == 0 else 0},
                              {"recipients": limit})
        admitted += charge.over is None
        # Other identities in between, so probe chains are exercised under the same lock.
        store.charge("other-%d-%d" % (os.getpid(), i % 7), now, {"recipients": 1}, {})
    results.put(admitted)


def _run_writers(path: str, identity: str, limit: int) -> list[int]:
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    results = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(path, start, identity, limit, results)) for _ in range(WRITERS)]
    for p in procs:
        p.start()
    start.set()
    got = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    return got


def _count(store: CounterFile, family: str, identity: str) -> int:
    return sum(u.count for u in store.usage(time.time()) if u.family == family and u.identity == identity)


def test_eight_processes_lose_no_increment(tmp_path: Path) -> None:
    path = str(tmp_path / "relayers-counters")
    CounterFile(path).charge("warm", time.time(), {"recipients": 1}, {})      # created before the race
    admitted = _run_writers(path, "alice", limit=10**9)
    assert admitted == [EACH] * WRITERS
    store = CounterFile(path, create=False)
    assert _count(store, "recipients", "alice") == WRITERS * EACH
    assert _count(store, "messages", "alice") == WRITERS * EACH // 4


def test_eight_processes_creating_the_file_at_once(tmp_path: Path) -> None:
    path = str(tmp_path / "relayers-counters")
    _run_writers(path, "bob", limit=10**9)
    assert _count(CounterFile(path), "recipients", "bob") == WRITERS * EACH


def test_a_file_caught_between_its_sizing_and_its_header_is_waited_for(tmp_path: Path) -> None:
    """The creator holds LOCK_EX from fallocate() to its header: another process waits, never calls it foreign."""
    from relaymilter.store import counters

    path = tmp_path / "relayers-counters"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.posix_fallocate(fd, 0, counters.SIZE)        # full size, header still zeros
        got: list[object] = []
        th = threading.Thread(target=lambda: got.append(
            CounterFile(str(path), lock_wait=10.0).charge("erin", time.time(), {"recipients": 1}, {})))
        th.start()
        time.sleep(0.3)
        os.pwrite(fd, counters._HEADER.pack(counters.MAGIC, counters.SLOTS, counters.SLOT, counters.MINUTES), 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        th.join(10)
    finally:
        os.close(fd)
    assert len(got) == 1 and got[0].over is None      # type: ignore[attr-defined]
    assert _count(CounterFile(str(path)), "recipients", "erin") == 1


def test_limit_is_exact_across_processes(tmp_path: Path) -> None:
    path = str(tmp_path / "relayers-counters")
    limit = 1000            # fewer than the 3200 attempts
    admitted = _run_writers(path, "carol", limit=limit)
    assert sum(admitted) == limit
    assert _count(CounterFile(path), "recipients", "carol") == limit


def test_eight_threads_lose_no_increment(tmp_path: Path) -> None:
    store = CounterFile(str(tmp_path / "relayers-counters"), lock_wait=10.0)
    barrier = threading.Barrier(WRITERS)

    def work() -> None:
        barrier.wait()
        for _ in range(EACH):
            store.charge("dave", time.time(), {"recipients": 1}, {})

    threads = [threading.Thread(target=work) for _ in range(WRITERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert _count(store, "recipients", "dave") == WRITERS * EACH


def test_sliding_hour_in_minutes(tmp_path: Path) -> None:
    store = CounterFile(str(tmp_path / "c"))
    t0 = 1_800_000_000.0            # a minute boundary
    for minute in range(0, 60, 10):
        store.charge("erin", t0 + 60 * minute, {"recipients": 2}, {})
    assert store.charge("erin", t0 + 59 * 60, {}, {}).counts == {}
    assert store.charge("erin", t0 + 59 * 60, {"recipients": 0}, {}).counts["recipients"] == 12
    # One minute on, minute 0 has left the hour; at minute 71 only minutes 20..50 count.
    assert store.charge("erin", t0 + 60 * 60, {"recipients": 0}, {}).counts["recipients"] == 10
    assert store.charge("erin", t0 + 71 * 60, {"recipients": 0}, {}).counts["recipients"] == 8
    assert store.charge("erin", t0 + 200 * 60, {"recipients": 0}, {}).counts["recipients"] == 0


def test_over_limit_counts_nothing_unless_forced(tmp_path: Path) -> None:
    store = CounterFile(str(tmp_path / "c"))
    now = time.time()
    limits = {"recipients": 2, "messages": 5}
    assert store.charge("frank", now, {"recipients": 1, "messages": 1}, limits).over is None
    assert store.charge("frank", now, {"recipients": 1}, limits).over is None
    over = store.charge("frank", now, {"recipients": 1, "messages": 1}, limits)
    assert over.over == "recipients" and over.counts == {"recipients": 2, "messages": 1}
    forced = store.charge("frank", now, {"recipients": 1, "messages": 1}, limits, force=True)
    assert forced.over == "recipients" and forced.counts == {"recipients": 3, "messages": 2}


def test_addresses_per_user(tmp_path: Path) -> None:
    store = CounterFile(str(tmp_path / "c"))
    now = time.time()
    seen = [store.charge("gina", now, {}, {"addresses": 2}, address=a)
            for a in ("192.0.2.1", "192.0.2.2", "192.0.2.1", "192.0.2.3")]
    assert [c.counts["addresses"] for c in seen] == [1, 2, 2, 3]
    assert [c.over for c in seen] == [None, None, None, "addresses"]
    assert store.charge("gina", now + 3601, {}, {"addresses": 2}, address="192.0.2.4").counts["addresses"] == 1


def test_stuck_lock_holder_makes_it_unavailable_not_blocking(tmp_path: Path) -> None:
    path = str(tmp_path / "c")
    store = CounterFile(path, lock_wait=0.05)
    store.charge("hank", time.time(), {"recipients": 1}, {})
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="lock not obtained"):
            store.charge("hank", time.time(), {"recipients": 1}, {})
        assert time.monotonic() - started < 1.0
    finally:
        os.close(fd)
    assert store.charge("hank", time.time(), {"recipients": 1}, {}).counts["recipients"] == 2


def test_not_a_counter_file(tmp_path: Path) -> None:
    path = tmp_path / "c"
    path.write_bytes(b"this is not it\n")
    with pytest.raises(StoreUnavailable, match="not a relaymilter counter file"):
        CounterFile(str(path)).charge("ivan", time.time(), {"recipients": 1}, {})
    assert path.read_bytes() == b"this is not it\n"


def test_forget(tmp_path: Path) -> None:
    store = CounterFile(str(tmp_path / "c"))
    now = time.time()
    store.charge("judy", now, {"recipients": 3, "messages": 1}, {}, address="192.0.2.9")
    store.forget("judy")
    assert [u for u in store.usage(now) if u.identity == "judy"] == []
    assert store.charge("judy", now, {"recipients": 1}, {}).counts["recipients"] == 1


def test_the_whole_file_check_keeps_to_what_os_fstat_says(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import platform
    import struct

    from relaymilter.store import gilcalls

    path = tmp_path / "f"
    path.write_bytes(b"x" * 1234)
    fd = os.open(path, os.O_RDONLY)
    try:
        checked = gilcalls.Examiner(fd)
        assert checked(fd) == (1234, 1)
        # Offsets that do not match this machine's struct stat: found out at once, os.fstat used.
        monkeypatch.setitem(gilcalls.STAT_LAYOUT, platform.machine(), struct.Struct("<QQ"))
        fallback = gilcalls.Examiner(fd)
        assert fallback._layout is None and fallback(fd) == (1234, 1)
        os.unlink(path)
        assert checked(fd) == (1234, 0) and fallback(fd) == (1234, 0)
    finally:
        os.close(fd)
