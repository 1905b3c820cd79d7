"""relaymilter-popwatch's side of the limits: each login's user beside the map, on a file and on Redis.

A real watcher (popwatch.service.Watcher in a thread) follows a real log
file; Dovecot-style login lines for two users from three addresses go in.
The users map (relayers-users.db, or the Redis guard keys) names each
address's user while relayers.db keeps its classic address -> epoch values;
when an address expires, its user goes too. With addresses_per_hour: 1 and
suspend_minutes, bob's second address suspends him at that login: his first
address leaves the map and the second is never written.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from relaymilter.policy.limits import Limits
from relaymilter.popwatch.patterns import load_patterns
from relaymilter.popwatch.service import Settings, Watcher
from relaymilter.store.bdb import read_items
from relaymilter.store.guard import open_guard_store
from relaymilter.store.relayers import open_relay_store

from redisproc import RedisServer

pytestmark = pytest.mark.integration


def line(ip: str, user: str) -> bytes:
    stamp = time.strftime("%b %d %H:%M:%S", time.localtime()).encode()
    return b"%s mail dovecot: pop3-login: Login: user=<%s>, method=PLAIN, rip=%s, lip=192.0.2.1\n" % (
        stamp, user.encode(), ip.encode())


def wait_for(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture(params=["file", "redis"])
def location(request, tmp_path: Path) -> Iterator[str]:
    if request.param == "file":
        yield str(tmp_path / "relayers.db")
        return
    srv = RedisServer(tmp_path / "redis").start()
    try:
        yield srv.url()
    finally:
        srv.stop()


def watch(tmp_path: Path, location: str, grace: int, limits: Limits | None = None) -> tuple[Watcher, threading.Thread]:
    settings = Settings(logfiles=(str(tmp_path / "mail.log"),), dbfile=location, grace=grace, max_session=60,
                        skip_networks=(), readback=False, write=True, pattern_file="", patterns=("dovecot",),
                        limits=limits)
    patterns = load_patterns(None, ["dovecot"])
    (tmp_path / "mail.log").write_bytes(b"")
    w = Watcher(lambda: (settings, patterns))
    th = threading.Thread(target=w.run, kwargs={"install_signals": False}, daemon=True)
    th.start()
    wait_for(lambda: w.started.is_set())
    return w, th


def test_users_recorded_beside_the_map_and_forgotten_at_expiry(tmp_path: Path, location: str) -> None:
    w, th = watch(tmp_path, location, grace=2)
    relayers, guard = open_relay_store(location), open_guard_store(location)
    try:
        with open(tmp_path / "mail.log", "ab") as fh:
            fh.write(line("192.0.2.1", "alice") + line("192.0.2.2", "bob") + line("2001:db8::7", "alice"))
        wait_for(lambda: relayers.lookup("2001:db8::7") is not None)
        assert [guard.user_of(a) for a in ("192.0.2.1", "192.0.2.2", "2001:db8::7")] == ["alice", "bob", "alice"]
        if not location.startswith("redis"):
            # relayers.db keeps its classic format: address -> ASCII epoch, nothing else.
            assert all(v.isdigit() for _, v in read_items(location))
        wait_for(lambda: relayers.lookup("192.0.2.1") is None, timeout=8)
        wait_for(lambda: guard.user_of("192.0.2.1") is None and guard.user_of("2001:db8::7") is None, timeout=5)
    finally:
        w.stop()
        th.join(10)
        relayers.close()
        guard.close()


def test_a_second_address_within_the_hour_suspends_at_the_login(tmp_path: Path, location: str) -> None:
    w, th = watch(tmp_path, location, grace=600, limits=Limits(addresses_per_hour=1, suspend_minutes=10))
    relayers, guard = open_relay_store(location), open_guard_store(location)
    try:
        with open(tmp_path / "mail.log", "ab") as fh:
            fh.write(line("192.0.2.11", "bob") + line("192.0.2.21", "carol"))
        wait_for(lambda: relayers.lookup("192.0.2.21") is not None)
        assert relayers.lookup("192.0.2.11") is not None
        with open(tmp_path / "mail.log", "ab") as fh:
            fh.write(line("192.0.2.12", "bob") + line("192.0.2.22", "dave"))
        wait_for(lambda: relayers.lookup("192.0.2.22") is not None)
        assert relayers.lookup("192.0.2.11") is None and relayers.lookup("192.0.2.12") is None
        held = guard.suspension("bob", time.time())
        assert held is not None and held.reason == "addresses_per_hour"
        assert relayers.lookup("192.0.2.21") is not None      # carol is not bob
    finally:
        w.stop()
        th.join(10)
        relayers.close()
        guard.close()
