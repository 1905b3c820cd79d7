"""check_rcpt: sendmail's check_rcpt order, table-driven (notes/check-rcpt.md)."""

from __future__ import annotations

import inspect
import ipaddress
from collections.abc import Callable

import pytest

from relaymilter import replies
from relaymilter.errors import StoreUnavailable
from relaymilter.policy import (
    Client,
    Continue,
    RcptPolicy,
    Reject,
    TempFail,
    check_mail,
    check_rcpt,
    evaluate_rcpt,
)

NOW = 1_700_000_000.0
UNKNOWN = Client("198.51.100.7")
RELAYER = Client("203.0.113.5")

# The configuration the table in notes/check-rcpt.md was observed with.
POLICY = RcptPolicy(
    local_domains=frozenset({"local.test", "mail.local.test", "[192.0.2.10]", "[ipv6:2001:db8::10]"}),
    relay_domains=frozenset({"relayed.test"}),
    trusted_networks=(
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("10.1.0.0/16"),
        ipaddress.ip_network("2001:db8:abcd::/48"),
    ),
    permit_authenticated=True,
    window=None,
)


class CountingLookup:
    """A relayers map held in a dict that counts the questions asked."""

    def __init__(self, entries: dict[str, int] | None = None, error: Exception | None = None) -> None:
        self.entries = entries or {}
        self.error = error
        self.asked: list[str] = []

    def __call__(self, ip: str) -> int | None:
        self.asked.append(ip)
        if self.error is not None:
            raise self.error
        return self.entries.get(ip)


def relayers() -> CountingLookup:
    return CountingLookup({"203.0.113.5": int(NOW) - 30})


def decide(rcpt: str, client: Client = UNKNOWN, policy: RcptPolicy = POLICY,
           lookup: Callable[[str], int | None] | None = None) -> Continue | Reject | TempFail:
    return check_rcpt(policy, client, rcpt, lookup or CountingLookup(), NOW)


DENIED = Reject(replies.RELAYING_DENIED, "default_reject")
LOCAL = Continue("local_domain")
RELAY_DOMAIN = Continue("relay_domain")


# Every row of the table observed on a real sendmail (client not authorised).
@pytest.mark.parametrize(
    "rcpt, expected",
    [
        ("<user@remote.test>", DENIED),
        ("user@remote.test", DENIED),
        ("<user@remote.test.>", DENIED),
        ("<user@local.test>", LOCAL),
        ("<user@LOCAL.TEST>", LOCAL),
        ("<user@local.test.>", LOCAL),
        ("<postmaster>", LOCAL),
        ("<user%remote.test@local.test>", DENIED),
        ("<user%remote.test>", DENIED),
        ("<remote.test!user@local.test>", DENIED),
        ("<remote.test!user>", DENIED),
        ("<@local.test:user@remote.test>", DENIED),
        ("<@a,@b:user@remote.test>", DENIED),
        ('<"user@remote.test"@local.test>', DENIED),
        ('<"user@remote.test">', DENIED),
        ('<"user%remote.test">', DENIED),
        ("<user@[192.0.2.1]>", DENIED),
        ("<user@[IPv6:2001:db8::1]>", DENIED),
        ("<user@relayed.test>", RELAY_DOMAIN),
        ("<user@sub.relayed.test>", RELAY_DOMAIN),
    ],
)
def test_notes_table_unknown_client(rcpt: str, expected: object) -> None:
    lookup = CountingLookup()
    assert decide(rcpt, lookup=lookup) == expected
    if expected in (LOCAL, RELAY_DOMAIN):
        assert lookup.asked == []
    else:
        assert lookup.asked == ["198.51.100.7"]


def test_notes_table_authorised_client_relays_to_the_unwrapped_address() -> None:
    verdict = evaluate_rcpt(POLICY, RELAYER, "<user%remote.test@mail.local.test>", relayers(), NOW)
    assert verdict.decision == Continue("relayers_db")
    assert str(verdict.resolved) == "user@remote.test"


@pytest.mark.parametrize(
    "rcpt, expected",
    [
        ("<user@Mail.Local.Test>", LOCAL),
        ("<User@local.test>", LOCAL),
        ("<user>", LOCAL),
        ("<Postmaster>", LOCAL),
        ('<"john doe"@local.test>', LOCAL),
        ("<user@[192.0.2.10]>", LOCAL),
        ("<user@[IPv6:2001:DB8:0::10]>", LOCAL),
        ("<user@[IPv6:::ffff:192.0.2.10]>", LOCAL),
        ("<user@[192.0.2.11]>", DENIED),
        ("<user@other.local.test>", DENIED),  # class w has no subdomain match
        ("<user@local.test.evil.example>", DENIED),
        ("<user@evillocal.test>", DENIED),
        ("<user@RELAYED.TEST.>", RELAY_DOMAIN),
        ("<user@a.b.relayed.test>", RELAY_DOMAIN),
        ("<user@notrelayed.test>", DENIED),
        ("<user@relayed.test.evil.example>", DENIED),
        ("<user%remote.test@relayed.test>", DENIED),  # ParseRecipient unwraps $=R too
        ("<user%other.relayed.test@local.test>", RELAY_DOMAIN),
        ("<user%local.test@relayed.test>", LOCAL),
        ("<user@loca\u212a.test>", DENIED),  # Kelvin sign is not a k
    ],
)
def test_local_relay_case_literal(rcpt: str, expected: object) -> None:
    assert decide(rcpt) == expected


