"""address.resolve(): sendmail-style canonicalisation, one row per form."""

from __future__ import annotations

import random

import pytest

from relaymilter.address.resolve import BadAddress, Resolved, normalize_domain, parent_domains, resolve
from relaymilter.address.resolve import MAX_ADDRESS_BYTES, MAX_ROUNDS, dequote, is_null

LOCAL = frozenset({"local.test", "mail.local.test", "[192.0.2.10]"})


def is_local(domain: str) -> bool:
    return domain in LOCAL


def r(text: str, **options: bool) -> tuple[str, str | None]:
    got = resolve(text, is_local, **options)
    return got.local_part, got.domain


@pytest.mark.parametrize(
    "text, local_part, domain",
    [
        # plain, brackets, blanks, case, trailing dots
        ("<user@remote.test>", "user", "remote.test"),
        ("user@remote.test", "user", "remote.test"),
        ("  <user@remote.test>\t", "user", "remote.test"),
        ("< user @ remote.test >", "user", "remote.test"),
        ("<User@REMOTE.Test>", "User", "remote.test"),
        ("<user@remote.test.>", "user", "remote.test"),
        ("<user@LOCAL.TEST.>", "user", "local.test"),
        ("<postmaster>", "postmaster", None),
        ("postmaster", "postmaster", None),
        ("<user@>", "user", None),  # sendmail Parse0: user@ => user
        ("Some Phrase <user@remote.test>", "user", "remote.test"),
        ("<user@remote.test(a (nested) comment)>", "user", "remote.test"),
        ("<first.last+tag@remote.test>", "first.last+tag", "remote.test"),
        # source routes
        ("<@local.test:user@remote.test>", "user", "remote.test"),
        ("<@a,@b:user@remote.test>", "user", "remote.test"),
        ("<@[192.0.2.10]:user@remote.test>", "user", "remote.test"),
        ("<@a.test,@[IPv6:2001:db8::1]:user@local.test>", "user", "local.test"),
        # percent hack
        ("<user%remote.test@local.test>", "user", "remote.test"),
        ("<user%remote.test@[192.0.2.10]>", "user", "remote.test"),
        ("<user%remote.test>", "user", "remote.test"),
        ("<a%b%c.test>", "a%b", "c.test"),  # rightmost % only; c.test is not ours
        ("<a%b%local.test>", "a", "b"),  # ...and then b again once the host is local
        ("<user%remote.test@elsewhere.test>", "user%remote.test", "elsewhere.test"),
        ("<user%remote.test.@local.test>", "user", "remote.test"),
        ("<user%remote.test@>", "user", "remote.test"),
        # bang paths
        ("<remote.test!user>", "user", "remote.test"),
        ("<remote.test!user@local.test>", "user", "remote.test"),
        ("<remote.test!user@[192.0.2.10]>", "user", "remote.test"),
        ("<a!b!user>", "b!user", "a"),  # the first hop is the destination
        ("<local.test!remote.test!user>", "user", "remote.test"),
        ("<local.test!user>", "user", "local.test"),
        ("<remote.test!user@elsewhere.test>", "remote.test!user", "elsewhere.test"),
        ("<local.test!user%remote.test>", "user", "remote.test"),
        # quoting
        ('<"user@remote.test"@local.test>', "user", "remote.test"),
        ('<"user@remote.test">', "user", "remote.test"),
        ('<"user%remote.test">', "user", "remote.test"),
        ('<"remote.test!user">', "user", "remote.test"),
        ('<"user%remote.test"@local.test>', "user", "remote.test"),
        ('<"john doe"@local.test>', "john doe", "local.test"),
        ('<"john doe">', "john doe", None),
        ('<"user@remote.test"@elsewhere.test>', "user@remote.test", "elsewhere.test"),
        ("<user\\@remote.test@local.test>", "user", "remote.test"),
        ('<"a\\"b"@local.test>', 'a"b', "local.test"),
        ('<"@local.test:user@remote.test"@local.test>', "user", "remote.test"),
        # literals
        ("<user@[192.0.2.1]>", "user", "[192.0.2.1]"),
        ("<user@[ 192.0.2.1 ]>", "user", "[192.0.2.1]"),
        # the spelling sendmail's class w compares (letter case aside), not the IP it means
        ("<user@[IPv6:2001:DB8:0:0::1]>", "user", "[ipv6:2001:db8:0:0::1]"),
        ("<user@[ipv6:2001:db8::1]>", "user", "[ipv6:2001:db8::1]"),
        ("<user@[IPv6:::ffff:192.0.2.1]>", "user", "[ipv6:::ffff:192.0.2.1]"),
        # trailing dots: sendmail's canonify drops them all
        ("<user@local.test..>", "user", "local.test"),
        ("<user@local.test...>", "user", "local.test"),
        # only SMTP's blanks are blanks
        ("<user@local.test\u00a0>", "user", "local.test\u00a0"),
        # SMTPUTF8
        ("<j\u00f6rg@b\u00fccher.example>", "j\u00f6rg", "b\u00fccher.example"),
        ("<J\u00d6RG@B\u00dcCHER.EXAMPLE>", "J\u00d6RG", "b\u00dccher.example"),  # ASCII folding only
        ("<user@loca\u212a.test>", "user", "loca\u212a.test"),
    ],
)
def test_resolve(text: str, local_part: str, domain: str | None) -> None:
    assert r(text) == (local_part, domain)


