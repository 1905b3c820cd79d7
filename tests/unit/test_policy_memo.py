"""The memoisable halves of the policy: destination() and mail_plan() depend on the text alone; the
session's standing reads relayers.db once per transaction (real Berkeley DB files)."""

from __future__ import annotations

import time

import pytest
from milterpath import NOW, MapSources, policy, session

from relaymilter.address.keys import sender_keys
from relaymilter.policy.mail import SenderKeys, mail_plan
from relaymilter.policy.rcpt import Place, destination
from relaymilter.policy.session import Session
from relaymilter.policy.verdict import Standing
from relaymilter.store.relayers import BDBRelayStore

POLICY = policy({"local.test"}, {"relayed.test"}, trusted=("127.0.0.0/8", "10.1.0.0/16"))

RECIPIENTS = [
    "<bob@local.test>", "<postmaster>", "<bob@sub.relayed.test>", "<bob@remote.example>",
    "<bob%remote.example@local.test>", "<remote.example!bob@local.test>", '<"bob@remote.example"@local.test>',
    "<bob@remote@local.test>", "<@local.test:bob@remote.example>", "<bob@[192.0.2.1]>", "<>", "<a b@c>",
]


@pytest.mark.parametrize("rcpt", RECIPIENTS)
def test_destination_is_a_pure_function_of_the_text(rcpt):
    # What the runtime memoises must be what a fresh call computes.
    assert destination(POLICY, rcpt) == destination(POLICY, rcpt)


@pytest.mark.parametrize("rcpt", RECIPIENTS)
def test_local_and_relay_destinations_never_ask_the_client_rules(rcpt):
    sources = MapSources(POLICY)
    verdict = session(sources).rcpt(rcpt)
    if destination(POLICY, rcpt).place in (Place.LOCAL, Place.RELAY):
        assert verdict.decision.rule in ("local_domain", "relay_domain")
        assert sources.asked == []
    else:
        assert verdict.decision.rule in ("default_reject", "malformed_address")
        assert sources.asked == ["198.51.100.7"]


def test_standing_reads_relayers_at_each_transaction(tmp_path):
    store = BDBRelayStore(str(tmp_path / "relayers.db"))
    sources = MapSources(POLICY)
    sources.relayers_stamp = store.lookup          # type: ignore[method-assign]
    s = Session(sources)
    s.connect(POLICY.client("198.51.100.7"))
    s.mail("<a@example.net>", None)
    assert s.rcpt("<bob@remote.example>").decision.rule == "default_reject"
    store.add({"198.51.100.7": int(time.time())})
    s.mail("<a@example.net>", None)
    assert s.standing() is Standing.LISTED
    store.delete(["198.51.100.7"])
    s.mail("<a@example.net>", None)
    assert s.rcpt("<bob@remote.example>").decision.rule == "default_reject"


def test_window():
    windowed = policy(set(), set(), trusted=(), window=30)
    assert session(MapSources(windowed, {"198.51.100.7": int(NOW) - 29 * 60})).standing() is Standing.LISTED
    assert session(MapSources(windowed, {"198.51.100.7": int(NOW) - 31 * 60})).standing() is Standing.STRANGER
    assert session(MapSources(windowed, {"198.51.100.7": int(NOW) + 3600})).standing() is Standing.LISTED


@pytest.mark.parametrize("addr, auth, permit, standing", [
    ("10.1.2.3", None, True, Standing.TRUSTED),
    ("198.51.100.7", "alice", True, Standing.AUTHENTICATED),
    ("not-an-ip", None, True, Standing.STRANGER),
    (None, None, True, Standing.STRANGER),
    ("198.51.100.7", "alice", False, Standing.STRANGER),
])
def test_standing_without_a_lookup(addr, auth, permit, standing):
    sources = MapSources(policy(set(), set(), trusted=("10.1.0.0/16",), permit_authenticated=permit))
    assert session(sources, addr, auth).standing() is standing
    assert sources.asked == ([] if auth is None or permit else ["198.51.100.7"])


def test_refusal_is_553_for_an_unparsable_address_else_550():
    assert destination(POLICY, "<a b@c>").refusal.rule == "malformed_address"
    assert destination(POLICY, "<bob@remote.example>").refusal.rule == "default_reject"
    assert session(MapSources(POLICY)).rcpt("<a b@c>").decision.reply.code == "553"


SENDERS = ["<>", "< >", "<alice@Spam.Example>", "<alice+tag@mail.spam.example>", "<postmaster>",
           "<a@b@c>", "<user%spam.example>", "<x@[192.0.2.1]>", "<x@ok.example>"]


@pytest.mark.parametrize("sender", SENDERS)
def test_mail_plan_holds_the_sender_keys(sender):
    plan = mail_plan(sender)
    if isinstance(plan, SenderKeys):
        assert list(plan.keys) == sender_keys(sender)
    else:
        assert sender_keys(sender) == []
        assert plan.rule in ("null_sender", "sender_ok", "sender_unparsed")