def test_relay_subdomains_off_matches_the_exact_host_only() -> None:
    exact = RcptPolicy(POLICY.local_domains, POLICY.relay_domains, (), True, None, relay_subdomains=False)
    assert decide("<user@relayed.test>", policy=exact) == RELAY_DOMAIN
    assert decide("<user@sub.relayed.test>", policy=exact) == DENIED


def test_percent_hack_and_bang_paths_off_keep_the_address_local() -> None:
    plain = RcptPolicy(POLICY.local_domains, POLICY.relay_domains, (), True, None,
                       percent_hack=False, bang_paths=False)
    assert decide("<user%remote.test@local.test>", policy=plain) == LOCAL
    assert decide("<remote.test!user@local.test>", policy=plain) == LOCAL
    assert decide("<user%remote.test>", policy=plain) == LOCAL
    assert decide("<remote.test!user>", policy=plain) == LOCAL
    # Quoting still hides a real @, which is never a plain character.
    assert decide('<"user@remote.test"@local.test>', policy=plain) == DENIED
    verdict = evaluate_rcpt(plain, UNKNOWN, "<user%remote.test@local.test>", CountingLookup(), NOW)
    assert str(verdict.resolved) == "user%remote.test@local.test"


@pytest.mark.parametrize(
    "addr, expected",
    [
        (None, Continue("trusted_network")),
        ("", Continue("trusted_network")),
        ("127.0.0.1", Continue("trusted_network")),
        ("127.45.6.7", Continue("trusted_network")),
        ("::1", Continue("trusted_network")),
        ("10.1.255.254", Continue("trusted_network")),
        ("10.2.0.1", DENIED),
        ("2001:db8:abcd:ffff::1", Continue("trusted_network")),
        ("2001:db8:abce::1", DENIED),
        ("::ffff:10.1.2.3", Continue("trusted_network")),  # IPv4-mapped, not yet normalised
        ("::ffff:10.2.2.3", DENIED),
        ("not-an-ip", DENIED),
    ],
)
def test_trusted_networks(addr: str | None, expected: object) -> None:
    lookup = CountingLookup()
    assert decide("<user@remote.test>", client=Client(addr), lookup=lookup) == expected
    if expected != DENIED:
        assert lookup.asked == []


def test_ipv4_mapped_client_is_looked_up_as_the_dotted_quad() -> None:
    lookup = CountingLookup({"203.0.113.5": int(NOW)})
    assert decide("<user@remote.test>", client=Client("::ffff:203.0.113.5"), lookup=lookup) == Continue("relayers_db")
    assert lookup.asked == ["203.0.113.5"]


def test_ipv6_relayer() -> None:
    lookup = CountingLookup({"2001:db8:5::7": int(NOW)})
    assert decide("<user@remote.test>", client=Client("2001:db8:5::7"), lookup=lookup) == Continue("relayers_db")


@pytest.mark.parametrize(
    "permit, authen, expected",
    [
        (True, "alice", Continue("authenticated")),
        (False, "alice", DENIED),
        (True, "", DENIED),
        (True, None, DENIED),
    ],
)
def test_authenticated(permit: bool, authen: str | None, expected: object) -> None:
    policy = RcptPolicy(POLICY.local_domains, POLICY.relay_domains, (), permit, None)
    assert decide("<user@remote.test>", client=Client("198.51.100.7", authen), policy=policy) == expected


def test_authenticated_but_not_permitted_still_relays_from_relayers_db() -> None:
    policy = RcptPolicy(POLICY.local_domains, POLICY.relay_domains, (), False, None)
    assert decide("<user@remote.test>", client=Client("203.0.113.5", "alice"), policy=policy,
                  lookup=relayers()) == Continue("relayers_db")


WINDOW = 60


@pytest.mark.parametrize(
    "stamp, expected",
    [
        (NOW - WINDOW * 60, Continue("relayers_db")),  # exactly at the edge
        (NOW - WINDOW * 60 - 1, DENIED),  # one second older
        (NOW - 30, Continue("relayers_db")),
        (NOW + 86400, Continue("relayers_db")),  # future: alive until then + window
        (0, DENIED),
    ],
)
def test_window(stamp: float, expected: object) -> None:
    policy = RcptPolicy(POLICY.local_domains, POLICY.relay_domains, (), True, WINDOW)
    lookup = CountingLookup({"203.0.113.5": int(stamp)})
    assert decide("<user@remote.test>", client=RELAYER, policy=policy, lookup=lookup) == expected