@pytest.mark.parametrize(
    "text, local_part, domain",
    [
        ("<user%remote.test@local.test>", "user%remote.test", "local.test"),
        ("<user%remote.test>", "user%remote.test", None),
        ('<"user%remote.test"@local.test>', "user%remote.test", "local.test"),
        ("<remote.test!user@local.test>", "user", "remote.test"),  # bangs still on
    ],
)
def test_percent_hack_off(text: str, local_part: str, domain: str | None) -> None:
    assert r(text, percent_hack=False) == (local_part, domain)


@pytest.mark.parametrize(
    "text, local_part, domain",
    [
        ("<remote.test!user@local.test>", "remote.test!user", "local.test"),
        ("<remote.test!user>", "remote.test!user", None),
        ("<a!b%remote.test>", "a!b", "remote.test"),
        ('<"user@remote.test"@local.test>', "user", "remote.test"),  # an @ always routes
    ],
)
def test_bang_paths_off(text: str, local_part: str, domain: str | None) -> None:
    assert r(text, bang_paths=False) == (local_part, domain)


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "empty address"),
        ("   ", "empty address"),
        ("<>", "empty address"),
        ("< >", "empty address"),
        ("<", "unbalanced angle brackets"),
        ("<user@remote.test", "unbalanced angle brackets"),
        ("<<user@remote.test>>", "unbalanced angle brackets"),
        ("<user@remote.test@local.test>", "invalid route address"),
        ("user@remote.test@[192.0.2.10]", "invalid route address"),
        ('<"user@remote.test@x.test"@local.test>', "invalid route address"),
        ("<@local.test>", "user address required"),
        ("<@local.test:>", "user address required"),
        ("<@:user@remote.test>", "invalid source route"),
        ("<@a.test;user@remote.test>", "invalid source route"),
        ("<@a.test user@remote.test>", "unquoted blank"),
        ('<"">', "user address required"),
        ('<""@local.test>', "user address required"),
        ('<""@remote.test>', "user address required"),
        ("<a,b@remote.test>", "illegal"),
        ("<user@host:25>", "colon illegal"),
        ("<list:;>", "illegal"),
        ("<user@local..test>", "invalid host name"),
        ("<user@.local.test>", "invalid host name"),
        ("<user@.>", "hostname required"),
        ("<user@[192.0.2.1]x>", "invalid domain"),
        ("<user@[not-an-ip]>", "invalid address literal"),
        ("<user@[192.0.2.1>", "unterminated address literal"),
        ("<user@192.0.2.1]>", "unbalanced bracket"),
        ('<user@"remote.test">', "invalid domain"),
        ("<john doe@local.test>", "unquoted blank"),
        ("<user@exa mple.test>", "unquoted blank"),
        ('<"unterminated@local.test>', "unterminated quoted string"),
        ("<user@remote.test\\", "backslash at end"),
        ("<user(comment@remote.test>", "unbalanced parenthesis"),
        ("<user)@remote.test>", "unbalanced parenthesis"),
        ("<!user>", "invalid bang path"),
        ("<remote.test!>", "invalid bang path"),
        ('<"a b"!user>', "invalid bang path"),
        ("<%remote.test>", "user address required"),
        ("<user%>", "invalid domain"),
        ("user\x00@local.test", "NUL"),
        ("<user\r\n@local.test>", "control character"),
        ("<user\x1b@local.test>", "control character"),
        ("<user\x7f@local.test>", "control character"),
        ("<user\u0085@local.test>", "control character"),
        ("<user@local.test\udcff>", "invalid character encoding"),
        ("<" + "a" * 1000 + "@local.test>", "too long"),
        ("<[192.0.2.1]@local.test>", "invalid local part"),
    ],
)
def test_bad_addresses(text: str, reason: str) -> None:
    with pytest.raises(BadAddress) as info:
        resolve(text, is_local)
    assert reason in str(info.value)
    assert isinstance(info.value, ValueError)


