"""Tracker and Watcher on a real relayers.db (Berkeley DB): batching, expiry on the
clock, entries written by others, logout tracking, read-back, bad input."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from relaymilter.domainsconfig import parse_network
from relaymilter.popwatch.matcher import Event
from relaymilter.popwatch.patterns import load_patterns
from relaymilter.popwatch.recorder import Tracker
from relaymilter.popwatch.service import Settings, Watcher
from relaymilter.store.relayers import BDBRelayStore, open_relay_store


def login(ip: str, ts: float | None = None, session: str | None = None, tracks: bool = False) -> Event:
    return Event("login", "dovecot", ip, ts, session, "alice", tracks)


def logout(session: str | None = None, ip: str | None = None, ts: float | None = None) -> Event:
    return Event("logout", "dovecot", ip, ts, session, None, True)


class CountingStore(BDBRelayStore):
    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.adds = 0

    def add(self, entries, ttl=None) -> None:  # noqa: ANN001 - RelayStore signature
        self.adds += 1
        super().add(entries, ttl)


@pytest.fixture
def store(tmp_path: Path) -> CountingStore:
    s = CountingStore(str(tmp_path / "relayers.db"))
    yield s
    s.close()


def test_a_burst_is_one_write_with_canonical_keys(store: CountingStore) -> None:
    t = Tracker(store, grace=60, skip_networks=[parse_network("10.0.0.0/8")])
    now = time.time()
    for ev in [login("192.0.2.1"), login("::ffff:192.0.2.2"), login("2001:DB8::0:1"), login("10.1.2.3"),
               login("999.1.1.1"), login("192.0.2.1")]:
        t.handle(ev, now)
    t.flush(now)
    assert store.adds == 1
    assert dict(store.entries()) == {"192.0.2.1": int(now), "192.0.2.2": int(now), "2001:db8::1": int(now)}
    assert t.stats["invalid_ip"] == 1 and t.stats["skipped_local"] == 1 and t.stats["logins"] == 4


def test_expiry_follows_the_clock_and_spares_changed_entries(store: CountingStore) -> None:
    t = Tracker(store, grace=10)
    now = 1_000_000.0
    for ip in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
        t.handle(login(ip), now)
    t.flush(now)
    store.add({"192.0.2.2": 2_000_000})         # vsmtprelay add ip <future ticks>
    store.add({"198.51.100.1": 999_000})        # an entry popwatch never wrote
    assert t.next_due() == now + 10
    assert t.expire(now + 9) == []
    assert t.expire(now + 10) == ["192.0.2.1", "192.0.2.3"]
    assert dict(store.entries()) == {"192.0.2.2": 2_000_000, "198.51.100.1": 999_000}
    assert t.stats["kept_changed"] == 1
    assert t.next_due() is None


def test_a_login_never_lowers_a_future_timestamp(store: CountingStore) -> None:
    store.add({"192.0.2.9": 2_000_000})
    t = Tracker(store, grace=10)
    t.handle(login("192.0.2.9"), 1_000_000.0)
    t.flush(1_000_000.0)
    assert store.lookup("192.0.2.9") == 2_000_000
    assert t.expire(1_000_100.0) == []
    assert store.lookup("192.0.2.9") == 2_000_000


def test_open_session_keeps_the_address_until_logout_plus_grace(store: CountingStore) -> None:
    t = Tracker(store, grace=10, max_session=1000)
    now = 1_000_000.0
    t.handle(login("192.0.2.5", session="S1", tracks=True), now)
    t.handle(login("192.0.2.5", session="S2", tracks=True), now + 1)
    t.flush(now + 1)
    assert t.expire(now + 500) == []                 # sessions open: kept well past grace
    t.handle(logout(session="S1"), now + 600)
    t.flush(now + 600)
    assert t.expire(now + 615) == []                 # S2 still open
    t.handle(logout(session="S2"), now + 700)
    t.flush(now + 700)
    assert store.lookup("192.0.2.5") == int(now + 700)   # the stored time is the last logout
    assert t.expire(now + 709) == []
    assert t.expire(now + 710) == ["192.0.2.5"]


def test_a_lost_logout_is_bounded_by_max_session(store: CountingStore) -> None:
    t = Tracker(store, grace=10, max_session=100)
    now = 1_000_000.0
    t.handle(login("192.0.2.6", session="S", tracks=True), now)
    t.flush(now)
    assert t.expire(now + 99) == []
    assert t.expire(now + 100) == ["192.0.2.6"]
    assert t.stats["abandoned_sessions"] == 1


def test_unmatched_logouts_add_nothing(store: CountingStore) -> None:
    t = Tracker(store, grace=10)
    t.handle(logout(session="nobody"), 1_000_000.0)
    t.handle(logout(ip="192.0.2.7"), 1_000_000.0)
    t.flush(1_000_000.0)
    assert store.entries() == [] and t.stats["unmatched_logouts"] == 2


def test_nowrite_never_touches_the_map(tmp_path: Path) -> None:
    t = Tracker(None, grace=10, write=False)
    t.handle(login("192.0.2.8"), 1_000_000.0)
    assert t.flush(1_000_000.0) == [("192.0.2.8", 1_000_000)]
    assert t.expire(1_000_010.0) == ["192.0.2.8"]
    assert not any(tmp_path.iterdir())


# -- the watcher: real files, real map, a thread instead of a process ---------------


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError("timed out")


def start_watcher(tmp_path: Path, grace: int, readback: bool = False) -> tuple[Watcher, threading.Thread, Path]:
    db = tmp_path / "relayers.db"
    settings = Settings(logfiles=(str(tmp_path / "mail.log"),), dbfile=str(db), grace=grace, max_session=60,
                        skip_networks=(), readback=readback, write=True, pattern_file="", patterns=("dovecot",))
    patterns = load_patterns(None, ["dovecot"])
    w = Watcher(lambda: (settings, patterns))
    th = threading.Thread(target=w.run, kwargs={"install_signals": False}, daemon=True)
    th.start()
    return w, th, db


def dovecot_line(ip: str, when: float, verb: str = "Login") -> bytes:
    stamp = time.strftime("%b %d %H:%M:%S", time.localtime(when)).encode()
    return b"%s mail dovecot: pop3-login: %s: user=<alice>, method=PLAIN, rip=%s, lip=192.0.2.1\n" % (
        stamp, verb.encode(), ip.encode())


def test_watcher_records_and_expires_with_a_quiet_log(tmp_path: Path) -> None:
    log = tmp_path / "mail.log"
    log.write_bytes(dovecot_line("192.0.2.50", time.time() - 5))     # before the start: not read
    # Lines carry whole seconds: with a grace of 1 s a login read late in its second would
    # already be past its grace when written (and rightly not written at all).
    w, th, db = start_watcher(tmp_path, grace=2)
    try:
        wait_for(lambda: w.follower.files[0].cur is not None)
        with open(log, "ab") as fh:
            fh.write(dovecot_line("192.0.2.51", time.time()) + b"\x00\xff garbage\n" +
                     dovecot_line("300.1.1.1", time.time()) + b"x" * 100_000 + b"\n")
        store = open_relay_store(str(db))
        wait_for(lambda: store.lookup("192.0.2.51") is not None, timeout=5)
        # No more log lines: the entry must still go, one grace period later.
        wait_for(lambda: store.lookup("192.0.2.51") is None, timeout=5)
        assert store.lookup("192.0.2.50") is None
        store.close()
    finally:
        w.stop()
        th.join(10)
    assert not th.is_alive()
    assert w.tracker.stats["invalid_ip"] == 1 and w.tracker.stats["expired"] == 1
    assert w.follower.overlong == 1


def test_readback_restores_recent_logins_after_a_restart(tmp_path: Path) -> None:
    now = time.time()
    log = tmp_path / "mail.log"
    with open(log, "wb") as fh:
        for i in range(3000):                          # an hour of history, one line a second-ish
            fh.write(dovecot_line("198.51.100.%d" % (i % 200 + 1), now - 3600 + i * 1.0))
        fh.write(dovecot_line("192.0.2.60", now - 30))   # inside the 60 s window
        fh.write(dovecot_line("192.0.2.61", now - 10))
    store = open_relay_store(str(tmp_path / "relayers.db"))
    store.add({"192.0.2.61": int(now - 10)})           # written by the previous run
    w, th, db = start_watcher(tmp_path, grace=60, readback=True)
    try:
        wait_for(lambda: store.lookup("192.0.2.60") is not None, timeout=5)
        assert store.lookup("192.0.2.60") == int(now - 30)     # the line's own time
        assert sorted(ip for ip, _ in store.entries()) == ["192.0.2.60", "192.0.2.61"]
        # Both are now popwatch's: they expire from the lines' times. (The watcher
        # notes what it wrote once its write has returned, which is after the map
        # shows it to readers: the write syncs to disk after unlocking.)
        wait_for(lambda: w.tracker.tracked == {"192.0.2.60": int(now - 30), "192.0.2.61": int(now - 10)},
                 timeout=5)
    finally:
        w.stop()
        th.join(10)
        store.close()


@pytest.mark.parametrize("level", [logging.WARNING, logging.INFO])
def test_a_block_of_events_counts_as_the_same_events_one_by_one(level: int, caplog: pytest.LogCaptureFixture) -> None:
    # handle_all() keeps its counts in locals and records a known address without a call:
    # state and counters must be those of the events handled one at a time.
    import random
    caplog.set_level(level, logger="relaymilter.popwatch")
    rnd = random.Random(3)
    now = time.time()
    ips = ["192.0.2.%d" % i for i in range(1, 9)] + ["::ffff:192.0.2.3", "not-an-ip", "127.0.0.1", "2001:DB8::1"]
    events = []
    for i in range(3000):
        ip = rnd.choice(ips)
        kind = rnd.random()
        if kind < 0.5:
            session = rnd.choice([None, "s%d" % rnd.randrange(40)])
            events.append(Event("login", rnd.choice(["dovecot", "courier"]), ip, now - rnd.randrange(600), session,
                                "u", rnd.random() < 0.7))
        elif kind < 0.8:
            events.append(logout(session="s%d" % rnd.randrange(60), ts=now - rnd.randrange(600)))
        else:
            events.append(Event("logout", rnd.choice(["dovecot", "courier"]), ip, now, None, None, True))
    skip = [parse_network("127.0.0.0/8")]
    one, block = Tracker(None, 60, skip_networks=skip, write=False), Tracker(None, 60, skip_networks=skip, write=False)
    for ev in events:
        one.handle(ev, now)
    for i in range(0, len(events), 500):
        block.handle_all(events[i:i + 500], now)
    assert block.stats == one.stats
    assert block.stats["logins"] and block.stats["logouts"] and block.stats["unmatched_logouts"]
    assert block.stats["invalid_ip"] and block.stats["skipped_local"]
    assert block._last == one._last and block._writes == one._writes and block._by_session == one._by_session
    assert {ip: len(s) for ip, s in block._open.items()} == {ip: len(s) for ip, s in one._open.items()}
    assert block.next_due() == one.next_due()
    said = sum(1 for r in caplog.records if r.getMessage().startswith("login from"))
    assert said == (2 * one.stats["logins"] if level == logging.INFO else 0)
