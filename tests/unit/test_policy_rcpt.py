"""The RCPT decision: sendmail's check_rcpt order, table-driven (notes/check-rcpt.md).

Each row runs through policy.session.Session, the decision path the milter
uses; the relayers map is held in memory (milterpath.MapSources).
"""

from __future__ import annotations

import ipaddress

import pytest
from milterpath import NOW, MapSources, decide as run, session

from relaymilter import replies
from relaymilter.errors import StoreUnavailable
from relaymilter.policy import Continue, RcptPolicy, Reject, Session, TempFail
from relaymilter.policy.rcpt import UNKNOWN_CLIENT

UNKNOWN = "198.51.100.7"
RELAYER = "203.0.113.5"

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


def sources(entries: dict[str, int] | None = None, error: Exception | None = None,
            policy: RcptPolicy = POLICY) -> MapSources:
    return MapSources(policy, entries, error=error)


def relayers(policy: RcptPolicy = POLICY) -> MapSources:
    return sources({RELAYER: int(NOW) - 30}, policy=policy)


def decide(rcpt: str, client: str | None = UNKNOWN, policy: RcptPolicy = POLICY,
           lookup: MapSources | None = None, auth: str | None = None) -> Continue | Reject | TempFail:
    return run(rcpt, lookup or sources(policy=policy), client, auth).decision


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
    lookup = sources()
    assert decide(rcpt, lookup=lookup) == expected
    if expected in (LOCAL, RELAY_DOMAIN):
        assert lookup.asked == []
    else:
        assert lookup.asked == ["198.51.100.7"]


def test_notes_table_authorised_client_relays_to_the_unwrapped_address() -> None:
    verdict = run("<user%remote.test@mail.local.test>", relayers(), RELAYER)
    assert verdict.decision == Continue("relayers_db")
    assert str(verdict.destination.resolved) == "user@remote.test"


