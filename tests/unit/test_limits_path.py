"""Relaying limits, identities and warn-only mode through the milter's registered callbacks.

Real files throughout: relayers.db, the users map and the counter file beside
it; the libmilter context is the one stand-in (milterpath.Context).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import Milter
import pytest
from milterpath import Conn

from relaymilter import adapter, replies
from relaymilter.config import load_config
from relaymilter.decisionlog import DecisionLog
from relaymilter.store.guard import HostGuardStore
from relaymilter.store.relayers import BDBRelayStore

POP = "192.0.2.10"          # listed in relayers.db, logged in as alice
BARE = "192.0.2.11"         # listed, no user recorded
STRANGER = "203.0.113.9"
LIMIT = ("451", "4.7.1", "Relaying limit exceeded, try again later")
SUSPENDED = ("451", "4.7.1", "Relaying suspended, try again later")


class Milter_:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.cfg = tmp / "relaymilter.yaml"
        self.db = str(tmp / "relayers.db")
        self.lines: list[str] = []
        self.decisions = DecisionLog(self.lines.extend, interval=3600)
        self.holder: Any = None

    def configure(self, extra: str) -> None:
        self.cfg.write_text("add_host_names: false\nlocal_domains: [local.test]\ntrusted_networks: [127.0.0.1/32]\n"
                            "relayers: {path: %s}\nspammers: {path: %s}\n%s"
                            % (self.db, self.tmp / "spammers.db", extra))
        if self.holder is None:
            self.holder = adapter.RuntimeHolder(adapter.Runtime(load_config(str(self.cfg))), self.decisions)
        else:
            self.holder.swap(load_config(str(self.cfg)))        # what SIGHUP does

    def log(self) -> list[str]:
        self.decisions.flush()
        return self.lines


@pytest.fixture
def m(tmp_path: Path) -> Iterator[Milter_]:
    mil = Milter_(tmp_path)
    now = int(time.time())
    BDBRelayStore(mil.db).add({POP: now, BARE: now})
    HostGuardStore(mil.db).record_users({POP: "alice"}, 3600)
    try:
        yield mil
    finally:
        mil.decisions.close()


def relay(conn: Conn, n: int, start: int = 0) -> list[int]:
    return [conn.rcpt("<friend%d@remote.example>" % i) for i in range(start, start + n)]


def test_sessions_are_named_by_auth_pop_user_or_address(m: Milter_) -> None:
    m.configure("")
    for ip, auth, who in ((POP, None, "alice"), (BARE, None, BARE), (STRANGER, "bob", "bob"), ("127.0.0.1", None,
                                                                                              "127.0.0.1")):
        conn = Conn(m.holder, ip)
        assert conn.mail("<a@example.net>", auth) == Milter.CONTINUE
        assert conn.rcpt("<x@remote.example>") == Milter.CONTINUE
        assert conn.rcpt("<y@local.test>") == Milter.CONTINUE
        line, local = m.log()[-2:]
        assert " user=%s rule=" % who in line, line
        assert "user=" not in local                 # local mail is not relaying
    conn = Conn(m.holder, STRANGER)
    conn.mail("<a@example.net>")
    assert conn.rcpt("<x@remote.example>") == Milter.REJECT
    assert "user=" not in m.log()[-1]


def test_recipients_per_hour_counts_remote_only_and_tempfails_over(m: Milter_) -> None:
    m.configure("limits: {recipients_per_hour: 5}\n")
    conn = Conn(m.holder, POP)
    assert conn.mail("<a@example.net>") == Milter.CONTINUE
    assert relay(conn, 3) == [Milter.CONTINUE] * 3
    assert conn.rcpt("<u1@local.test>") == Milter.CONTINUE
    conn2 = Conn(m.holder, POP)                     # another connection, same user
    conn2.mail("<a@example.net>")
    assert relay(conn2, 3, 10) == [Milter.CONTINUE, Milter.CONTINUE, Milter.TEMPFAIL]
    assert conn2.replies[-1] == LIMIT
    assert conn2.rcpt("<u2@local.test>") == Milter.CONTINUE      # local mail is never limited
    assert "tempfail: RCPT from [%s]: 451 4.7.1" % POP in m.log()[-2]
    assert "user=alice count=5 rule=recipients_per_hour" in m.log()[-2]
    # Another identity has its own count.
    conn3 = Conn(m.holder, BARE)
    conn3.mail("<a@example.net>")
    assert relay(conn3, 5) == [Milter.CONTINUE] * 5
    counts = {(u.identity, u.family): u.count for u in HostGuardStore(m.db).usage(time.time())}
    assert counts[("alice", "recipients")] == 5 and counts[(BARE, "recipients")] == 5
    assert counts[("alice", "messages")] == 2


def test_messages_per_hour_count_at_the_first_relayed_recipient(m: Milter_) -> None:
    m.configure("limits: {messages_per_hour: 2}\n")
    conn = Conn(m.holder, STRANGER)
    got = []
    for _ in range(3):
        conn.mail("<a@example.net>", "carol")
        got.append(relay(conn, 2))
    assert got == [[Milter.CONTINUE] * 2, [Milter.CONTINUE] * 2, [Milter.TEMPFAIL] * 2]
    assert "user=carol count=2 rule=messages_per_hour" in m.log()[-1]


def test_suspension_removes_addresses_refuses_auth_at_mail_and_lifts(m: Milter_) -> None:
    m.configure("limits: {recipients_per_hour: 2, suspend_minutes: 30}\n")
    guard = HostGuardStore(m.db)
    guard.record_users({BARE: "alice"}, 3600)     # alice logged in from a second address too
    conn = Conn(m.holder, POP)
    conn.mail("<a@example.net>")
    assert relay(conn, 3) == [Milter.CONTINUE, Milter.CONTINUE, Milter.TEMPFAIL]
    assert guard.suspension("alice", time.time()) is not None
    assert BDBRelayStore(m.db).lookup(POP) is None and BDBRelayStore(m.db).lookup(BARE) is None
    # An AUTH session of alice is refused at MAIL, from anywhere.
    auth = Conn(m.holder, STRANGER)
    assert auth.mail("<a@example.net>", "alice") == Milter.TEMPFAIL
    assert auth.replies[-1] == SUSPENDED
    assert "rule=suspended" in m.log()[-1]
    # Put back in relayers.db by hand while suspended: still refused, as alice.
    BDBRelayStore(m.db).add({POP: int(time.time())})
    again = Conn(m.holder, POP)
    again.mail("<a@example.net>")
    assert again.rcpt("<z@remote.example>") == Milter.TEMPFAIL and again.replies[-1] == SUSPENDED
    assert guard.lift("alice")
    again.mail("<a@example.net>")
    assert again.rcpt("<z@remote.example>") == Milter.CONTINUE


def test_warn_mode_passes_and_logs_and_sighup_enforces_from_the_next_transaction(m: Milter_) -> None:
    m.configure("modes: {relay: warn}\n")
    conn = Conn(m.holder, STRANGER)
    conn.mail("<a@example.net>")
    assert conn.rcpt("<x@remote.example>") == Milter.CONTINUE
    line = m.log()[-1]
    assert ": would reject: RCPT from [%s]: 550 5.7.1 <x@remote.example>: Relaying denied;" % STRANGER in line
    assert line.endswith("rule=default_reject")
    m.configure("modes: {relay: enforce}\n")          # SIGHUP, the connection stays open
    assert conn.rcpt("<y@remote.example>") == Milter.CONTINUE     # same transaction: as it began
    conn.mail("<a@example.net>")
    assert conn.rcpt("<y@remote.example>") == Milter.REJECT
    assert ": reject: RCPT from [%s]: 550 5.7.1" % STRANGER in m.log()[-1]


def test_warn_mode_for_spammers_and_limits(m: Milter_, tmp_path: Path) -> None:
    from relaymilter.store.spammers import write_db

    write_db(str(tmp_path / "spammers.db"), ["spam.example"])
    m.configure("limits: {recipients_per_hour: 1, suspend_minutes: 5}\nmodes: {spammers: warn, limits: warn}\n")
    conn = Conn(m.holder, POP)
    assert conn.mail("<x@spam.example>") == Milter.CONTINUE
    assert ": would reject: MAIL from [%s]: 550 5.7.1 <x@spam.example>: Access denied;" % POP in m.log()[-1]
    assert relay(conn, 3) == [Milter.CONTINUE] * 3
    assert "would reject: RCPT" in m.log()[-1] and "rule=recipients_per_hour" in m.log()[-1]
    guard = HostGuardStore(m.db)
    assert guard.suspension("alice", time.time()) is None            # warn: no one is suspended
    assert BDBRelayStore(m.db).lookup(POP) is not None
    assert {(u.identity, u.family): u.count for u in guard.usage(time.time())}[("alice", "recipients")] == 3


def test_counter_store_unavailable_does_not_apply_limits(m: Milter_) -> None:
    m.configure("limits: {recipients_per_hour: 1}\n")
    Path(HostGuardStore(m.db).counters_path).write_bytes(b"not a counter file")
    conn = Conn(m.holder, POP)
    conn.mail("<a@example.net>")
    assert relay(conn, 3) == [Milter.CONTINUE] * 3
    assert all("limits=unavailable" in line for line in m.log()[-3:])
    assert m.holder.current.guard.stats["unavailable"] == 3
    # Relay permission itself still fails closed: a stranger is refused.
    stranger = Conn(m.holder, STRANGER)
    stranger.mail("<a@example.net>")
    assert stranger.rcpt("<x@remote.example>") == Milter.REJECT
    assert replies.RELAYING_DENIED.text in stranger.replies[-1]


def test_an_auth_session_without_connect_is_limited_too(m: Milter_) -> None:
    m.configure("limits: {recipients_per_hour: 2}\n")
    conn = Conn(m.holder, None)                     # MAIL with no CONNECT before it
    conn.mail("<a@example.net>", "frank")
    assert relay(conn, 3) == [Milter.CONTINUE, Milter.CONTINUE, Milter.TEMPFAIL]
    assert "user=frank count=2 rule=recipients_per_hour" in m.log()[-1]


def test_addresses_per_hour_counts_the_addresses_of_auth_sessions(m: Milter_) -> None:
    m.configure("limits: {addresses_per_hour: 2, suspend_minutes: 10}\n")
    got = []
    for ip in ("198.51.100.1", "198.51.100.2", "198.51.100.1", "198.51.100.3"):
        conn = Conn(m.holder, ip)
        conn.mail("<a@example.net>", "dave")
        got.append(relay(conn, 2))
    assert got == [[Milter.CONTINUE] * 2] * 3 + [[Milter.TEMPFAIL] * 2]
    assert "user=dave count=3 rule=addresses_per_hour" in m.log()[-2]
    assert HostGuardStore(m.db).suspension("dave", time.time()) is not None
    # A POP user's relaying adds no address: relaymilter-popwatch counted the login that listed it.
    conn = Conn(m.holder, POP)
    conn.mail("<a@example.net>")
    assert relay(conn, 1) == [Milter.CONTINUE]
    assert ("alice", "addresses") not in {(u.identity, u.family) for u in HostGuardStore(m.db).usage(time.time())}


def test_a_recipient_counted_ahead_asks_nothing_and_one_left_unused_is_refunded(
        m: Milter_, monkeypatch: pytest.MonkeyPatch) -> None:
    m.configure("limits: {recipients_per_hour: 100}\n")
    counters = m.holder.current.guard.store.counters
    charged: list[str] = []
    real = counters.charge
    monkeypatch.setattr(counters, "charge", lambda identity, *a, **k: charged.append(identity) or real(identity, *a, **k))

    def count() -> int:         # as another process reads the file
        return {(u.identity, u.family): u.count for u in HostGuardStore(m.db).usage(time.time())}.get(
            ("alice", "recipients"), 0)

    def settles_at(n: int) -> bool:
        deadline = time.monotonic() + 5
        while count() != n and time.monotonic() < deadline:
            time.sleep(0.01)
        return count() == n

    conn = Conn(m.holder, POP)
    conn.mail("<a@example.net>")
    assert relay(conn, 3) == [Milter.CONTINUE] * 3
    assert charged == ["alice", "alice"]        # the second recipient was counted by the first
    assert all(" user=alice rule=relayers_db" in line for line in m.log()[-3:])
    assert count() == 4                         # the third counted a fourth ahead...
    conn.mail("<b@example.net>")
    assert settles_at(3)                        # ...refunded when the transaction ended
    assert relay(conn, 1) == [Milter.CONTINUE] and count() == 5
    conn.close()
    assert settles_at(4)                        # and at the end of the connection
    # Near the limit nothing is counted ahead: each recipient is checked as it is counted.
    m.configure("limits: {recipients_per_hour: 10}\n")
    conn = Conn(m.holder, POP)
    conn.mail("<a@example.net>")
    assert relay(conn, 8) == [Milter.CONTINUE] * 6 + [Milter.TEMPFAIL] * 2
    assert "user=alice count=10 rule=recipients_per_hour" in m.log()[-1]
    assert count() == 10


def test_warn_mode_logs_every_recipient_enforce_would_refuse_over_addresses_per_hour(m: Milter_) -> None:
    # Over addresses_per_hour in warn mode the first recipient must not count the next one ahead:
    # the next is asked again and logged as the refusal enforce mode makes of it.
    m.configure("limits: {addresses_per_hour: 2}\nmodes: {limits: warn}\n")
    for ip in ("198.51.100.1", "198.51.100.2", "198.51.100.3"):
        conn = Conn(m.holder, ip)
        conn.mail("<a@example.net>", "dave")
        assert relay(conn, 3) == [Milter.CONTINUE] * 3
    would = [line for line in m.log()[-3:] if ": would reject: RCPT from [198.51.100.3]: 451 4.7.1 " in line]
    assert len(would) == 3 and all("user=dave count=3 rule=addresses_per_hour" in line for line in would)
    m.configure("limits: {addresses_per_hour: 2}\n")
    conn = Conn(m.holder, "198.51.100.3")
    conn.mail("<a@example.net>", "dave")
    assert relay(conn, 3) == [Milter.TEMPFAIL] * 3


def test_a_lift_while_a_recipient_is_counted_ahead_leaves_the_fresh_count_exact(
        m: Milter_, capsys: pytest.CaptureFixture[str]) -> None:
    from relaymilter.cli.guard import main as guard

    m.configure("limits: {recipients_per_hour: 100, suspend_minutes: 30}\n")
    counters = m.holder.current.guard.store.counters
    before = Conn(m.holder, STRANGER)
    before.mail("<a@example.net>", "carl")
    assert relay(before, 1) == [Milter.CONTINUE]        # counts the next recipient ahead; still open
    # The admin, meanwhile: relaymilter-guard suspend, then lift (carl starts afresh).
    assert guard(["-c", str(m.cfg), "suspend", "carl"]) == 0
    assert guard(["-c", str(m.cfg), "lift", "carl"]) == 0
    after = Conn(m.holder, STRANGER)
    after.mail("<a@example.net>", "carl")
    assert relay(after, 3) == [Milter.CONTINUE] * 3
    after.close()
    before.close()                      # the refund of a count the lift had already wiped
    counters.flush()
    capsys.readouterr()
    assert guard(["-c", str(m.cfg), "list", "0"]) == 0
    rows = [line.split(" ")[:3] for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    assert ["carl", "recipients", "3"] in rows, rows