def test_rounds_are_bounded() -> None:
    deep = "user" + "%local.test" * (MAX_ROUNDS + 2)
    with pytest.raises(BadAddress, match="too many routing levels"):
        resolve("<%s@local.test>" % deep, is_local)
    shallow = "user%remote.test" + "%local.test" * (MAX_ROUNDS - 2)
    assert r("<%s@local.test>" % shallow) == ("user", "remote.test")


def test_length_limit_is_in_bytes() -> None:
    room = MAX_ADDRESS_BYTES - len("<@local.test>")
    assert r("<%s@local.test>" % ("a" * room)) == ("a" * room, "local.test")
    with pytest.raises(BadAddress, match="too long"):
        resolve("<%s@local.test>" % ("\u00e9" * (room // 2 + 1)), is_local)


def test_non_text_is_a_bad_address() -> None:
    with pytest.raises(BadAddress):
        resolve(b"<user@local.test>", is_local)  # type: ignore[arg-type]


def test_resolved_str_and_literal_flag() -> None:
    assert str(Resolved("user", "remote.test")) == "user@remote.test"
    assert str(Resolved("postmaster", None)) == "postmaster"
    assert Resolved("u", "[192.0.2.1]").is_literal
    assert not Resolved("u", "remote.test").is_literal
    assert not Resolved("u", None).is_literal


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Example.COM", "example.com"),
        ("example.com.", "example.com"),
        (" example.com ", "example.com"),
        ("[192.0.2.1]", "[192.0.2.1]"),
        ("[IPv6:2001:DB8::0:1]", "[ipv6:2001:db8::0:1]"),
        ("[IPv6:::ffff:192.0.2.1]", "[ipv6:::ffff:192.0.2.1]"),
        ("example.com..", "example.com"),
        ("B\u00dcCHER.example", "b\u00dccher.example"),
    ],
)
def test_normalize_domain(text: str, expected: str) -> None:
    assert normalize_domain(text) == expected


@pytest.mark.parametrize("text", ["", ".", "a..b", ".a", "a b", "[x]", "a@b", "[1.2.3.4", "a\x00b",
                                  "[2001:db8::1]", "[::ffff:127.0.0.1]", "[127.0.0.1\u00a0]", "[\u00a0127.0.0.1]",
                                  "[127.000.0.1]", "[IPv6:::1\u00a0]", "[IPv6:fe80::1%eth0]"])
def test_normalize_domain_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        normalize_domain(text)


def test_parent_domains() -> None:
    assert parent_domains("a.b.example") == ["b.example", "example"]
    assert parent_domains("example") == []
    assert parent_domains("[192.0.2.1]") == []


def test_dequote_and_is_null() -> None:
    assert dequote('"a\\"b"') == 'a"b'
    assert dequote("a\\@b") == "a@b"
    assert is_null("<>") and is_null(" < > ") and is_null("")
    assert not is_null("<a>") and not is_null("<@>")


def test_fuzz_never_raises_anything_but_bad_address() -> None:
    # Random strings over the characters that matter to the parser.
    alphabet = list('@%!,:;<>()[]"\\ .\tab\u00e9\x00\x7f') + ["local.test", "IPv6:", "192.0.2.10"]
    rng = random.Random(20240501)
    for _ in range(5000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        for options in ({}, {"percent_hack": False, "bang_paths": False}):
            try:
                got = resolve(text, is_local, **options)
            except BadAddress:
                continue
            assert isinstance(got, Resolved)
            assert got.local_part or got.domain
            if got.domain is not None:
                assert got.domain == normalize_domain(got.domain)
