"""The memoisable halves of the policy: destination() and mail_plan() depend on the text alone,
ClientRules looks relayers.db up on every call (real Berkeley DB files)."""

from __future__ import annotations

import ipaddress
import time

import pytest

from relaymilter.errors import StoreUnavailable
from relaymilter.policy.mail import check_keys, check_listed, check_mail, mail_plan, sender_keys
from relaymilter.policy.rcpt import Client, ClientRules, RcptPolicy, destination, evaluate_rcpt
from relaymilter.store.relayers import BDBRelayStore

NOW = 1_700_000_000.0

POLICY = RcptPolicy(
    local_domains=frozenset({"local.test"}),
    relay_domains=frozenset({"relayed.test"}),
    trusted_networks=(ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("10.1.0.0/16")),
    permit_authenticated=True,
    window=None,
)

RECIPIENTS = [
    "<bob@local.test>", "<postmaster>", "<bob@sub.relayed.test>", "<bob@remote.example>",
    "<bob%remote.example@local.test>", "<remote.example!bob@local.test>", '<"bob@remote.example"@local.test>',
    "<bob@remote@local.test>", "<@local.test:bob@remote.example>", "<bob@[192.0.2.1]>", "<>", "<a b@c>",
]


@pytest.mark.parametrize("rcpt", RECIPIENTS)
def test_destination_is_a_pure_function_of_the_text(rcpt):
    # What the adapter memoises must be what a fresh call computes.
    assert destination(POLICY, rcpt) == destination(POLICY, rcpt)


@pytest.mark.parametrize("rcpt", RECIPIENTS)
def test_final_destination_means_no_client_rule(rcpt):
    dest = destination(POLICY, rcpt)
    calls = []

    def lookup(key: str):
        calls.append(key)
        return None

    rules = ClientRules(POLICY, Client("198.51.100.7"))
    verdict = rules.decide(dest, lookup, NOW)
    assert verdict == evaluate_rcpt(POLICY, Client("198.51.100.7"), rcpt, lookup, NOW)
    assert rules.decision(dest, lookup, NOW) == verdict.decision
    if dest.final is not None:
        assert verdict.decision.rule in ("local_domain", "relay_domain")
        assert calls == []
    else:
        assert verdict.decision.rule in ("default_reject", "malformed_address")
        assert calls == ["198.51.100.7"] * 3


def test_client_rules_look_relayers_up_on_every_call(tmp_path):
    store = BDBRelayStore(str(tmp_path / "relayers.db"))
    rules = ClientRules(POLICY, Client("198.51.100.7"))
    dest = destination(POLICY, "<bob@remote.example>")
    assert rules.decision(dest, store.lookup, time.time()).rule == "default_reject"
    store.add({"198.51.100.7": int(time.time())})
    assert rules.decision(dest, store.lookup, time.time()).rule == "relayers_db"
    store.delete(["198.51.100.7"])
    assert rules.decision(dest, store.lookup, time.time()).rule == "default_reject"


def test_client_rules_window():
    policy = RcptPolicy(frozenset(), frozenset(), (), True, window=30)
    rules = ClientRules(policy, Client("198.51.100.7"))
    assert rules.permit(lambda key: int(NOW) - 29 * 60, NOW).rule == "relayers_db"
    assert rules.permit(lambda key: int(NOW) - 31 * 60, NOW) is None
    assert rules.permit(lambda key: int(NOW) + 3600, NOW).rule == "relayers_db"   # a future stamp is fresh


def test_client_rules_static_cases_never_look_up():
    def lookup(key: str):
        raise AssertionError("looked up %s" % key)

    assert ClientRules(POLICY, Client(None)).permit(lookup, NOW).rule == "trusted_network"
    assert ClientRules(POLICY, Client("10.1.2.3")).permit(lookup, NOW).rule == "trusted_network"
    assert ClientRules(POLICY, Client("198.51.100.7", "alice")).permit(lookup, NOW).rule == "authenticated"
    assert ClientRules(POLICY, Client("not-an-ip")).permit(lookup, NOW) is None
    no_auth = RcptPolicy(frozenset(), frozenset(), (), False, None)
    assert ClientRules(no_auth, Client("198.51.100.7", "alice")).permit(lambda key: None, NOW) is None


def test_refusal_is_553_for_an_unparsable_address_else_550():
    assert destination(POLICY, "<a b@c>").refusal.rule == "malformed_address"
    assert destination(POLICY, "<bob@remote.example>").refusal.rule == "default_reject"
    assert ClientRules(POLICY, Client("198.51.100.7")).decision(
        destination(POLICY, "<a b@c>"), lambda key: None, NOW).reply.code == "553"


def test_client_rules_unavailable_store_tempfails():
    def broken(key: str):
        raise StoreUnavailable("relayers map unreadable")

    rules = ClientRules(POLICY, Client("198.51.100.7"))
    assert rules.decision(destination(POLICY, "<bob@remote.example>"), broken, NOW).rule == "relayers_unavailable"
    assert rules.decision(destination(POLICY, "<bob@local.test>"), broken, NOW).rule == "local_domain"


SENDERS = ["<>", "< >", "<alice@Spam.Example>", "<alice+tag@mail.spam.example>", "<postmaster>",
           "<a@b@c>", "<user%spam.example>", "<x@[192.0.2.1]>", "<x@ok.example>"]


@pytest.mark.parametrize("sender", SENDERS)
def test_mail_plan_and_check_keys_agree_with_check_mail(sender):
    listed = {"spam.example", "[192.0.2.1]"}
    plan = mail_plan(sender)
    if isinstance(plan, tuple):
        assert list(plan) == sender_keys(sender)
        decision = check_keys(plan, listed.__contains__)
    else:
        assert sender_keys(sender) == []
        decision = plan
    assert decision == check_mail(sender, listed.__contains__)


@pytest.mark.parametrize("sender", SENDERS)
def test_check_listed_agrees_with_check_keys(sender):
    listed = frozenset({"spam.example", "[192.0.2.1]", "alice+tag@mail.spam.example"})
    plan = mail_plan(sender)
    if isinstance(plan, tuple):
        assert check_listed(plan, listed) == check_keys(plan, listed.__contains__)
        assert check_listed(plan, frozenset()).rule == "sender_ok"


def test_check_keys_lookups_are_made_each_time():
    plan = mail_plan("<alice@spam.example>")
    assert isinstance(plan, tuple)
    assert check_keys(plan, {"spam.example"}.__contains__).rule == "spammers"
    assert check_keys(plan, set().__contains__).rule == "sender_ok"

    def broken(key: str) -> bool:
        raise StoreUnavailable("spammers map unreadable")

    assert check_keys(plan, broken).rule == "spammers_unavailable"
