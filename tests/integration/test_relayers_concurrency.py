"""relayers.db under real concurrency: many writer processes, a cron-like expire loop, readers.

The milter, the log watcher, cron'd `vsmtprelay expire` and an admin all touch
relayers.db at once. These tests run them as separate processes against one
real file and then check that no update was lost, the file verifies, and no
reader ever failed or read stale data.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import time

from relaymilter.store.relayers import BDBRelayStore

WRITERS = 8
PER_WRITER = 300


def address(writer: int, i: int) -> str:
    return "10.%d.%d.%d" % (writer + 1, i >> 8, i & 255)


def _writer(path: str, writer: int, stamp: int) -> None:
    store = BDBRelayStore(path)
    for i in range(PER_WRITER):
        store.add({address(writer, i): stamp})


def _reader(path: str, stop, counts) -> None:
    store = BDBRelayStore(path)
    n = errors = misses = 0
    while not stop.is_set():
        try:
            # the sentinel is never expired and never deleted: it must always be there
            if store.lookup("192.0.2.200") is None:
                misses += 1
            store.lookup("10.1.0.%d" % (n % 250))
            n += 1
        except Exception:  # noqa: BLE001 - any failure is counted and asserted on
            errors += 1
    counts[0], counts[1], counts[2] = n, errors, misses


def test_writers_expire_loop_and_reader(tmp_path):
    path = str(tmp_path / "relayers.db")
    now = int(time.time())
    seed = BDBRelayStore(path)
    seed.add({"192.0.2.200": now + 86400})                               # future: survives expire
    seed.add({"172.16.%d.%d" % (i >> 8, i & 255): now - 7200 for i in range(500)})   # two hours old

    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    counts = ctx.Array("l", 3)
    reader = ctx.Process(target=_reader, args=(path, stop, counts))
    reader.start()
    writers = [ctx.Process(target=_writer, args=(path, w, now)) for w in range(WRITERS)]
    for p in writers:
        p.start()
    expire_runs = 0
    try:
        # cron's "vsmtprelay expire 60", looping while the writers work
        while any(p.is_alive() for p in writers) or expire_runs < 3:
            proc = subprocess.run(["vsmtprelay", "-f", path, "expire", "60"], capture_output=True, text=True, timeout=60)
            assert proc.returncode == 0, proc.stderr
            expire_runs += 1
        for p in writers:
            p.join(120)
            assert p.exitcode == 0
    finally:
        stop.set()
        reader.join(60)
        for p in writers + [reader]:
            if p.is_alive():
                p.kill()
    assert reader.exitcode == 0
    lookups, errors, misses = counts[:]
    assert lookups > 10 and errors == 0 and misses == 0     # the reader really ran alongside

    entries = dict(BDBRelayStore(path).entries())
    for w in range(WRITERS):
        for i in range(PER_WRITER):
            assert entries[address(w, i)] == now
    assert not any(k.startswith("172.16.") for k in entries)     # the old ones were expired
    assert entries["192.0.2.200"] == now + 86400
    assert len(entries) == WRITERS * PER_WRITER + 1

    verify = subprocess.run(["db5.3_verify", path], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stderr


def _bumper(path: str, done, checked, rounds: int) -> None:
    store = BDBRelayStore(path)
    for i in range(1, rounds + 1):
        store.add({"192.0.2.1": i})
        done.value = i          # published only after the write (and its sync) finished
        # Go on once the reader has made a lookup that began after this
        # publication, so every value is checked while the next write runs.
        deadline = time.monotonic() + 30
        while checked.value < i:
            if time.monotonic() > deadline:
                raise SystemExit("reader made no lookup after value %d within 30s" % i)
            time.sleep(0.0002)


def test_no_stale_reads_across_processes(tmp_path):
    """Once a writer's add() has returned, every later lookup elsewhere sees it (never an older value)."""
    path = str(tmp_path / "relayers.db")
    BDBRelayStore(path).add({"192.0.2.1": 0})
    reader = BDBRelayStore(path)
    ctx = multiprocessing.get_context("fork")
    done, checked = ctx.Value("l", 0), ctx.Value("l", 0)
    rounds = 1500
    p = ctx.Process(target=_bumper, args=(path, done, checked, rounds))
    p.start()
    checks = 0
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            published = done.value
            seen = reader.lookup("192.0.2.1")
            assert seen is not None and seen >= published, (seen, published)
            checked.value = published
            checks += 1
            # A breath between lookups: back-to-back LOCK_SH holds would starve
            # the writer's LOCK_EX (flock has no writer preference).
            time.sleep(0.0001)
            if published == rounds:
                break
    finally:
        p.join(60)
        if p.is_alive():
            p.kill()
    assert p.exitcode == 0 and checks >= rounds


def test_admin_makemap_rebuild_while_milter_reads(tmp_path):
    """`vsmtprelay dump > f; makemap hash relayers < f` while a long-lived reader looks up."""
    base = str(tmp_path / "relayers")
    path = base + ".db"
    now = int(time.time())
    store = BDBRelayStore(path)
    store.add({"192.0.2.%d" % i: now for i in range(1, 50)})
    reader = BDBRelayStore(path)
    assert reader.lookup("192.0.2.1") == now
    dump = subprocess.run(["vsmtprelay", "-f", path, "dump"], capture_output=True, text=True, check=True, timeout=60).stdout
    edited = dump.replace("192.0.2.1 %d" % now, "192.0.2.1 %d" % (now + 60)) + "198.51.100.7 %d\n" % now
    subprocess.run(["makemap", "hash", base], input=edited.encode(), check=True, timeout=60)
    os.chmod(path, 0o644)
    assert reader.lookup("192.0.2.1") == now + 60
    assert reader.lookup("198.51.100.7") == now
    assert len(reader.entries()) == 50
