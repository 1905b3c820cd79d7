"""The dnsbl step of the RCPT decision (policy.session): who is looked up, when, and what follows.

The lists themselves are a table here (ListsTable); the real lookups through
a DNS server are tested in tests/integration/test_dnsbl_lookup.py and, end to
end, test_sendmail_dnsbl.py.
"""

from __future__ import annotations

from typing import Optional

import pytest

from milterpath import NOW, MapSources, policy, session
from relaymilter import replies
from relaymilter.errors import StoreUnavailable
from relaymilter.address.resolve import Resolved
from relaymilter.policy.decision import Continue, Reject, TempFail
from relaymilter.policy.verdict import Blocklisted

LISTED_REPLY = replies.Reply("554", "5.7.1", "Service unavailable; Client host [198.51.100.7] blocked using bl.test")
LISTED = Blocklisted(Reject(LISTED_REPLY, "dnsbl"), "site=bl.test answer=127.0.0.2 weight=1/1")
CLEAN = Blocklisted(None, "dnsbl=pass weight=0/1")
FAILED = Blocklisted(TempFail(replies.DNSBL_UNAVAILABLE, "dnsbl_unavailable"), "weight=0/1 dnsbl_error site=x (timeout)")


class ListsTable:
    """policy.verdict.Blocklists answering from a dict; records every client asked about."""

    def __init__(self, answers: dict[str, Blocklisted]) -> None:
        self.answers = answers
        self.asked: list[str] = []
        self.kept: dict[str, Blocklisted] = {}      # answers the lists keep (known(): no DNS)

    def exempt(self, resolved: Optional[Resolved]) -> bool:
        return resolved is not None and resolved.local_part.lower() in ("postmaster", "abuse")

    def check(self, key: str) -> Blocklisted:
        self.asked.append(key)
        return self.answers.get(key, CLEAN)

    def known(self, key: str) -> Optional[Blocklisted]:
        return self.kept.get(key)


POLICY = policy({"local.test"}, {"relayed.test"}, trusted=("127.0.0.0/8", "192.0.2.0/24"))


def sources(answers: dict[str, Blocklisted], relayers: Optional[dict[str, int]] = None,
            error: Optional[Exception] = None) -> MapSources:
    src = MapSources(POLICY, relayers or {}, error=error)
    src.blocklists = ListsTable(answers)
    return src


@pytest.mark.parametrize("rcpt,rule", [("<alice@local.test>", "dnsbl"), ("<bob@relayed.test>", "dnsbl"),
                                       ("<postmaster>", "local_domain"), ("<Abuse@local.test>", "local_domain"),
                                       ("<bob@remote.example>", "default_reject")])
def test_a_listed_stranger(rcpt, rule):
    src = sources({"198.51.100.7": LISTED})
    verdict = session(src).rcpt(rcpt)
    assert verdict.decision.rule == rule
    # only a recipient that would otherwise be accepted, and not an exempt one, costs a lookup
    assert src.blocklists.asked == (["198.51.100.7"] if rule == "dnsbl" else [])
    if rule == "dnsbl":
        assert verdict.decision.reply == LISTED_REPLY and verdict.note == LISTED.note


@pytest.mark.parametrize("addr,auth,relayers", [("192.0.2.9", None, {}), ("198.51.100.7", "alice", {}),
                                                ("198.51.100.7", None, {"198.51.100.7": int(NOW)})])
def test_users_are_never_looked_up(addr, auth, relayers):
    src = sources({addr: LISTED}, relayers)
    s = session(src, addr, auth)
    for rcpt in ("<alice@local.test>", "<bob@relayed.test>", "<bob@remote.example>"):
        assert type(s.rcpt(rcpt).decision) is Continue
    assert src.blocklists.asked == []


def test_an_expired_relayers_entry_is_a_stranger_again():
    src = sources({"198.51.100.7": LISTED}, {"198.51.100.7": int(NOW) - 3 * 3600})
    src.policy = policy({"local.test"}, set(), window=60)
    assert session(src).rcpt("<alice@local.test>").decision.rule == "dnsbl"


def test_one_lookup_per_connection():
    src = sources({"198.51.100.7": CLEAN})
    s = session(src)
    for rcpt in ("<a@local.test>", "<b@local.test>", "<c@relayed.test>"):
        v = s.rcpt(rcpt)
        assert type(v.decision) is Continue and v.note == CLEAN.note
    s.mail("<other@example.net>", None)             # a new transaction: still the same connection
    s.rcpt("<d@local.test>")
    assert src.blocklists.asked == ["198.51.100.7"]
    s.connect(src.policy.client("198.51.100.7"))    # a new connection asks again (the lists' cache is theirs)
    s.mail("<a@example.net>", None)
    s.rcpt("<d@local.test>")
    assert src.blocklists.asked == ["198.51.100.7"] * 2


def test_auth_later_in_the_connection_stops_the_lookups():
    src = sources({"198.51.100.7": LISTED})
    s = session(src)
    assert s.rcpt("<a@local.test>").decision.rule == "dnsbl"
    s.mail("<a@example.net>", "alice")
    assert s.rcpt("<a@local.test>").decision.rule == "local_domain"


def test_a_failed_lookup_tempfails_and_an_unreadable_relayers_db_never_refuses_for_good():
    assert session(sources({"198.51.100.7": FAILED})).rcpt("<a@local.test>").decision.rule == "dnsbl_unavailable"
    listed = session(sources({"198.51.100.7": LISTED}, error=StoreUnavailable("gone"))).rcpt("<a@local.test>")
    assert listed.decision.rule == "relayers_unavailable" and listed.decision.reply.code == "451"
    clean = session(sources({}, error=StoreUnavailable("gone"))).rcpt("<a@local.test>")
    assert clean.decision.rule == "local_domain"


def test_a_client_without_an_address_is_not_looked_up():
    src = sources({})
    s = session(src, None)
    assert s.rcpt("<a@local.test>").decision.rule == "local_domain"
    assert src.blocklists.asked == []


def test_no_lists_no_step():
    src = MapSources(POLICY, {})
    assert session(src).rcpt("<a@local.test>").decision == Continue("local_domain")


def test_a_kept_clean_answer_needs_no_relayers_lookup_a_kept_listing_does():
    src = sources({})
    src.blocklists.kept["198.51.100.7"] = CLEAN
    assert session(src).rcpt("<a@local.test>").note == CLEAN.note
    assert src.asked == [] and src.blocklists.asked == []
    src = sources({}, {"198.51.100.7": int(NOW)})
    src.blocklists.kept["198.51.100.7"] = LISTED               # kept, but the client is a user
    assert session(src).rcpt("<a@local.test>").decision.rule == "local_domain"
    assert src.asked == ["198.51.100.7"]
