"""DNS list sites: Postfix's NAME[=FILTER][*WEIGHT], answer meanings, query names (RFC 5782)."""

from __future__ import annotations

import ipaddress

import pytest

from relaymilter.dnsbl.settings import DnsblConfig, check_reply, parse_nameserver
from relaymilter.dnsbl.sites import answer_meaning, parse_site, query_name

IP = ipaddress.ip_address


def test_site_forms():
    s = parse_site("zen.spamhaus.org=127.0.0.[2..11]*3")
    assert (s.zone, s.weight, s.filter.text) == ("zen.spamhaus.org", 3, "127.0.0.[2..11]")
    assert parse_site("bl.spamcop.net*2").filter is None and parse_site("bl.spamcop.net*2").weight == 2
    assert parse_site("Bl.Example.ORG.").zone == "bl.example.org" and parse_site("bl.example.org").weight == 1
    w = parse_site("list.dnswl.org=127.0.[0..255].[1..3]*-5")
    assert w.weight == -5 and w.filter.accepts(IP("127.0.10.2")) and not w.filter.accepts(IP("127.0.10.0"))


@pytest.mark.parametrize("answer,listed", [
    ("127.0.0.2", True), ("127.0.0.11", True), ("127.0.0.4", True), ("127.0.0.1", False), ("127.0.0.12", False),
    ("127.0.1.2", False),
])
def test_filter_ranges(answer, listed):
    assert parse_site("zen.spamhaus.org=127.0.0.[2..11]").listing(IP(answer)) is listed


def test_filter_lists_and_single_values():
    s = parse_site("bl.example=127.0.0.[2;4;9..10]")
    assert [a for a in range(0, 12) if s.listing(IP("127.0.0.%d" % a))] == [2, 4, 9, 10]
    assert parse_site("bl.example=127.0.0.3").listing(IP("127.0.0.3"))
    assert not parse_site("bl.example=127.0.0.3").listing(IP("127.0.0.2"))


@pytest.mark.parametrize("text,message", [
    ("", "bad site"),
    ("zen.spamhaus.org=127.0.0.[2..11]*x", "bad site"),
    ("zen.spamhaus.org=127.0.0", "four parts"),
    ("zen.spamhaus.org=127.0.0.[11..2]", "bad filter range"),
    ("zen.spamhaus.org=127.0.0.[2..300]", "bad filter range"),
    ("zen.spamhaus.org=127.0.0.[a]", "bad filter part"),
    ("zen.spamhaus.org=10.0.0.2", "must start with 127"),
    ("zen.spamhaus.org*0", "weight of 0"),
    ("localhost", "bad DNS list name"),
    ("bad_.-x.org", "bad DNS list name"),
])
def test_bad_sites_say_why(text, message):
    with pytest.raises(ValueError, match=message):
        parse_site(text)


@pytest.mark.parametrize("answer,meaning", [
    ("127.255.255.252", "typo in the list name"),
    ("127.255.255.254", "query through a public resolver"),
    ("127.255.255.255", "too many queries"),
    ("127.255.255.1", "error code in 127.255.255.0/24"),
    ("10.0.0.1", "answer outside 127.0.0.0/8"),
    ("192.0.2.1", "answer outside 127.0.0.0/8"),
    ("127.0.0.2", None),
    ("127.1.2.3", None),
])
def test_error_answers_are_never_listings(answer, meaning):
    assert answer_meaning(answer) == meaning


def test_query_names():
    assert query_name(IP("192.0.2.5"), "zen.spamhaus.org") == "5.2.0.192.zen.spamhaus.org."
    assert query_name(IP("::ffff:192.0.2.5"), "bl.test") == "5.2.0.192.bl.test."
    six = query_name(IP("2001:db8::1"), "bl.test")
    assert six == "1." + "0." * 23 + "8.b.d.0.1.0.0.2.bl.test."
    assert len(six.split(".")) == 32 + 3
    # RFC 5782 section 5 test points
    assert query_name(IP("127.0.0.2"), "bl.test") == "2.0.0.127.bl.test."


@pytest.mark.parametrize("text,host,port", [
    ("127.0.0.1", "127.0.0.1", 53), ("127.0.0.1:5353", "127.0.0.1", 5353), ("::1", "::1", 53),
    ("[::1]:5353", "::1", 5353), ("[2001:db8::1]", "2001:db8::1", 53),
])
def test_nameservers(text, host, port):
    ns = parse_nameserver(text)
    assert (ns.host, ns.port) == (host, port)


@pytest.mark.parametrize("text", ["dns.example", "127.0.0.1:0", "127.0.0.1:99999", "[::1]:x", "1.2.3"])
def test_bad_nameservers(text):
    with pytest.raises(ValueError):
        parse_nameserver(text)


def test_reply_template():
    cfg = DnsblConfig(sites=(parse_site("bl.test"),))
    r = cfg.refusal("192.0.2.30", "bl.test", "Listed for testing")
    assert (r.code, r.xcode, r.text) == ("554", "5.7.1",
                                         "Service unavailable; Client host [192.0.2.30] blocked using bl.test; "
                                         "Listed for testing")
    assert cfg.refusal("192.0.2.30", "bl.test", "").text.endswith("blocked using bl.test")
    for bad in ("450 4.7.1 later", "554 5.7.1 {nope}", "554 blocked", "554 5.7.1 100% sure", "{client"):
        with pytest.raises(ValueError):
            check_reply(bad)
