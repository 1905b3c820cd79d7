"""MAIL FROM through the decision path, sender_keys, normalize_entry: the spammers list, access-db style."""

from __future__ import annotations

import pytest

from relaymilter import replies
from relaymilter.errors import StoreUnavailable
from milterpath import MapSources, mail, policy, session

from relaymilter.address.keys import normalize_entry, sender_keys
from relaymilter.policy import Continue, Reject, TempFail

LISTED = Reject(replies.ACCESS_DENIED, "spammers")
OK = Continue("sender_ok")


def listed(*lines: str) -> frozenset[str]:
    """A spammers map built from file lines through normalize_entry."""
    return frozenset(normalize_entry(line) for line in lines)


@pytest.mark.parametrize(
    "sender, keys",
    [
        ("<bob@mail.spam.example>", ["bob@mail.spam.example", "mail.spam.example", "spam.example", "example"]),
        ("<Bob@Mail.SPAM.example.>", ["bob@mail.spam.example", "mail.spam.example", "spam.example", "example"]),
        ("bob@spam.example", ["bob@spam.example", "spam.example", "example"]),
        ("<bob+list@spam.example>", ["bob+list@spam.example", "bob@spam.example", "spam.example", "example"]),
        ("<+x@spam.example>", ["+x@spam.example", "spam.example", "example"]),
        ('<"bob"@spam.example>', ["bob@spam.example", "spam.example", "example"]),
        ('<"bob smith"@spam.example>', ["bob smith@spam.example", "spam.example", "example"]),
        ("<@relay.example:bob@spam.example>", ["bob@spam.example", "spam.example", "example"]),
        ("<bob%spam.example>", ["bob@spam.example", "spam.example", "example"]),
        ("<spam.example!bob>", ["bob@spam.example", "spam.example", "example"]),
        ("<bob@[192.0.2.66]>", ["bob@[192.0.2.66]", "[192.0.2.66]"]),
        ("<bob@[IPv6:2001:DB8:0::66]>", ["bob@[ipv6:2001:db8::66]", "[ipv6:2001:db8::66]"]),
        ("<bob@localhost>", ["bob@localhost", "localhost"]),
        ("<>", []),
        ("", []),
        ("<bob>", []),
        ("<bob@spam.example@x.example>", []),
        ("<bob\x00@spam.example>", []),
    ],
)
def test_sender_keys(sender: str, keys: list[str]) -> None:
    assert sender_keys(sender) == keys


@pytest.mark.parametrize(
    "entries, sender, expected",
    [
        # a host entry blocks every user of it and of its subdomains
        (["spam.example"], "<anyone@spam.example>", LISTED),
        (["spam.example"], "<x@mail.spam.example>", LISTED),
        (["spam.example"], "<x@a.b.spam.example>", LISTED),
        (["spam.example"], "<x@notspam.example>", OK),
        (["spam.example"], "<x@spam.example.org>", OK),
        (["mail.spam.example"], "<x@spam.example>", OK),
        # a user@host entry blocks that user only
        (["bob@spam.example"], "<bob@spam.example>", LISTED),
        (["bob@spam.example"], "<alice@spam.example>", OK),
        (["bob@spam.example"], "<bob@mail.spam.example>", OK),
        (["bob@spam.example"], "<bob+tag@spam.example>", LISTED),
        (["bob+tag@spam.example"], "<bob@spam.example>", OK),
        # case, quotes, trailing dots, either side
        (["Bob@SPAM.Example."], "<BOB@spam.EXAMPLE>", LISTED),
        (["SPAM.EXAMPLE"], "<x@Spam.Example.>", LISTED),
        (["bob@spam.example"], '<"bob"@spam.example>', LISTED),
        (['"bob smith"@spam.example'], '<"bob smith"@spam.example>', LISTED),
        # routing does not hide a listed sender
        (["spam.example"], "<@relay.example:bob@spam.example>", LISTED),
        (["spam.example"], "<bob%spam.example>", LISTED),
        # address literals: as the literal, IP normalised, no parent walk
        (["[192.0.2.66]"], "<x@[192.0.2.66]>", LISTED),
        (["192.0.2.66"], "<x@[192.0.2.66]>", LISTED),
        (["[IPv6:2001:db8::66]"], "<x@[IPv6:2001:DB8:0:0::66]>", LISTED),
        (["2001:db8::66"], "<x@[ipv6:2001:db8::66]>", LISTED),
        (["[192.0.2.66]"], "<x@[192.0.2.67]>", OK),
        (["x@[192.0.2.66]"], "<x@[IPv6:::ffff:192.0.2.66]>", LISTED),
        # SMTPUTF8
        (["b\u00fccher.example"], "<j\u00f6rg@B\u00fccher.Example>", LISTED),
        (["j\u00f6rg@b\u00fccher.example"], "<J\u00f6rg@b\u00fccher.example>", LISTED),
        # nothing listed
        ([], "<bob@spam.example>", OK),
    ],
)
def test_mail_decision(entries: list[str], sender: str, expected: object) -> None:
    assert mail(sender, listed(*entries)) == expected


