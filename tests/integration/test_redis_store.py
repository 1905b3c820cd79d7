"""RedisRelayStore against a real redis-server on loopback: the RelayStore contract on Redis.

Keys and values as documented (prefix + canonical address -> ASCII ticks),
TTLs from the watcher's grace, SCAN (never KEYS) with MGET in batches, the
atomic conditional delete, prefixes that keep maps apart, and failing closed:
a dead or hung server raises StoreUnavailable within the timeout, and the
same store object works again once the server is back.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from relaymilter.errors import StoreUnavailable
from relaymilter.store.redis import BATCH, RedisRelayStore
from relaymilter.store.relayers import open_relay_store

from redisproc import RedisServer, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def store(server: RedisServer) -> Iterator[RedisRelayStore]:
    s = open_relay_store(server.url())
    assert isinstance(s, RedisRelayStore)
    try:
        yield s
    finally:
        s.close()


def raw(server: RedisServer, db: int = 0) -> dict[bytes, bytes]:
    with server.client(db=db) as c:
        return {k: c.get(k) for k in c.scan_iter()}


def test_keys_values_and_lookup_spellings(server, store):
    store.add({"192.0.2.1": 906502527, "2001:DB8:0::1": 5, "::ffff:198.51.100.9": 7})
    assert raw(server) == {b"relaymilter:relay:192.0.2.1": b"906502527",
                           b"relaymilter:relay:2001:db8::1": b"5",
                           b"relaymilter:relay:198.51.100.9": b"7"}
    assert store.lookup("192.0.2.1") == 906502527
    assert store.lookup("[IPv6:2001:db8::1]") == 5
    assert store.lookup("::ffff:198.51.100.9") == 7
    assert store.lookup("192.0.2.2") is None
    with pytest.raises(ValueError):
        store.lookup("not-an-ip")
    with pytest.raises(ValueError):
        store.add({"192.0.2.3": 1, "bogus": 2})
    assert store.lookup("192.0.2.3") is None     # nothing of a refused batch was written


def test_values_written_by_others_read_like_the_classic_tool(server, store):
    with server.client() as c:
        c.set("relaymilter:relay:192.0.2.8", b"906502527 # by hand")
        c.set("relaymilter:relay:192.0.2.9", b"junk")
    assert store.lookup("192.0.2.8") == 906502527
    assert store.lookup("192.0.2.9") == 0
    assert store.expire(0) == 1
    assert store.entries() == [("192.0.2.8", 906502527)]


def test_ttl_from_grace_and_future_timestamps(server, store):
    now = int(time.time())
    store.add({"192.0.2.1": now, "192.0.2.2": now + 1000, "192.0.2.3": now - 5000}, ttl=600)
    store.add({"192.0.2.4": now})
    with server.client() as c:
        ttl = {ip: c.ttl("relaymilter:relay:" + ip) for ip in ("192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4")}
    assert 595 <= ttl["192.0.2.1"] <= 600
    assert 1595 <= ttl["192.0.2.2"] <= 1600        # the future timestamp plus the grace
    assert 595 <= ttl["192.0.2.3"] <= 600          # never shorter than the grace from now
    assert ttl["192.0.2.4"] == -1                  # vsmtprelay add: stays until expired by command
    # A permanent add over a TTL'd key makes it permanent, as re-adding to the file would.
    store.add({"192.0.2.1": now})
    with server.client() as c:
        assert c.ttl("relaymilter:relay:192.0.2.1") == -1
    with pytest.raises(ValueError):
        store.add({"192.0.2.5": now}, ttl=0)


def test_a_large_add_with_ttl_spans_batches(server, store):
    now = int(time.time())
    entries = {"10.9.%d.%d" % (i >> 8, i & 255): now for i in range(BATCH * 2 + 7)}
    store.add(entries, ttl=300)
    assert dict(store.entries()) == entries
    with server.client() as c:
        for ip in ("10.9.0.0", "10.9.3.232", "10.9.7.214"):        # first, middle, last batch
            assert 290 <= c.ttl("relaymilter:relay:" + ip) <= 300, ip


def test_key_is_gone_after_its_ttl(server, store):
    store.add({"192.0.2.1": int(time.time())}, ttl=1)
    assert store.lookup("192.0.2.1") is not None
    waited = wait_for(lambda: store.lookup("192.0.2.1") is None, 5, "Redis to expire the key")
    assert waited <= 3
    assert store.entries() == []


def test_entries_ordered_by_address_across_many_batches(server, store):
    n = 2 * BATCH + 345
    entries = {"10.%d.%d.%d" % (i >> 16, (i >> 8) & 255, i & 255): 1000 + i for i in range(n)}
    entries["2001:db8::2"] = 3
    entries["2001:db8::10"] = 4
    store.add(entries)
    got = store.entries()
    assert len(got) == n + 2
    assert got[:3] == [("10.0.0.0", 1000), ("10.0.0.1", 1001), ("10.0.0.2", 1002)]
    assert got[-3:] == [("10.0.9.40", 1000 + n - 1), ("2001:db8::2", 3), ("2001:db8::10", 4)]
    assert dict(got) == entries
    # entries() and expire() walk with SCAN and MGET: KEYS is never sent.
    assert store.expire(1000 + BATCH - 1) == BATCH + 2       # and the two IPv6 entries (ticks 3, 4)
    assert len(store.entries()) == n - BATCH
    with server.client() as c:
        stats = c.info("commandstats")
    assert "cmdstat_keys" not in stats
    assert stats["cmdstat_scan"]["calls"] >= 4 and stats["cmdstat_mget"]["calls"] >= 4


def test_expire_counts_and_spares_what_changed(server, store):
    now = 1_700_000_000
    store.add({"192.0.2.1": now - 100, "192.0.2.2": now - 50, "192.0.2.3": now, "192.0.2.4": now + 10})
    assert store.expire(now - 60) == 1
    assert [ip for ip, _ in store.entries()] == ["192.0.2.2", "192.0.2.3", "192.0.2.4"]
    assert store.expire(now) == 2
    assert store.entries() == [("192.0.2.4", now + 10)]
    assert store.expire(now) == 0


def test_delete_reports_missing_and_delete_if_unchanged_is_conditional(server, store):
    store.add({"192.0.2.1": 10, "192.0.2.2": 20, "2001:db8::1": 30})
    assert store.delete(["192.0.2.1", "192.0.2.99", "::FFFF:192.0.2.2"]) == ["192.0.2.99"]
    assert store.entries() == [("2001:db8::1", 30)]
    store.add({"192.0.2.5": 50, "192.0.2.6": 60})
    # Another host re-wrote 192.0.2.6 since: only the unchanged entry goes.
    store.add({"192.0.2.6": 61})
    assert sorted(store.delete_if_unchanged({"192.0.2.5": 50, "192.0.2.6": 60, "192.0.2.7": 70})) == ["192.0.2.5"]
    assert store.lookup("192.0.2.6") == 61
    assert store.delete_if_unchanged({}) == [] and store.delete([]) == []


def test_delete_if_unchanged_races_a_writer(server, store):
    """Expiry and re-login collide: whichever wins, a re-written entry never disappears."""
    other = open_relay_store(server.url())
    try:
        for round_ in range(200):
            store.add({"192.0.2.1": round_})
            t = threading.Thread(target=other.add, args=({"192.0.2.1": 10_000 + round_},))
            t.start()
            removed = store.delete_if_unchanged({"192.0.2.1": round_})
            t.join(10)
            assert store.lookup("192.0.2.1") == 10_000 + round_ or removed == [], round_
    finally:
        other.close()


def test_prefixes_and_databases_keep_maps_apart(server):
    a = open_relay_store(server.url(query="prefix=farm-a:"))
    b = open_relay_store(server.url(query="prefix=farm-b:"))
    c = open_relay_store(server.url(db=3))
    star = open_relay_store(server.url(query="prefix=odd*[x]:"))
    try:
        a.add({"192.0.2.1": 1})
        b.add({"192.0.2.2": 2})
        c.add({"192.0.2.3": 3})
        star.add({"192.0.2.4": 4})
        with server.client() as cl:
            cl.set("odd-other:192.0.2.9", b"9")       # would match an unescaped odd*[x]: pattern
        assert a.entries() == [("192.0.2.1", 1)]
        assert b.entries() == [("192.0.2.2", 2)]
        assert c.entries() == [("192.0.2.3", 3)]
        assert star.entries() == [("192.0.2.4", 4)]
        assert a.expire(10) == 1 and b.entries() == [("192.0.2.2", 2)]
        assert set(raw(server, 3)) == {b"relaymilter:relay:192.0.2.3"}
    finally:
        for s in (a, b, c, star):
            s.close()


def test_password_and_masked_errors(tmp_path):
    srv = RedisServer(tmp_path, extra=["--requirepass", "s3cret"]).start()
    try:
        good = open_relay_store("redis://:s3cret@127.0.0.1:%d/0" % srv.port)
        bad = open_relay_store("redis://:wrong@127.0.0.1:%d/0" % srv.port)
        try:
            good.add({"192.0.2.1": 1})
            assert good.lookup("192.0.2.1") == 1
            with pytest.raises(StoreUnavailable) as info:
                bad.lookup("192.0.2.1")
            assert "s3cret" not in str(info.value) and "wrong" not in str(info.value)
            assert "redis://:***@127.0.0.1:%d/0" % srv.port in str(info.value)
        finally:
            good.close()
            bad.close()
    finally:
        srv.stop()


def test_unix_socket_url(tmp_path):
    sock = tmp_path / "r.sock"
    srv = RedisServer(tmp_path, extra=["--unixsocket", str(sock), "--unixsocketperm", "700"]).start()
    try:
        s = open_relay_store("unix://%s?db=2" % sock)
        try:
            s.add({"192.0.2.1": 42})
            assert s.lookup("192.0.2.1") == 42
        finally:
            s.close()
        assert set(raw(srv, 2)) == {b"relaymilter:relay:192.0.2.1"}
    finally:
        srv.stop()


def timed_failure(call) -> float:
    start = time.monotonic()
    with pytest.raises(StoreUnavailable):
        call()
    return time.monotonic() - start


def test_dead_server_fails_fast_then_the_same_store_recovers(tmp_path):
    srv = RedisServer(tmp_path).start()
    store = open_relay_store(srv.url())
    try:
        store.add({"192.0.2.1": 1})
        assert store.lookup("192.0.2.1") == 1       # a pooled connection now exists
        port = srv.port
        srv.kill()
        for call in (lambda: store.lookup("192.0.2.1"), lambda: store.add({"192.0.2.2": 2}),
                     lambda: store.delete(["192.0.2.1"]), lambda: store.delete_if_unchanged({"192.0.2.1": 1}),
                     lambda: store.expire(10), store.entries):
            assert timed_failure(call) < 1.0
        srv2 = RedisServer(tmp_path / "again", port=port).start()
        try:
            # Nothing persisted (--save ''): the new server is empty, and the old store object just works.
            assert store.lookup("192.0.2.1") is None
            store.add({"192.0.2.3": 3})
            assert store.entries() == [("192.0.2.3", 3)]
        finally:
            srv2.stop()
    finally:
        store.close()
        srv.stop()


def test_hung_server_times_out_within_the_socket_timeout(server):
    store = open_relay_store(server.url(query="socket_timeout=0.2"))
    try:
        store.add({"192.0.2.1": 1})
        os.kill(server.pid, signal.SIGSTOP)
        try:
            took = timed_failure(lambda: store.lookup("192.0.2.1"))
            assert took < 0.2 * 2 + 0.3, took
        finally:
            os.kill(server.pid, signal.SIGCONT)
        assert store.lookup("192.0.2.1") == 1
    finally:
        store.close()


def test_many_threads_share_one_store(server, store):
    store.add({"192.0.2.%d" % i: i for i in range(1, 51)})
    errors: list[BaseException] = []

    def worker(offset: int) -> None:
        try:
            for i in range(200):
                ip = "192.0.2.%d" % ((i + offset) % 50 + 1)
                assert store.lookup(ip) == (i + offset) % 50 + 1
        except BaseException as exc:  # noqa: BLE001 - collected and re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors[0]


def test_store_survives_fork_like_the_milter(server, store):
    """relaymilter's supervisor forks; a pool made before a fork must not be shared after it."""
    store.add({"192.0.2.1": 7})
    assert store.lookup("192.0.2.1") == 7
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:        # child: use the inherited store, report, leave without cleanup handlers
        try:
            ok = store.lookup("192.0.2.1") == 7
        except BaseException:  # noqa: BLE001 - the child must always reach os._exit
            ok = False
        os.write(w, b"1" if ok else b"0")
        os._exit(0)
    os.close(w)
    try:
        assert os.read(r, 1) == b"1"
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    assert store.lookup("192.0.2.1") == 7
