"""Relaying counters shared by several milter processes: exactly N counted, the limit exact.

One relaymilter with two worker processes, two relaymilter processes on one
host (the same relayers.db, so the same relayers-counters file), and two relaymilter
processes on one real redis-server (a farm's SMTP hosts). N sessions of one
identity are spread over both, 8 at a time from threads; afterwards the
counter holds exactly N x recipients, and with a limit below that exactly
the limit is admitted and the rest get 451 4.7.1. Redis killed mid-run: the
limits are not applied (logged, counted) while relay permission still fails
closed (451 4.3.0 for a relay attempt that needs the map).
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import pytest

from relaymilter.harness import MilterSession
from relaymilter.store.guard import HostGuardStore, open_guard_store
from relaymilter.store.relayers import open_relay_store

from milterproc import MilterProcess
from redisproc import RedisServer

pytestmark = pytest.mark.integration

CLIENT = "192.0.2.44"
SESSIONS = 60
PER_SESSION = 3
LIMIT_TEXT = "451 4.7.1 Relaying limit exceeded, try again later"


def session(m: MilterProcess, auth: Optional[str], n: int) -> list[str]:
    with MilterSession(m.socket, timeout=20) as s:
        s.connect(client_ip=CLIENT)
        s.helo("client.example")
        assert s.mail("<someone@example.net>", auth=auth).action == "continue"
        return [str(s.rcpt("<r%d-%d@remote.example>" % (n, i))) for i in range(PER_SESSION)]


def spread(milters: list[MilterProcess], auth: Optional[str]) -> list[str]:
    with ThreadPoolExecutor(8) as pool:
        answers = pool.map(lambda n: session(milters[n % len(milters)], auth, n), range(SESSIONS))
        return [a for per in answers for a in per]


def counted(store, identity: str, family: str, settled: Optional[int] = None) -> int:
    """The count; with *settled*, once it is that (a recipient counted ahead is refunded within moments
    of its connection's end, so a count may be high for that long - never low), or after 5 s."""
    deadline = time.monotonic() + 5
    while True:
        n = sum(u.count for u in store.usage(time.time()) if u.identity == identity and u.family == family)
        if settled is None or n == settled or time.monotonic() > deadline:
            return n
        time.sleep(0.02)


def start(tmp: Path, names: tuple[str, ...], settings: dict) -> list[MilterProcess]:
    milters = []
    for name in names:
        milters.append(MilterProcess(tmp / name, settings).start())
    return milters


def test_two_worker_processes_count_together(tmp_path: Path) -> None:
    db = tmp_path / "relayers.db"
    open_relay_store(str(db)).add({CLIENT: int(time.time())})
    HostGuardStore(str(db)).record_users({CLIENT: "alice"}, 3600)
    milters = start(tmp_path, ("w",), {"relayers": {"path": str(db)}, "workers": 2,
                                       "limits": {"recipients_per_hour": 100000}})
    try:
        answers = spread(milters, None)
        assert answers == ["continue"] * SESSIONS * PER_SESSION
        store = HostGuardStore(str(db))
        assert counted(store, "alice", "recipients", SESSIONS * PER_SESSION) == SESSIONS * PER_SESSION
        assert counted(store, "alice", "messages") == SESSIONS
        # Both workers answered (each decision line carries its worker's PID; lines are flushed in batches).
        pattern = re.compile(r"relaymilter\[(\d+)\]: \S+: pass: RCPT .* user=alice rule=relayers_db")
        deadline = time.monotonic() + 10
        while len(set(pattern.findall(milters[0].log()))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(set(pattern.findall(milters[0].log()))) == 2
    finally:
        for m in milters:
            m.stop()


def test_two_processes_on_one_host_enforce_the_limit_exactly(tmp_path: Path) -> None:
    db = tmp_path / "relayers.db"
    limit = 100
    milters = start(tmp_path, ("w1", "w2"), {"relayers": {"path": str(db)},
                                             "limits": {"recipients_per_hour": limit}})
    try:
        answers = spread(milters, "bob")
        assert answers.count("continue") == limit, [line for m in milters for line in m.log().splitlines()
                                                     if "error" in line.lower()][:5]
        assert answers.count(LIMIT_TEXT) == SESSIONS * PER_SESSION - limit
        assert counted(HostGuardStore(str(db)), "bob", "recipients", limit) == limit
    finally:
        for m in milters:
            m.stop()


def test_two_milters_on_one_redis_count_together_and_enforce_exactly(tmp_path: Path,
                                                                     redis_server: RedisServer) -> None:
    url = redis_server.url()
    open_relay_store(url).add({CLIENT: int(time.time())})
    guard = open_guard_store(url)
    guard.record_users({CLIENT: "carol"}, 3600)
    milters = start(tmp_path, ("smtp1", "smtp2"), {"relayers": {"url": url}, "workers": 2,
                                                   "limits": {"recipients_per_hour": 100000}})
    try:
        assert spread(milters, None) == ["continue"] * SESSIONS * PER_SESSION
        assert counted(guard, "carol", "recipients") == SESSIONS * PER_SESSION
        assert counted(guard, "carol", "messages") == SESSIONS
        for m in milters:
            m.write_config({"relayers": {"url": url}, "workers": 2, "limits": {"recipients_per_hour": 100}})
            m.hup()
        for m in milters:       # every worker of both has reloaded
            deadline = time.monotonic() + 10
            while m.log().count("reloaded ") < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert m.log().count("reloaded ") == 2
        answers = spread(milters, "dave")
        assert answers.count("continue") == 100
        assert answers.count(LIMIT_TEXT) == SESSIONS * PER_SESSION - 100
        assert counted(guard, "dave", "recipients") == 100

        # Redis gone: limits not applied (logged), relaying of an AUTH user goes on; the
        # relayers lookup a listed client needs fails closed.
        redis_server.stop()
        assert session(milters[0], "erin", 0) == ["continue"] * PER_SESSION
        milters[0].wait_for_log("limits=unavailable")
        assert "relaying limits not applied: counters unavailable" in milters[0].log()
        assert session(milters[1], None, 1)[0].startswith("451 4.3.0")
        # Back on the same port: the limits apply again, and the log says how many went without.
        again = RedisServer(tmp_path / "redis2", port=redis_server.port).start()
        try:
            time.sleep(1.2)                 # the store is left alone a second after a failure
            # Sessions until the worker that saw the outage has one (either worker may answer).
            for n in range(40):
                assert session(milters[0], "erin", 2 + n) == ["continue"] * PER_SESSION
                if "relaying limits applied again" in milters[0].log():
                    break
                time.sleep(0.05)
            milters[0].wait_for_log("relaying limits applied again")
        finally:
            again.stop()
    finally:
        guard.close()
        for m in milters:
            m.stop()
