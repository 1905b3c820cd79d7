"""Relaying limits on Redis through the milter's registered callbacks: the relayers lookup folded into the count.

A listed client's first relayed recipient asks Redis once: one script looks
the address up in the relayers map and, only if it is listed (recently
enough, with relayers.window), names the identity, answers its suspension
and counts. Real redis-server on loopback, real Runtime; the libmilter
context is the one stand-in (tests/unit/milterpath.Context). The calls each
store makes are counted by wrapping the real methods (they still run).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Iterator

import Milter
import pytest

from relaymilter import adapter
from relaymilter.config import load_config
from relaymilter.decisionlog import DecisionLog
from relaymilter.store.guard import open_guard_store
from relaymilter.store.guardredis import COUNT, GATE
from relaymilter.store.relayers import open_relay_store

from redisproc import RedisServer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "unit"))
from milterpath import Conn  # noqa: E402

pytestmark = pytest.mark.integration

POP = "192.0.2.10"          # listed, logged in as alice
OLD = "192.0.2.12"          # listed 20 minutes ago, logged in as olga
STRANGER = "203.0.113.9"
LIMIT = ("451", "4.7.1", "Relaying limit exceeded, try again later")
SUSPENDED = ("451", "4.7.1", "Relaying suspended, try again later")


class Rig:
    def __init__(self, tmp: Path, server: RedisServer) -> None:
        self.tmp = tmp
        self.server = server
        self.url = server.url()
        self.lines: list[str] = []
        self.decisions = DecisionLog(self.lines.extend, interval=3600)
        self.holder: Any = None
        self.calls = {"relayers": 0, "guard": 0, "posted": 0}

    def configure(self, extra: str) -> Any:
        cfg = self.tmp / "relaymilter.yaml"
        cfg.write_text("add_host_names: false\nlocal_domains: [local.test]\ntrusted_networks: [127.0.0.1/32]\n"
                       "relayers: {url: '%s', window: 10}\nspammers: {path: %s}\n%s"
                       % (self.url, self.tmp / "spammers.db", extra))
        self.holder = adapter.RuntimeHolder(adapter.Runtime(load_config(str(cfg))), self.decisions)
        rt = self.holder.current
        for script in (GATE, COUNT):        # as after a first call of each (EVALSHA, then EVAL)
            rt.guard.store.relay.client.script_load(script)
        self._count(rt.relayers._lookups, "call", "relayers")
        self._count(rt.guard.store, "_call", "guard")
        self._count(rt.guard.store._lines, "post", "posted")
        return rt

    def _count(self, obj: Any, name: str, key: str) -> None:
        real = getattr(obj, name)

        def counted(*args: Any, **kw: Any) -> Any:
            self.calls[key] += 1
            return real(*args, **kw)

        setattr(obj, name, counted)

    def asked(self) -> dict[str, int]:
        found, self.calls = self.calls, {"relayers": 0, "guard": 0, "posted": 0}
        return found

    def log(self) -> list[str]:
        self.decisions.flush()
        return self.lines

    def usage(self) -> dict[tuple[str, str], int]:
        guard = open_guard_store(self.url)
        try:
            return {(u.identity, u.family): u.count for u in guard.usage(time.time())}
        finally:
            guard.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    server = RedisServer(tmp_path / "redis").start()
    now = int(time.time())
    store = open_relay_store(server.url())
    guard = open_guard_store(server.url())
    try:
        store.add({POP: now, OLD: now - 20 * 60})
        guard.record_users({POP: "alice", OLD: "olga"}, 3600)
        r = Rig(tmp_path, server)
        yield r
        r.decisions.close()
    finally:
        guard.close()
        store.close()
        server.stop()


def relay(conn: Conn, n: int, start: int = 0) -> list[int]:
    return [conn.rcpt("<friend%d@remote.example>" % i) for i in range(start, start + n)]


def test_first_relayed_recipient_is_one_call_counting_only_listed_clients(rig: Rig) -> None:
    rig.configure("limits: {recipients_per_hour: 100, messages_per_hour: 100, addresses_per_hour: 5}\n")
    conn = Conn(rig.holder, POP)
    conn.mail("<a@example.net>")
    assert conn.rcpt("<u1@local.test>") == Milter.CONTINUE          # local: no lookup at all
    assert rig.asked() == {"relayers": 0, "guard": 0, "posted": 0}
    assert relay(conn, 3) == [Milter.CONTINUE] * 3
    # One call for the first relayed recipient, answering the relayers lookup too; alice is far from her
    # limit, so every other later one is counted without waiting for the answer.
    assert rig.asked() == {"relayers": 0, "guard": 2, "posted": 1}
    assert "user=alice rule=relayers_db" in rig.log()[-1]
    # A stranger, and a client listed longer ago than the window: one call, refused, nothing counted.
    for ip in (STRANGER, OLD):
        other = Conn(rig.holder, ip)
        other.mail("<a@example.net>")
        assert relay(other, 2) == [Milter.REJECT] * 2
        assert rig.asked() == {"relayers": 0, "guard": 1, "posted": 0}
        assert "rule=default_reject" in rig.log()[-1] and "user=" not in rig.log()[-1]
    # A POP user's relaying adds no address (relaymilter-popwatch counted the login).
    assert rig.usage() == {("alice", "recipients"): 3, ("alice", "messages"): 1}
    # Every counter key expires an hour (and a minute) after its minute's first use.
    client = rig.holder.current.guard.store.relay.client
    keys = [k for k in client.scan_iter(match="relaymilter:relay-guard:*") if b":u:" not in k]
    assert len(keys) == 2 and all(3600 < client.ttl(k) <= 3660 for k in keys), keys


def test_limit_and_suspension_answered_by_the_folded_call(rig: Rig) -> None:
    rig.configure("limits: {recipients_per_hour: 2, suspend_minutes: 30}\n")
    conn = Conn(rig.holder, POP)
    conn.mail("<a@example.net>")
    assert relay(conn, 2) == [Milter.CONTINUE] * 2
    conn.mail("<a@example.net>")                    # a new transaction: its first recipient is the folded call
    assert conn.rcpt("<x@remote.example>") == Milter.TEMPFAIL and conn.replies[-1] == LIMIT
    assert "user=alice count=2 rule=recipients_per_hour" in rig.log()[-1]
    # Suspended: alice's address left the map; put back by hand, the folded call answers the suspension.
    assert open_relay_store(rig.url).lookup(POP) is None
    open_relay_store(rig.url).add({POP: int(time.time())})
    rig.asked()
    again = Conn(rig.holder, POP)
    again.mail("<a@example.net>")
    assert again.rcpt("<y@remote.example>") == Milter.TEMPFAIL and again.replies[-1] == SUSPENDED
    assert rig.asked() == {"relayers": 0, "guard": 1, "posted": 0}
    assert rig.usage() == {("alice", "recipients"): 2, ("alice", "messages"): 1}


def test_warn_mode_counts_through_the_folded_call(rig: Rig) -> None:
    rig.configure("limits: {recipients_per_hour: 1}\nmodes: {limits: warn}\n")
    conn = Conn(rig.holder, POP)
    for _ in range(2):
        conn.mail("<a@example.net>")
        assert relay(conn, 2) == [Milter.CONTINUE] * 2
    # Counted all the same: the count after each (the second transaction's first recipient is GATE's, its
    # second COUNT's).
    assert "would reject: RCPT" in rig.log()[-2] and "count=3 rule=recipients_per_hour" in rig.log()[-2]
    assert "would reject: RCPT" in rig.log()[-1] and "count=4 rule=recipients_per_hour" in rig.log()[-1]
    assert rig.usage()[("alice", "recipients")] == 4


def test_counters_refused_or_down_relay_permission_still_decided_and_counted_once(rig: Rig) -> None:
    rt = rig.configure("limits: {recipients_per_hour: 100}\n")
    # Scripts refused (an ACL), plain reads allowed: the folded call fails, the plain lookup
    # decides; the recipient relays without the limits, one decision counted as such.
    admin = rt.guard.store.relay.client
    admin.execute_command("ACL", "SETUSER", "default", "-evalsha", "-eval")
    conn = Conn(rig.holder, POP)
    conn.mail("<a@example.net>")
    assert conn.rcpt("<x@remote.example>") == Milter.CONTINUE
    assert "limits=unavailable rule=relayers_db" in rig.log()[-1]
    assert rig.asked() == {"relayers": 1, "guard": 1, "posted": 0}
    assert rt.guard.stats["unavailable"] == 1
    admin.execute_command("ACL", "SETUSER", "default", "+@all")
    # Redis gone: relay permission fails closed (451 4.3.0), however the counters fare.
    time.sleep(1.1)                     # the counters are left alone a second after a failure
    rig.server.stop()
    again = Conn(rig.holder, POP)
    again.mail("<a@example.net>")
    assert again.rcpt("<x@remote.example>") == Milter.TEMPFAIL
    assert again.replies[-1][:2] == ("451", "4.3.0")
    assert "rule=relayers_unavailable" in rig.log()[-1]
    assert rig.asked()["guard"] == 1


def test_an_auth_users_addresses_counted_and_the_whole_transaction_refused_over(rig: Rig) -> None:
    rig.configure("limits: {addresses_per_hour: 2}\n")
    got = []
    for ip in ("198.51.100.1", "198.51.100.2", "198.51.100.3"):
        conn = Conn(rig.holder, ip)
        conn.mail("<a@example.net>", "dave")
        got.append(relay(conn, 2))
    assert got == [[Milter.CONTINUE] * 2] * 2 + [[Milter.TEMPFAIL] * 2]
    assert "user=dave count=3 rule=addresses_per_hour" in rig.log()[-1]
    assert rig.usage() == {("dave", "recipients"): 4, ("dave", "messages"): 2, ("dave", "addresses"): 3}
    client = rig.holder.current.guard.store.relay.client
    assert 3600 < client.ttl(b"relaymilter:relay-guard:a:dave") <= 3660


def test_later_recipients_far_from_the_limit_are_posted_and_near_it_waited_for(rig: Rig) -> None:
    rig.configure("limits: {recipients_per_hour: 6}\n")
    conn = Conn(rig.holder, POP)
    conn.mail("<a@example.net>")
    assert relay(conn, 3) == [Milter.CONTINUE] * 3
    # Counted 1 by the folded call; 2 is within half the limit: posted, not waited for; 3 is waited
    # for (a posted count is never followed by another). The posted count is in place for anyone who
    # asks next.
    assert rig.asked() == {"relayers": 0, "guard": 2, "posted": 1}
    assert rig.usage() == {("alice", "recipients"): 3, ("alice", "messages"): 1}
    # From the fourth on, every recipient is checked as it is counted: the answers owed on the
    # connection are read first, so each check sees its own answer (4, 5, 6, then over).
    assert relay(conn, 4, start=3) == [Milter.CONTINUE] * 3 + [Milter.TEMPFAIL]
    assert conn.replies[-1] == LIMIT
    assert rig.asked() == {"relayers": 0, "guard": 4, "posted": 0}
    assert "user=alice count=6 rule=recipients_per_hour" in rig.log()[-1]
    assert rig.usage() == {("alice", "recipients"): 6, ("alice", "messages"): 1}


def test_a_server_restart_with_answers_owed_is_a_reconnection_not_an_outage(rig: Rig) -> None:
    rt = rig.configure("limits: {recipients_per_hour: 100}\n")
    conn = Conn(rig.holder, POP)
    conn.mail("<a@example.net>")
    assert relay(conn, 2) == [Milter.CONTINUE] * 2
    assert rig.asked()["posted"] == 1
    rig.server.stop()
    rig.server.start()
    open_relay_store(rig.url).add({POP: int(time.time())})
    open_guard_store(rig.url).record_users({POP: "alice"}, 3600)
    again = Conn(rig.holder, POP)
    again.mail("<a@example.net>")
    assert relay(again, 2) == [Milter.CONTINUE] * 2
    assert "limits=unavailable" not in rig.log()[-1] and "user=alice" in rig.log()[-1]
    assert rt.guard.stats["unavailable"] == 0
    assert rig.usage() == {("alice", "recipients"): 2, ("alice", "messages"): 1}


def test_a_posted_count_the_server_refuses_is_logged(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    rt = rig.configure("limits: {recipients_per_hour: 100}\n")
    # EVAL (how a count is posted) refused by an ACL, EVALSHA allowed: the folded call works, the
    # posted counts are refused, and that is only known when their answers are read.
    rt.guard.store.relay.client.execute_command("ACL", "SETUSER", "default", "-eval")
    conn = Conn(rig.holder, POP)
    conn.mail("<a@example.net>")
    assert relay(conn, 4) == [Milter.CONTINUE] * 4       # the 2nd and 4th posted
    with caplog.at_level("WARNING", logger="relaymilter.limits"):
        conn.mail("<a@example.net>")
        assert relay(conn, 1) == [Milter.CONTINUE]
    assert rt.guard.store._lines.refused == 2
    assert any("a count sent without waiting was refused (1 since the last such line)" in r.getMessage()
               for r in caplog.records), caplog.text
    assert rig.usage() == {("alice", "recipients"): 3, ("alice", "messages"): 2}


def test_an_answer_owed_is_read_before_the_next_command_even_when_it_comes_late(tmp_path: Path) -> None:
    from relaymilter.store.redislines import Lines

    server = RedisServer(tmp_path / "redis").start()
    try:
        client = server.client()
        lines = Lines(client.connection_pool, "test")
        slow = b"local t = redis.call('TIME') local s = t[1] * 1e6 + t[2] " \
               b"while true do t = redis.call('TIME') if t[1] * 1e6 + t[2] - s > 100000 then break end end " \
               b"return 'posted'"
        for _ in range(3):
            # The server is busy with the posted script for 0.1 s: its answer is not there yet when
            # the next command goes out on the same connection, and must not be taken for that one's.
            lines.post(b"*3\r\n$4\r\nEVAL\r\n$%d\r\n%s\r\n$1\r\n0\r\n" % (len(slow), slow))
            assert lines.call("ECHO", "mine") == b"mine"
        assert lines.refused == 0
        lines.close()
    finally:
        server.stop()


def test_transactions_of_one_identity_side_by_side_stay_within_its_limit(rig: Rig) -> None:
    rig.configure("limits: {recipients_per_hour: 12}\n")
    # Three connections of alice's, each its transaction open, a recipient each in turn (a client
    # pacing its recipients on parallel connections). What a transaction learnt of the count at its
    # first recipient is soon out of date: the others' counts land meanwhile.
    conns = [Conn(rig.holder, POP) for _ in range(3)]
    for conn in conns:
        conn.mail("<a@example.net>")
    relayed = 0
    for i in range(8):
        for conn in conns:
            relayed += conn.rcpt("<friend%d@remote.example>" % i) == Milter.CONTINUE
    assert relayed == 12
    assert rig.usage() == {("alice", "recipients"): 12, ("alice", "messages"): 3}


def test_an_outage_longer_than_max_connections_tries_leaves_the_counts_working_after(tmp_path: Path) -> None:
    from relaymilter.errors import StoreUnavailable
    from relaymilter.store.guard import Ask

    server = RedisServer(tmp_path / "redis").start()
    guard = open_guard_store(server.url() + "?max_connections=2")
    try:
        ask = Ask(address=POP, identity="alice", add={"recipients": 1, "messages": 1},
                  limits={"recipients": 100}, now=time.time())
        assert guard.gate(ask).charge.counts == {"recipients": 1, "messages": 1}
        server.stop()
        # A count each time the breaker lets one through: every one fails to connect, and each must
        # not use up one of the pool's connections for good.
        for _ in range(4):
            with pytest.raises(StoreUnavailable):
                guard.gate(ask)
        server.start()
        assert guard.gate(ask).charge.counts == {"recipients": 1, "messages": 1}
    finally:
        guard.close()
        server.stop()