def test_no_window_presence_suffices_however_old() -> None:
    lookup = CountingLookup({"203.0.113.5": 0})
    assert decide("<user@remote.test>", client=RELAYER, lookup=lookup) == Continue("relayers_db")


def test_unreadable_relayers_tempfails_relay_attempts_only() -> None:
    lookup = CountingLookup(error=StoreUnavailable("relayers.db: corrupt"))
    unavailable = TempFail(replies.RELAY_CHECK_UNAVAILABLE, "relayers_unavailable")
    assert decide("<user@remote.test>", client=RELAYER, lookup=lookup) == unavailable
    assert decide("<user%remote.test@local.test>", client=RELAYER, lookup=lookup) == unavailable
    assert len(lookup.asked) == 2
    assert decide("<user@local.test>", client=RELAYER, lookup=lookup) == LOCAL
    assert decide("<postmaster>", client=RELAYER, lookup=lookup) == LOCAL
    assert decide("<user@sub.relayed.test>", client=RELAYER, lookup=lookup) == RELAY_DOMAIN
    assert len(lookup.asked) == 2  # no lookup for local or relay-domain recipients
    # Trusted clients never need the map either.
    assert decide("<user@remote.test>", client=Client("127.0.0.1"), lookup=lookup) == Continue("trusted_network")
    assert len(lookup.asked) == 2


def test_other_lookup_errors_propagate_for_the_adapter_to_tempfail() -> None:
    lookup = CountingLookup(error=RuntimeError("bug"))
    with pytest.raises(RuntimeError):
        decide("<user@remote.test>", client=RELAYER, lookup=lookup)


def test_the_sender_is_not_an_input_and_a_local_sender_grants_nothing() -> None:
    params = list(inspect.signature(check_rcpt).parameters)
    assert params == ["policy", "client", "rcpt", "relay_lookup", "now"]
    for sender in ("<user@local.test>", "<postmaster@[192.0.2.10]>", "<>", "<user>"):
        assert check_mail(sender, lambda key: False) in (Continue("sender_ok"), Continue("null_sender"))
        assert decide("<user@remote.test>") == DENIED


MALFORMED = Reject(replies.MALFORMED_ADDRESS, "malformed_address")


@pytest.mark.parametrize(
    "rcpt",
    [
        "",
        "<>",
        "<",
        ">",
        "<<user@remote.test>>",
        "<user@remote.test@local.test>",
        "user\x00@local.test",
        "<user@local.test>\x00",
        "<user\r\n@local.test>",
        "<" + "a" * 994 + "@local.test>",
        "<" + "x" * 1000 + ">",
        '<"unterminated@local.test>',
        "<user@[not-an-ip]>",
        "<user@>>",
        "<user@(unclosed>",
        "<@local.test>",
        "<@local.test:>",
        "<user@local..test>",
        "<user@.local.test>",
        "<list:;>",
        "<a,b@local.test>",
        "<user@local.test\udcff>",
    ],
)
def test_bad_input_is_a_decision_never_an_exception(rcpt: str) -> None:
    lookup = CountingLookup()
    verdict = evaluate_rcpt(POLICY, UNKNOWN, rcpt, lookup, NOW)
    assert verdict.decision == MALFORMED
    assert verdict.resolved is None and verdict.error
    # Clients that may relay get through: the MTA judges the syntax.
    assert check_rcpt(POLICY, Client("127.0.0.1"), rcpt, lookup, NOW) == Continue("trusted_network")
    assert check_rcpt(POLICY, RELAYER, rcpt, relayers(), NOW) == Continue("relayers_db")
    unreadable = CountingLookup(error=StoreUnavailable("x"))
    assert check_rcpt(POLICY, UNKNOWN, rcpt, unreadable, NOW).rule == "relayers_unavailable"


@pytest.mark.parametrize(
    "rcpt, expected",
    [
        ("<j\u00f6rg@local.test>", LOCAL),
        ("<\u7528\u6237@local.test>", LOCAL),
        ("<user@b\u00fccher.example>", DENIED),
        ("<j\u00f6rg%b\u00fccher.example@local.test>", DENIED),
        ("<user@xn--bcher-kva.example>", DENIED),
    ],
)
def test_smtputf8_addresses_are_decided(rcpt: str, expected: object) -> None:
    assert decide(rcpt) == expected


def test_verdict_names_the_resolved_address_for_the_log() -> None:
    verdict = evaluate_rcpt(POLICY, UNKNOWN, '<"user@Remote.Test."@LOCAL.test>', CountingLookup(), NOW)
    assert verdict.decision == DENIED
    assert verdict.resolved is not None
    assert (verdict.resolved.local_part, verdict.resolved.domain) == ("user", "remote.test")
    assert verdict.error is None
