"""SpammersMap, the milter's reader: change detection, missing and corrupt files, threads."""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest
from milterpath import mail
from berkeleydb import db

from relaymilter import replies
from relaymilter.errors import StoreUnavailable
from relaymilter.policy.decision import Reject, TempFail
from relaymilter.store.bdb import write_map
from relaymilter.store.bdbbase import RACY_NS
from relaymilter.store.spammers import SpammersMap, write_db

LOGGER = "relaymilter.store.spammers"


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "spammers.db")


@pytest.fixture
def smap(path):
    m = SpammersMap(path)
    yield m
    m.close()


def errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.ERROR]


def infos(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and text in r.getMessage()]


def keep_looking(smap: SpammersMap, key: str, expect: bool, seconds: float = 3 * RACY_NS / 1e9) -> int:
    """Look *key* up repeatedly for a while (past the racy window); every answer must be *expect*."""
    n = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline or n < 20:
        assert smap.contains(key) is expect
        n += 1
    return n


def many(n: int, tag: str = "") -> list[str]:
    return ["user%d@host%d.%sexample" % (i, i % 97, tag) for i in range(n)]


def test_missing_file_is_an_empty_list_logged_once(smap, path, caplog):
    caplog.set_level(logging.INFO, LOGGER)
    keep_looking(smap, "spam.example", False)
    assert len(smap) == 0
    assert len(infos(caplog, "does not exist")) == 1
    assert errors(caplog) == []
    write_db(path, ["spam.example"])
    assert smap.contains("spam.example")
    os.unlink(path)
    assert not smap.contains("spam.example")       # deleted again: empty, not the last list
    assert len(infos(caplog, "does not exist")) == 2


def test_zero_length_file_is_unavailable_not_an_empty_list(smap, path, caplog):
    open(path, "wb").close()
    with pytest.raises(StoreUnavailable, match=r"is empty \(0 bytes\): not a hash database"):
        smap.contains("spam.example")
    assert len(errors(caplog)) == 1


# contains() is the general entry; members() has the milter's inlined fast path: both must see every change.
ASK = {"contains": lambda smap, key: smap.contains(key), "members": lambda smap, key: key in smap.members()}


@pytest.mark.parametrize("via", sorted(ASK))
def test_rebuild_is_seen_by_the_very_next_lookup(smap, path, via):
    ask = ASK[via]
    write_db(path, ["one.example"])
    assert ask(smap, "one.example")
    for i in range(2, 12):
        write_db(path, ["n%d.example" % i])
        assert ask(smap, "n%d.example" % i)
        assert not ask(smap, "n%d.example" % (i - 1))


@pytest.mark.parametrize("via", sorted(ASK))
def test_in_place_rewrite_of_the_same_size_is_seen(smap, path, via):
    ask = ASK[via]
    # makemap and bdb.write_map rewrite the same inode; here even the size stays
    # the same, so only the mtime (and the racy-file rule) can tell.
    write_db(path, ["aaaa.example", "keep.example"])
    # Let the file age past the racy window so the reader trusts its copy and
    # must notice the rewrite from the stat alone (not a synchronisation wait).
    time.sleep(2 * RACY_NS / 1e9)
    assert ask(smap, "aaaa.example")
    inode, size = os.stat(path).st_ino, os.stat(path).st_size
    with write_map(path, create=False) as txn:
        txn.delete(b"aaaa.example")
        txn.put(b"bbbb.example", b"REJECT")
    assert (os.stat(path).st_ino, os.stat(path).st_size) == (inode, size)
    assert ask(smap, "bbbb.example")
    assert not ask(smap, "aaaa.example")
    assert ask(smap, "keep.example")


@pytest.mark.parametrize("via", sorted(ASK))
def test_a_changed_mode_alone_rereads_the_list(smap, path, via):
    # Only the ctime changes: the file may have become unreadable, so it is read again.
    ask = ASK[via]
    write_db(path, ["one.example"])
    time.sleep(2 * RACY_NS / 1e9)
    assert ask(smap, "one.example")
    before = smap._good
    os.chmod(path, 0o640)
    assert ask(smap, "one.example")
    assert smap._good is not before


