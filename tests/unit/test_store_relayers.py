"""The relayers store on real Berkeley DB files: formats, styles, locking, change detection."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import subprocess
import threading
import time

import pytest
from berkeleydb import db as bdb

from relaymilter.errors import StoreUnavailable
from relaymilter.store import bdbbase as storebdb
from relaymilter.store import mapreader
from relaymilter.store.relayers import BDBRelayStore, open_relay_store, parse_ticks


def raw_items(path: str) -> dict[bytes, bytes]:
    handle = bdb.DB()
    handle.open(path, dbtype=bdb.DB_HASH, flags=bdb.DB_RDONLY)
    try:
        return dict(handle.items())
    finally:
        handle.close()


def makemap(path_without_db: str, text: str, *flags: str) -> None:
    subprocess.run(["makemap", *flags, "hash", path_without_db], input=text.encode(), check=True, timeout=60)


def test_makemap_style_on_disk(tmp_path):
    path = str(tmp_path / "r.db")
    BDBRelayStore(path).add({"192.0.2.1": 906502527, "2001:DB8::1": 5})
    assert raw_items(path) == {b"192.0.2.1": b"906502527", b"2001:db8::1": b"5"}
    out = subprocess.run(["file", path], capture_output=True, text=True).stdout
    assert "Berkeley DB (Hash" in out


def test_reads_makemap_built_map(tmp_path):
    makemap(str(tmp_path / "m"), "# comment\n\n10.11.12.13 906502527\n192.0.2.5\t100\n")
    store = BDBRelayStore(str(tmp_path / "m.db"))
    assert store.lookup("10.11.12.13") == 906502527
    assert store.lookup("::ffff:192.0.2.5") == 100
    assert store.lookup("192.0.2.6") is None
    assert store.entries() == [("10.11.12.13", 906502527), ("192.0.2.5", 100)]


def test_nul_style_map_is_read_and_written_in_its_own_style(tmp_path):
    # makemap -N writes postmap-style keys with a trailing NUL.
    makemap(str(tmp_path / "n"), "192.0.2.1 77\n", "-N")
    path = str(tmp_path / "n.db")
    assert raw_items(path) == {b"192.0.2.1\0": b"77\0"}
    store = BDBRelayStore(path)
    assert store.lookup("192.0.2.1") == 77
    store.add({"192.0.2.2": 88})
    assert raw_items(path) == {b"192.0.2.1\0": b"77\0", b"192.0.2.2\0": b"88\0"}
    assert store.delete(["192.0.2.1"]) == []
    assert store.expire(100) == 1
    assert raw_items(path) == {}


def test_parse_ticks_like_atol():
    assert parse_ticks(b"906502527") == 906502527
    assert parse_ticks(b" 12abc") == 12
    assert parse_ticks(b"OK") == 0
    assert parse_ticks(b"") == 0


def test_missing_file_is_empty_map(tmp_path):
    store = BDBRelayStore(str(tmp_path / "none.db"))
    assert store.lookup("192.0.2.1") is None
    assert store.entries() == []
    assert store.expire(10**10) == 0
    assert store.delete(["192.0.2.1"]) == ["192.0.2.1"]
    assert not (tmp_path / "none.db").exists()


def test_zero_length_file_is_unavailable_until_written(tmp_path):
    """0 bytes is not an empty map (that would turn POP users' 451 into a 550); a writer may start it afresh."""
    path = tmp_path / "z.db"
    path.write_bytes(b"")
    store = BDBRelayStore(str(path))
    with pytest.raises(StoreUnavailable, match=r"z.db: is empty \(0 bytes\): not a hash database"):
        store.lookup("192.0.2.1")
    store.add({"192.0.2.1": 3})
    assert store.lookup("192.0.2.1") == 3


@pytest.mark.parametrize("content", [b"garbage" * 100, b"\0" * 4096])
def test_corrupt_file_raises_store_unavailable(tmp_path, content):
    path = tmp_path / "c.db"
    path.write_bytes(content)
    store = BDBRelayStore(str(path))
    with pytest.raises(StoreUnavailable, match="c.db: is not a hash database"):
        store.lookup("192.0.2.1")
    with pytest.raises(StoreUnavailable):
        store.add({"192.0.2.1": 1})
    with pytest.raises(StoreUnavailable):
        store.entries()
    assert path.read_bytes() == content


def test_reader_recovers_when_file_repaired(tmp_path):
    path = tmp_path / "r.db"
    store = BDBRelayStore(str(path))
    store.add({"192.0.2.1": 1})
    assert store.lookup("192.0.2.1") == 1
    saved = path.read_bytes()
    path.write_bytes(b"junk" * 2000)          # replaced in place by garbage
    with pytest.raises(StoreUnavailable):
        store.lookup("192.0.2.1")
    path.write_bytes(saved)
    assert store.lookup("192.0.2.1") == 1


def test_path_that_cannot_be_opened_raises_store_unavailable(tmp_path):
    # Root reads any mode, so "cannot open" is made with a file where a directory should be.
    (tmp_path / "etc").write_text("a file, not a directory")
    store = BDBRelayStore(str(tmp_path / "etc" / "relayers.db"))
    with pytest.raises(StoreUnavailable, match="relayers.db: cannot stat: Not a directory"):
        store.lookup("192.0.2.1")
    with pytest.raises(StoreUnavailable, match="Not a directory"):
        store.entries()


def test_long_lived_reader_sees_every_write_at_once(tmp_path):
    """No stale reads: a write completed before a lookup starts is always visible to it."""
    path = str(tmp_path / "r.db")
    writer = BDBRelayStore(path)
    reader = BDBRelayStore(path)
    writer.add({"192.0.2.1": 0})
    for i in range(1, 400):
        writer.add({"192.0.2.1": i})
        assert reader.lookup("192.0.2.1") == i
        if i % 50 == 0:
            assert writer.delete(["192.0.2.1"]) == []
            assert reader.lookup("192.0.2.1") is None


def test_reader_follows_a_file_replaced_by_rename(tmp_path):
    path = tmp_path / "r.db"
    reader = BDBRelayStore(str(path))
    BDBRelayStore(str(path)).add({"192.0.2.1": 1})
    assert reader.lookup("192.0.2.1") == 1
    BDBRelayStore(str(tmp_path / "new.db")).add({"192.0.2.2": 2})
    os.rename(tmp_path / "new.db", path)
    assert reader.lookup("192.0.2.1") is None
    assert reader.lookup("192.0.2.2") == 2


def test_reader_waits_for_writer_lock_then_sees_its_data(tmp_path):
    path = str(tmp_path / "r.db")
    store = BDBRelayStore(path)
    store.add({"192.0.2.1": 1})
    assert store.lookup("192.0.2.1") == 1
    fd = os.open(path, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)        # an admin's makemap holds the map
    results = []
    t = threading.Thread(target=lambda: results.append(store.lookup("192.0.2.9")))
    t.start()
    t.join(0.3)
    assert t.is_alive() and results == []  # the reader waits for the exclusive lock
    handle = bdb.DB()
    handle.open(path, dbtype=bdb.DB_HASH)
    handle.put(b"192.0.2.9", b"9")
    handle.close()
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    t.join(10)
    assert results == [9]


def test_lock_wait_is_bounded(tmp_path, monkeypatch):
    path = str(tmp_path / "r.db")
    BDBRelayStore(path).add({"192.0.2.1": 1})
    monkeypatch.setattr(storebdb, "LOCK_WAIT", 0.2)
    fd = os.open(path, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        start = time.monotonic()
        with pytest.raises(StoreUnavailable, match="lock not obtained"):
            storebdb.flock_wait(os.open(path, os.O_RDONLY), fcntl.LOCK_SH, path, wait=0.2)
        assert time.monotonic() - start < 5
    finally:
        os.close(fd)


def test_threads_share_one_reader_safely(tmp_path):
    """libmilter calls in from a worker pool: one store, many threads, no crash, right answers."""
    path = str(tmp_path / "r.db")
    writer = BDBRelayStore(path)
    writer.add({"192.0.2.%d" % i: i for i in range(1, 200)})
    reader = BDBRelayStore(path)
    errors: list[BaseException] = []
    stop = threading.Event()

    def hammer(n: int) -> None:
        try:
            while not stop.is_set():
                for i in range(1, 200):
                    assert reader.lookup("192.0.2.%d" % i) == i
                assert reader.lookup("198.51.100.%d" % n) is None
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for k in range(100):
        writer.add({"203.0.113.%d" % (k % 250): k})   # keep the file changing underneath
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, errors[:1]


def test_open_relay_store_picks_backend(tmp_path):
    assert isinstance(open_relay_store(str(tmp_path / "x.db")), BDBRelayStore)


def _add_worker(path: str, start: int, count: int) -> None:
    store = BDBRelayStore(path)
    for i in range(start, start + count):
        store.add({"10.%d.%d.%d" % (i >> 16, (i >> 8) & 255, i & 255): 1})


def test_concurrent_writers_lose_nothing(tmp_path):
    path = str(tmp_path / "r.db")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_add_worker, args=(path, n * 1000, 150)) for n in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert len(BDBRelayStore(path).entries()) == 8 * 150


@pytest.mark.parametrize("old,young", [(900, 100), (100, 900)])
def test_expire_truncating_or_deleting_keeps_the_young(tmp_path, old, young):
    """Both expire strategies (truncate + rewrite when most go, delete otherwise) keep exactly the young."""
    path = str(tmp_path / "r.db")
    store = BDBRelayStore(path)
    store.add({"10.0.%d.%d" % (i >> 8, i & 255): 5 for i in range(old)})
    store.add({"10.1.%d.%d" % (i >> 8, i & 255): 50 for i in range(young)})
    inode = os.stat(path).st_ino
    reader = BDBRelayStore(path)
    assert reader.lookup("10.0.0.1") == 5
    assert store.expire(10) == old
    assert os.stat(path).st_ino == inode        # in place: sendmail's and readers' inode stays
    assert dict(store.entries()) == {"10.1.%d.%d" % (i >> 8, i & 255): 50 for i in range(young)}
    assert reader.lookup("10.0.0.1") is None and reader.lookup("10.1.0.1") == 50
    assert subprocess.run(["db5.3_verify", path], capture_output=True, timeout=60).returncode == 0


def test_answers_are_cached_per_spelling_and_file_version(tmp_path, monkeypatch):
    path = tmp_path / "r.db"
    writer = BDBRelayStore(str(path))
    writer.add({"10.0.0.1": 5})
    past = time.time_ns() - 10 * 10**9
    os.utime(path, ns=(past, past))          # a settled file: its answers may be cached
    reader = BDBRelayStore(str(path))
    reads = []
    real = mapreader.get_both_styles
    monkeypatch.setattr(mapreader, "get_both_styles", lambda handle, key: reads.append(key) or real(handle, key))
    spellings = ("10.0.0.1", "::ffff:10.0.0.1", "::FFFF:10.0.0.1", "10.0.0.2")
    assert [reader.lookup(s) for s in spellings] == [5, 5, 5, None]
    assert reads == [b"10.0.0.1"] * 3 + [b"10.0.0.2"]
    assert [reader.lookup(s) for s in spellings] == [5, 5, 5, None]
    assert len(reads) == 4                   # the same questions again: answered from cache
    writer.add({"10.0.0.1": 6, "10.0.0.2": 7})
    assert [reader.lookup(s) for s in spellings] == [6, 6, 6, 7]      # a new file version: asked again
    with pytest.raises(ValueError):
        reader.lookup("not-an-address")


def test_a_reader_never_sees_the_map_half_made(tmp_path):
    """The first write puts a whole hash database in place: a lookup in that instant finds no 0-byte file."""
    path = str(tmp_path / "relayers.db")
    seen: list[str] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                os.stat(path)       # spin until the file is there, then look
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                if os.fstat(fd).st_size == 0:
                    seen.append("0 bytes")
                    continue
            finally:
                os.close(fd)
            store = BDBRelayStore(path)
            try:
                store.lookup("192.0.2.1")
            except StoreUnavailable as exc:
                seen.append(str(exc))
            finally:
                store.close()       # its reader's descriptor: thousands of lookups must not leak thousands

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    try:
        for i in range(300):
            writer = BDBRelayStore(path)
            writer.add({"192.0.2.1": 1000 + i})
            writer.close()
            os.unlink(path)
    finally:
        stop.set()
        th.join(10)
    assert seen == []