@pytest.mark.parametrize(
    "rcpt, expected",
    [
        ("<user@Mail.Local.Test>", LOCAL),
        ("<User@local.test>", LOCAL),
        ("<user>", LOCAL),
        ("<Postmaster>", LOCAL),
        ('<"john doe"@local.test>', LOCAL),
        ("<user@[192.0.2.10]>", LOCAL),
        ("<user@[IPv6:2001:DB8::10]>", LOCAL),
        # sendmail's class w holds one spelling: another one (or the IPv4-mapped form) is sent
        # out by SMTP, so it is a relay attempt here too
        ("<user@[IPv6:2001:DB8:0::10]>", DENIED),
        ("<user@[IPv6:::ffff:192.0.2.10]>", DENIED),
        ("<user@local.test..>", LOCAL),
        ("<user@local.test\u00a0>", DENIED),
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
    verdict = run("<user%remote.test@local.test>", sources(policy=plain))
    assert str(verdict.destination.resolved) == "user%remote.test@local.test"


@pytest.mark.parametrize(
    "addr, expected",
    [
        ("", DENIED),
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
def test_trusted_networks(addr: str, expected: object) -> None:
    lookup = sources()
    assert decide("<user@remote.test>", client=addr, lookup=lookup) == expected
    if expected != DENIED:
        assert lookup.asked == []


def test_ipv4_mapped_client_is_looked_up_as_the_dotted_quad() -> None:
    lookup = sources({"203.0.113.5": int(NOW)})
    assert decide("<user@remote.test>", client="::ffff:203.0.113.5", lookup=lookup) == Continue("relayers_db")
    assert lookup.asked == ["203.0.113.5"]


def test_ipv6_relayer() -> None:
    lookup = sources({"2001:db8:5::7": int(NOW)})
    assert decide("<user@remote.test>", client="2001:db8:5::7", lookup=lookup) == Continue("relayers_db")


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
    assert decide("<user@remote.test>", policy=policy, auth=authen) == expected


def test_authenticated_but_not_permitted_still_relays_from_relayers_db() -> None:
    policy = RcptPolicy(POLICY.local_domains, POLICY.relay_domains, (), False, None)
    assert decide("<user@remote.test>", client=RELAYER, policy=policy, auth="alice",
                  lookup=relayers(policy)) == Continue("relayers_db")


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
    lookup = sources({"203.0.113.5": int(stamp)}, policy=policy)
    assert decide("<user@remote.test>", client=RELAYER, policy=policy, lookup=lookup) == expected


def test_no_window_presence_suffices_however_old() -> None:
    lookup = sources({"203.0.113.5": 0})
    assert decide("<user@remote.test>", client=RELAYER, lookup=lookup) == Continue("relayers_db")


def test_unreadable_relayers_tempfails_relay_attempts_only() -> None:
    lookup = sources(error=StoreUnavailable("relayers.db: corrupt"))
    unavailable = TempFail(replies.RELAY_CHECK_UNAVAILABLE, "relayers_unavailable")
    assert decide("<user@remote.test>", client=RELAYER, lookup=lookup) == unavailable
    assert decide("<user%remote.test@local.test>", client=RELAYER, lookup=lookup) == unavailable
    assert len(lookup.asked) == 2
    assert decide("<user@local.test>", client=RELAYER, lookup=lookup) == LOCAL
    assert decide("<postmaster>", client=RELAYER, lookup=lookup) == LOCAL
    assert decide("<user@sub.relayed.test>", client=RELAYER, lookup=lookup) == RELAY_DOMAIN
    assert len(lookup.asked) == 2  # no lookup for local or relay-domain recipients
    # Trusted clients never need the map either.
    assert decide("<user@remote.test>", client="127.0.0.1", lookup=lookup) == Continue("trusted_network")
    assert len(lookup.asked) == 2


def test_other_lookup_errors_propagate_for_the_adapter_to_tempfail() -> None:
    lookup = sources(error=RuntimeError("bug"))
    with pytest.raises(RuntimeError):
        decide("<user@remote.test>", client=RELAYER, lookup=lookup)


def test_the_sender_is_not_an_input_and_a_local_sender_grants_nothing() -> None:
    for sender in ("<user@local.test>", "<postmaster@[192.0.2.10]>", "<>", "<user>"):
        s = Session(sources(), clock=lambda: NOW)
        s.connect(POLICY.client(UNKNOWN))
        assert s.mail(sender, None) in (Continue("sender_ok"), Continue("null_sender"))
        assert s.rcpt("<user@remote.test>").decision == DENIED


def test_a_session_with_no_connect_is_a_stranger() -> None:
    lookup = sources()
    s = Session(lookup, clock=lambda: NOW)
    assert s.client is UNKNOWN_CLIENT
    assert s.rcpt("<user@remote.test>").decision == DENIED            # RCPT before MAIL: decided all the same
    s.mail("<a@local.test>", None)
    assert s.rcpt("<user@remote.test>").decision == DENIED
    assert s.rcpt("<user@local.test>").decision == LOCAL
    assert lookup.asked == []                                           # no address: nothing to look up


@pytest.mark.parametrize("trust, expected", [(False, DENIED), (True, Continue("trusted_network"))])
def test_a_local_socket_is_trusted_only_when_configured(trust: bool, expected: object) -> None:
    policy = RcptPolicy(POLICY.local_domains, POLICY.relay_domains, POLICY.trusted_networks, True, None,
                        trust_local_socket=trust)
    s = Session(sources(policy=policy), clock=lambda: NOW)
    s.connect(policy.local_client())
    s.mail("<a@local.test>", None)
    assert s.rcpt("<user@remote.test>").decision == expected


def test_relayers_read_once_per_transaction() -> None:
    lookup = relayers()
    s = session(lookup, RELAYER)
    for rcpt in ("<a@remote.test>", "<b@remote.test>", "<c@local.test>", "<d@else.test>"):
        assert s.rcpt(rcpt).decision.rule in ("relayers_db", "local_domain")
    assert lookup.asked == [RELAYER]
    s.mail("<a@example.net>", None)
    lookup.entries.clear()
    assert s.rcpt("<a@remote.test>").decision == DENIED       # the next MAIL reads the map again
    assert lookup.asked == [RELAYER] * 2


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
    verdict = run(rcpt, sources())
    assert verdict.decision == MALFORMED
    assert verdict.destination.resolved is None and verdict.destination.error
    # Clients that may relay get through: the MTA judges the syntax.
    assert decide(rcpt, client="127.0.0.1") == Continue("trusted_network")
    assert decide(rcpt, client=RELAYER, lookup=relayers()) == Continue("relayers_db")
    unreadable = sources(error=StoreUnavailable("x"))
    assert decide(rcpt, lookup=unreadable).rule == "relayers_unavailable"


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
    verdict = run('<"user@Remote.Test."@LOCAL.test>', sources())
    assert verdict.decision == DENIED
    resolved = verdict.destination.resolved
    assert resolved is not None
    assert (resolved.local_part, resolved.domain) == ("user", "remote.test")
    assert verdict.destination.error is None