def unreadable() -> MapSources:
    return MapSources(policy(set(), set()), spammers_error=StoreUnavailable("spammers.db: corrupt"))


@pytest.mark.parametrize("sender", ["<>", "", " <> ", "< >"])
def test_null_sender_is_never_refused_and_never_looked_up(sender: str) -> None:
    sources = unreadable()
    s = session(sources, sender="<x@example.net>")
    sources.spam_asked = 0
    assert s.mail(sender, None) == Continue("null_sender")
    assert sources.spam_asked == 0


def test_unreadable_map_tempfails() -> None:
    unavailable = TempFail(replies.SENDER_CHECK_UNAVAILABLE, "spammers_unavailable")
    s = session(unreadable(), sender="<>")
    assert s.mail("<bob@spam.example>", None) == unavailable


def test_unqualified_and_unparseable_senders_pass_without_lookups() -> None:
    sources = unreadable()
    s = session(sources, sender="<>")
    assert s.mail("<bob>", None) == OK
    assert s.mail("<bob@spam.example@x.example>", None) == Continue("sender_unparsed")
    assert s.mail("<\x00>", None) == Continue("sender_unparsed")
    assert s.mail("<" + "a" * 1000 + "@spam.example>", None) == Continue("sender_unparsed")
    assert sources.spam_asked == 0


@pytest.mark.parametrize(
    "line, key",
    [
        ("spam.example", "spam.example"),
        ("  SPAM.Example.  \n", "spam.example"),
        ("Bob@Spam.Example", "bob@spam.example"),
        ("<bob@spam.example>", "bob@spam.example"),
        ('"bob"@spam.example', "bob@spam.example"),
        ("bob%spam.example", "bob@spam.example"),
        ("[192.0.2.66]", "[192.0.2.66]"),
        ("192.0.2.66", "[192.0.2.66]"),
        ("2001:DB8::66", "[ipv6:2001:db8::66]"),
        ("[IPv6:2001:db8:0::66]", "[ipv6:2001:db8::66]"),
        ("::ffff:192.0.2.66", "[192.0.2.66]"),
        ("x@[192.0.2.66]", "x@[192.0.2.66]"),
        ("localhost", "localhost"),
        ("b\u00fccher.example", "b\u00fccher.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("under_score.example", "under_score.example"),
    ],
)
def test_normalize_entry(line: str, key: str) -> None:
    assert normalize_entry(line) == key
    # The key a lookup tries for a sender of that host/address is the same string.
    sender = "<someone@%s>" % key if "@" not in key else "<%s>" % key
    assert key in sender_keys(sender)


@pytest.mark.parametrize(
    "line, reason",
    [
        ("", "empty"),
        ("   ", "empty"),
        (".spam.example", "leading dot"),
        ("*.spam.example", "wildcard"),
        ("spam..example", "invalid host name"),
        ("spam example", "invalid host name"),
        ("bob@", "not user@host"),
        ("bob", None),  # a one-label host name is allowed (e.g. localhost)
        ("@spam.example", "user address required"),
        ("bob@spam.example@x.example", "invalid route address"),
        ("spam/example", "invalid character"),
        ("bob@spam=example", "invalid character"),
        ("[not-an-ip]", "invalid address literal"),
        ("spam\x00example", "NUL"),
        ("a" * 600, "too long"),
    ],
)
def test_normalize_entry_refuses(line: str, reason: str | None) -> None:
    if reason is None:
        assert normalize_entry(line) == line
        return
    with pytest.raises(ValueError) as info:
        normalize_entry(line)
    assert reason in str(info.value)
