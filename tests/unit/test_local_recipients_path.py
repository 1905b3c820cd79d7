"""local_recipients in the one decision path: the policy Session's order, and the adapter's replies and log lines.

The order (resolution -> local domain, unknown user refused for every client ->
relay domain -> client rules -> Relaying denied) is checked table-driven through
policy.session.Session; then through the adapter's registered callbacks on a real
Runtime with real source files, which is what the milter runs.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import Milter
import pytest
from milterpath import Conn, MapSources, decide, policy, session

from relaymilter import adapter, replies
from relaymilter.config import load_config
from relaymilter.decisionlog import DecisionLog
from relaymilter.errors import StoreUnavailable
from relaymilter.policy.decision import Continue, Reject
from relaymilter.policy.modes import Modes
from relaymilter.policy.recipients import LOOKUP_FAILED, USER_UNKNOWN
from relaymilter.store import recipients as rmod
from relaymilter.store.relayers import BDBRelayStore

KNOWN_USERS = {"alice": "aliases", "bob": "list"}


class Users:
    """A local_recipients lookup over a dict; records what it was asked; may fail."""

    def __init__(self, fail: bool = False) -> None:
        self.asked: list[tuple[tuple[str, ...], object]] = []
        self.fail = fail

    def __call__(self, locals_: tuple[str, ...], domain: object) -> object:
        self.asked.append((locals_, domain))
        if self.fail:
            raise StoreUnavailable("users: cannot read")
        return next((KNOWN_USERS[u] for u in locals_ if u in KNOWN_USERS), None)


DENIED = Reject(replies.RELAYING_DENIED, "default_reject")
STRANGER, TRUSTED, LISTED = "198.51.100.7", "127.0.0.1", "192.0.2.9"
CASES = [
    # rcpt, client, auth, expected decision, source, asked the sources?
    ("<alice@local.test>", STRANGER, None, Continue("local_domain"), "aliases", True),
    ("<Bob+Tag@LOCAL.test>", STRANGER, None, Continue("local_domain"), "list", True),
    ("<nobody@local.test>", STRANGER, None, USER_UNKNOWN, None, True),
    ("<nobody@local.test>", TRUSTED, None, USER_UNKNOWN, None, True),
    ("<nobody@local.test>", LISTED, None, USER_UNKNOWN, None, True),
    ("<nobody@local.test>", STRANGER, "carol", USER_UNKNOWN, None, True),
    ("<nobody>", TRUSTED, None, USER_UNKNOWN, None, True),
    ("<postmaster>", STRANGER, None, Continue("local_domain"), "postmaster", False),
    ("<MAILER-DAEMON@local.test>", STRANGER, None, Continue("local_domain"), "postmaster", False),
    ("<nobody@relayed.test>", STRANGER, None, Continue("relay_domain"), None, False),
    ("<nobody%remote.example@local.test>", STRANGER, None, DENIED, None, False),
    ("<nobody@remote.example>", LISTED, None, Continue("relayers_db"), None, False),
    ("<nobody@remote.example>", TRUSTED, None, Continue("trusted_network"), None, False),
]


@pytest.mark.parametrize("rcpt,client,auth,want,source,asked", CASES)
def test_order(rcpt, client, auth, want, source, asked):
    users = Users()
    sources = MapSources(policy({"local.test"}, {"relayed.test"}), relayers={LISTED: 1_700_000_000},
                         known_recipient=users, recipient_delimiter="+")
    verdict = decide(rcpt, sources, client, auth)
    assert verdict.decision == want
    assert verdict.source == source
    assert bool(users.asked) is asked


def test_sources_asked_for_once_per_transaction():
    sources = MapSources(policy({"local.test"}, set()), known_recipient=Users())
    s = session(sources)
    for rcpt in ("<alice@local.test>", "<nobody@local.test>", "<bob@local.test>"):
        s.rcpt(rcpt)
    assert sources.transactions == 1
    s.mail("<b@example.net>", None)
    s.rcpt("<alice@local.test>")
    assert sources.transactions == 2


def test_unreadable_source_tempfails_local_users_only():
    sources = MapSources(policy({"local.test"}, set()), relayers={LISTED: 1_700_000_000},
                         known_recipient=Users(fail=True))
    assert decide("<alice@local.test>", sources, LISTED).decision == LOOKUP_FAILED
    assert decide("<postmaster@local.test>", sources, LISTED).decision == Continue("local_domain")
    assert decide("<bob@remote.example>", sources, LISTED).decision == Continue("relayers_db")


def test_warn_mode_passes_and_keeps_the_refusal_for_the_log():
    sources = MapSources(policy({"local.test"}, set()), known_recipient=Users())
    sources.current_modes = lambda: Modes(frozenset({"local_recipients"}))     # type: ignore[attr-defined]
    s = session(sources, TRUSTED)
    verdict = s.rcpt("<nobody@local.test>")
    assert verdict.decision == Continue("unknown_recipient") and s.warned == USER_UNKNOWN
    s.rcpt("<alice@local.test>")
    assert s.warned is None
    failing = MapSources(policy({"local.test"}, set()), known_recipient=Users(fail=True))
    failing.current_modes = sources.current_modes                               # type: ignore[attr-defined]
    assert decide("<alice@local.test>", failing).decision == LOOKUP_FAILED   # a 451 is made in every mode


def test_without_local_recipients_every_local_user_passes():
    sources = MapSources(policy({"local.test"}, set()))
    verdict = decide("<nobody@local.test>", sources)
    assert verdict.decision == Continue("local_domain") and verdict.source is None


# --- through the adapter, on a real Runtime and real files -------------------------------------

@pytest.fixture
def milter(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(rmod, "RACY_NS", 0)
    (tmp_path / "aliases").write_text("staff: alice, bob\n")
    (tmp_path / "users").write_text("carol\n")
    subprocess.run(["makemap", "hash", str(tmp_path / "virt")], input="@catch.test x\n", text=True, check=True,
                   timeout=60)
    cfg = tmp_path / "relaymilter.yaml"
    cfg.write_text("add_host_names: false\nlocal_domains: [local.test, catch.test]\ntrusted_networks: [127.0.0.1/32]\n"
                   "relayers: {path: %s}\nspammers: {path: %s}\n"
                   "local_recipients: {aliases: [%s], lists: [%s], maps: [%s], recipient_delimiter: '+'}\n"
                   % (tmp_path / "relayers.db", tmp_path / "spammers.db", tmp_path / "aliases", tmp_path / "users",
                      tmp_path / "virt.db"))
    lines: list[str] = []
    decisions = DecisionLog(lines.extend, interval=3600)
    holder = adapter.RuntimeHolder(adapter.Runtime(load_config(str(cfg))), decisions)
    try:
        yield holder, lines, tmp_path, cfg
    finally:
        decisions.close()


def test_replies_and_decision_lines(milter):
    holder, lines, tmp_path, _ = milter
    c = Conn(holder, "127.0.0.1")
    assert c.mail(b"<a@example.net>") == Milter.CONTINUE
    assert c.rcpt(b"<Staff@local.test>") == Milter.CONTINUE
    assert c.rcpt(b"<carol+x@local.test>") == Milter.CONTINUE
    assert c.rcpt(b"<anyone@catch.test>") == Milter.CONTINUE
    assert c.rcpt(b"<nobody@local.test>") == Milter.REJECT
    (tmp_path / "users").unlink()
    (tmp_path / "users").mkdir()
    assert c.rcpt(b"<nobody2@local.test>") == Milter.REJECT      # the sources as of this transaction
    assert c.mail(b"<a@example.net>") == Milter.CONTINUE          # the next one sees the change
    assert c.rcpt(b"<nobody@local.test>") == Milter.TEMPFAIL
    assert c.rcpt(b"<staff@local.test>") == Milter.CONTINUE
    assert c.replies == [("550", "5.1.1", "User unknown"), ("550", "5.1.1", "User unknown"),
                         ("451", "4.3.0", "Temporary lookup failure")]
    holder.decisions.flush()
    tag = c.connection.tag
    head = "%s: pass: RCPT from [127.0.0.1]: from=<a@example.net> " % tag
    assert lines[1:] == [
        head + "to=<Staff@local.test> resolved=Staff@local.test rule=local_domain source=aliases",
        head + "to=<carol+x@local.test> resolved=carol+x@local.test rule=local_domain source=list",
        head + "to=<anyone@catch.test> resolved=anyone@catch.test rule=local_domain source=map",
        "%s: reject: RCPT from [127.0.0.1]: 550 5.1.1 <nobody@local.test>: User unknown; from=<a@example.net> "
        "to=<nobody@local.test> resolved=nobody@local.test rule=unknown_recipient" % tag,
        "%s: reject: RCPT from [127.0.0.1]: 550 5.1.1 <nobody2@local.test>: User unknown; from=<a@example.net> "
        "to=<nobody2@local.test> resolved=nobody2@local.test rule=unknown_recipient" % tag,
        "%s: pass: MAIL from [127.0.0.1]: from=<a@example.net> rule=sender_ok" % tag,
        "%s: tempfail: RCPT from [127.0.0.1]: 451 4.3.0 <nobody@local.test>: Temporary lookup failure; "
        "from=<a@example.net> to=<nobody@local.test> resolved=nobody@local.test rule=recipients_unavailable" % tag,
        head + "to=<staff@local.test> resolved=staff@local.test rule=local_domain source=aliases",
    ]


def test_warn_mode_through_the_adapter(milter):
    holder, lines, _, cfg = milter
    cfg.write_text(cfg.read_text() + "modes: {local_recipients: warn}\n")
    holder.swap(load_config(str(cfg)))
    c = Conn(holder, "192.0.2.60")
    c.mail(b"<a@example.net>")
    assert c.rcpt(b"<nobody@local.test>") == Milter.CONTINUE and c.replies == []
    holder.decisions.flush()
    assert lines[-1] == ("%s: would reject: RCPT from [192.0.2.60]: 550 5.1.1 <nobody@local.test>: User unknown; "
                         "from=<a@example.net> to=<nobody@local.test> resolved=nobody@local.test "
                         "rule=unknown_recipient" % c.connection.tag)


def test_list_change_counts_from_the_next_transaction(milter):
    holder, _, tmp_path, _ = milter
    c = Conn(holder, "192.0.2.50")
    assert c.mail("<a@example.net>") == Milter.CONTINUE
    assert c.rcpt("<dave@local.test>") == Milter.REJECT
    (tmp_path / "users").write_text("carol\ndave\n")
    assert c.mail("<a@example.net>") == Milter.CONTINUE
    assert c.rcpt("<dave@local.test>") == Milter.CONTINUE


def test_reload_keeps_or_replaces_the_sources(milter):
    holder, _, tmp_path, cfg = milter
    first = holder.current.recipients
    assert holder.swap(load_config(str(cfg))).recipients is first        # same sources: kept, nothing re-read
    cfg.write_text(cfg.read_text().replace("local_recipients: {aliases: [%s], " % (tmp_path / "aliases"),
                                           "local_recipients: {"))
    second = holder.swap(load_config(str(cfg)))
    assert second.recipients is not first and [s.kind for s in second.recipients.sources] == ["list", "map"]
    c = Conn(holder, "192.0.2.51")
    c.mail("<a@example.net>")
    assert c.rcpt("<staff@local.test>") == Milter.REJECT                # the aliases source is gone
    BDBRelayStore(str(tmp_path / "relayers.db")).add({"192.0.2.51": int(time.time())})
    c.mail("<a@example.net>")
    assert c.rcpt("<bob@remote.example>") == Milter.CONTINUE             # relaying untouched