def test_postmap_style_nul_keys_are_found(smap, path):
    h = db.DB()
    h.open(path, dbtype=db.DB_HASH, flags=db.DB_CREATE)
    h.put(b"spam.example\0", b"REJECT\0")
    h.close()
    assert smap.contains("spam.example")
    assert not smap.contains("other.example")


def _garbage_renamed(path: str) -> None:
    tmp = path + ".new"
    with open(tmp, "wb") as fh:
        fh.write(os.urandom(3 * 4096))
    os.rename(tmp, path)


def _text_in_place(path: str) -> None:
    with open(path, "wb") as fh:            # the same inode, as `... > spammers.db` would
        fh.write(b"spam.example REJECT\n")


def _truncated(path: str) -> None:
    os.truncate(path, os.path.getsize(path) - 100)


def _damaged_page(path: str) -> None:
    # The file still opens and most single-key probes still answer: only
    # reading every page shows that the list is not the whole list.
    with open(path, "r+b") as fh:
        fh.seek(os.path.getsize(path) // 2 // 4096 * 4096)
        fh.write(b"\xff" * 8192)


@pytest.mark.parametrize("corrupt", [_garbage_renamed, _text_in_place, _truncated, _damaged_page])
def test_corrupt_file_keeps_the_last_good_list(smap, path, caplog, corrupt):
    caplog.set_level(logging.INFO, LOGGER)
    good = many(5000)
    write_db(path, good + ["spam.example"])
    assert smap.contains("spam.example")
    corrupt(path)
    # Many lookups, across the racy window: the last good list answers, one error.
    keep_looking(smap, "spam.example", True)
    assert smap.contains(good[-1])
    assert not smap.contains("other.example")
    assert mail("<x@spam.example>", listed=smap.members) == Reject(replies.ACCESS_DENIED, "spammers")
    errs = errors(caplog)
    assert len(errs) == 1, errs
    assert path in errs[0] and "keeping the last good spammers list (5001 entries)" in errs[0]
    # Fixed: the new list is read, and said so.
    write_db(path, ["new.example"])
    assert smap.contains("new.example")
    assert not smap.contains("spam.example")
    assert len(infos(caplog, "readable again")) == 1
    assert len(errors(caplog)) == 1


def test_each_change_to_a_corrupt_file_is_logged_once(smap, path, caplog):
    write_db(path, ["spam.example"])
    assert smap.contains("spam.example")
    _garbage_renamed(path)
    keep_looking(smap, "spam.example", True)
    _text_in_place(path)
    keep_looking(smap, "spam.example", True)
    assert len(errors(caplog)) == 2


def test_corrupt_with_no_good_list_yet_raises_and_tempfails(smap, path, caplog):
    _text_in_place(path)
    for _ in range(5):
        with pytest.raises(StoreUnavailable) as info:
            smap.contains("spam.example")
        assert str(info.value).startswith(path + ": is truncated (20 bytes): not a hash database")
    assert mail("<x@spam.example>", listed=smap.members) == TempFail(
        replies.SENDER_CHECK_UNAVAILABLE, "spammers_unavailable")
    assert mail("<>", listed=smap.members).rule == "null_sender"
    errs = errors(caplog)
    assert len(errs) == 1 and "sender checks will tempfail" in errs[0]
    write_db(path, ["spam.example"])
    assert smap.contains("spam.example")


def test_threads_never_miss_during_rebuilds(path):
    probes = ["probe%d.example" % i for i in range(50)]
    lists = [probes + many(2000, "a."), probes + many(2500, "b.")]
    write_db(path, lists[0])
    smap = SpammersMap(path)
    stop = threading.Event()
    failures: list[str] = []
    sizes: set[int] = set()
    counts = [0] * 6

    def reader(slot: int) -> None:
        while not stop.is_set():
            for key in probes:
                try:
                    if not smap.contains(key):
                        failures.append("miss " + key)
                except StoreUnavailable as exc:
                    failures.append(str(exc))
            sizes.add(len(smap))
            counts[slot] += 1

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(len(counts))]
    for t in threads:
        t.start()
    try:
        for i in range(20):
            write_db(path, lists[i % 2])
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert failures == []
    assert sizes <= {2050, 2550} and sizes
    assert all(counts)
    assert len(smap) == 2550        # the last rebuild wrote lists[1]
    smap.close()
