"""DNS list lookups through dnspython against a real DNS server on loopback (tests/dnsserver.py)."""

from __future__ import annotations

import ipaddress
import logging
import time

import pytest

from relaymilter.dnsbl import checker as checkermod
from relaymilter.dnsbl.checker import ASIDE, OK, UNTESTED, Dnsbl
from relaymilter.dnsbl.lookup import CLEAN, ERROR, LISTED, Asker, ask_site, make_resolver
from relaymilter.dnsbl.settings import DnsblConfig, parse_nameserver
from relaymilter.dnsbl.sites import parse_site, query_name

from dnsserver import DnsServer, Zone, rfc5782_zone, standard_zones

IP = ipaddress.ip_address


@pytest.fixture
def dns():
    with DnsServer(standard_zones()) as server:
        yield server


def config(dns: DnsServer, *sites: str, **kw) -> DnsblConfig:
    kw.setdefault("timeout", 1.0)
    return DnsblConfig(sites=tuple(parse_site(s) for s in sites), nameservers=(parse_nameserver(dns.nameserver),), **kw)


def started(dns: DnsServer, *sites: str, **kw) -> Dnsbl:
    d = Dnsbl(config(dns, *sites, **kw))
    d.self_test()
    return d


def ask(dns: DnsServer, site: str, ip: str, timeout: float = 1.0):
    s = parse_site(site)
    return ask_site(make_resolver((parse_nameserver(dns.nameserver),), timeout), s, query_name(IP(ip), s.zone),
                    time.monotonic() + timeout)


def test_listed_with_reason_and_ttl(dns):
    a = ask(dns, "bl.test", "127.0.0.30")
    assert (a.status, a.answer, a.reason, a.ttl) == (LISTED, "127.0.0.4",
                                                      "Listed for testing; see http://bl.test/query/127.0.0.30", 300)
    assert dns.queries() == [("30.0.0.127.bl.test", "A"), ("30.0.0.127.bl.test", "TXT")]
    b = ask(dns, "bl.test", "127.0.0.35")
    assert (b.status, b.reason) == (LISTED, "")


def test_unlisted_is_clean_for_the_negative_ttl(dns):
    a = ask(dns, "bl.test", "127.0.0.40")
    assert (a.status, a.answer, a.ttl) == (CLEAN, "", 60)
    assert dns.queries() == [("40.0.0.127.bl.test", "A")]       # no TXT for a client not listed


def test_ipv6_client_is_asked_by_its_32_nibbles(dns):
    a = ask(dns, "bl.test", "2001:db8::30")
    assert (a.status, a.reason) == (LISTED, "IPv6 listing")
    assert dns.queries()[0][0] == "0.3." + "0." * 22 + "8.b.d.0.1.0.0.2.bl.test"
    assert ask(dns, "bl.test", "::ffff:127.0.0.30").status == LISTED      # mapped: the IPv4 form


@pytest.mark.parametrize("site,ip,answer,meaning", [
    ("err.test", "127.0.0.30", "127.255.255.254", "query through a public resolver"),
    ("odd.test", "127.0.0.33", "127.255.255.255", "too many queries"),
    ("odd.test=127.[0..255].[0..255].[0..255]", "127.0.0.33", "127.255.255.255", "too many queries"),
    ("odd.test", "127.0.0.34", "192.0.2.1", "answer outside 127.0.0.0/8"),
])
def test_error_answers_are_errors_with_their_meaning(dns, site, ip, answer, meaning):
    a = ask(dns, site, ip)
    assert (a.status, a.answer, a.error, a.ttl) == (ERROR, answer, meaning, 0)


def test_filter_decides_which_answers_list(dns):
    assert ask(dns, "bl.test=127.0.0.[2..4]", "127.0.0.30").status == LISTED
    a = ask(dns, "bl.test=127.0.0.[2..4]", "127.0.0.31")           # answers 127.0.0.10
    assert (a.status, a.answer) == (CLEAN, "127.0.0.10")
    assert ask(dns, "bl.test=127.0.0.[2..11]", "127.0.0.31").status == LISTED


def test_silent_server_is_a_timeout_within_the_deadline(dns):
    t = time.monotonic()
    a = ask(dns, "silent.test", "127.0.0.30", timeout=0.4)
    took = time.monotonic() - t
    assert (a.status, a.error) == (ERROR, "timeout")
    assert 0.35 < took < 0.7, took


def test_refused_is_an_error(dns):
    a = ask(dns, "nowhere.example", "127.0.0.30")     # the server serves no such zone: REFUSED
    assert a.status == ERROR and "REFUSED" in a.error


def test_weights_threshold_and_allowlist(dns):
    d = started(dns, "bl.test*2", "second.test*2", threshold=3)
    v = d.lookup(IP("127.0.0.30"))
    assert (v.outcome, v.score) == ("listed", 4)
    assert v.detail() == "site=bl.test,second.test answer=127.0.0.4,127.0.0.3 weight=4/3"
    assert v.top.site.zone == "bl.test"
    v = d.lookup(IP("127.0.0.35"))                         # bl.test alone: 2 < 3
    assert (v.outcome, v.detail()) == ("clean", "site=bl.test answer=127.0.0.2 weight=2/3")
    a = started(dns, "bl.test", "allow.test=127.0.[0..255].[1..3]*-5")
    v = a.lookup(IP("127.0.0.32"))
    assert (v.outcome, v.score) == ("clean", -4)
    assert a.lookup(IP("127.0.0.30")).outcome == "listed"


def test_lists_are_asked_at_once_within_one_timeout():
    slow = [rfc5782_zone("slow%d.test" % i).list_ip("127.0.0.30") for i in range(4)]
    with DnsServer(slow) as dns:
        d = started(dns, *("slow%d.test" % i for i in range(4)), timeout=2.0)
        assert d.in_use() == ["slow%d.test" % i for i in range(4)]
        for z in slow:
            z.delay = 0.3
        t = time.monotonic()
        v = d.lookup(IP("127.0.0.30"))
        took = time.monotonic() - t
    assert v.score == 4
    assert took < 0.9, "asked one after the other: %.2fs" % took   # 4 x (A 0.3 + TXT 0.3) if sequential


def test_a_silent_list_costs_the_timeout_and_on_error_decides(dns):
    silent = dns.zones["silent.test"]
    silent.silent = False
    silent.list_ip("127.0.0.2")                 # passes the self-test, then goes quiet
    for on_error, outcome in (("skip", "clean"), ("tempfail", "unknown")):
        silent.silent = False
        d = started(dns, "silent.test", "bl.test=127.0.0.[3..4]", on_error=on_error, timeout=0.5)
        assert d.in_use() == ["silent.test", "bl.test"]
        silent.silent = True
        t = time.monotonic()
        v = d.lookup(IP("127.0.0.35"))          # bl.test answers 127.0.0.2: not in the filter
        took = time.monotonic() - t
        assert (v.outcome, v.score) == (outcome, 0)
        assert v.detail() == "weight=0/1 dnsbl_error site=silent.test (timeout)"
        assert 0.45 < took < 0.9, took
        v = d.lookup(IP("127.0.0.30"))          # listed by bl.test: the silent list cannot unlist it
        assert v.outcome == "listed"


def test_tempfail_only_when_the_failed_lists_could_change_the_outcome(dns):
    silent = dns.zones["silent.test"]
    silent.list_ip("127.0.0.2")
    d = started(dns, "silent.test*-5", "bl.test", on_error="tempfail", timeout=0.3)
    silent.silent = True
    assert d.lookup(IP("127.0.0.30")).outcome == "unknown"     # the failed allowlist might cancel it
    assert d.lookup(IP("127.0.0.40")).outcome == "clean"       # an allowlist cannot list anyone


def test_self_test_sets_aside_and_restores(dns, caplog):
    caplog.set_level(logging.INFO, "relaymilter")
    d = started(dns, "bl.test", "err.test", "silent.test", timeout=0.3)
    assert {z: s.status for z, s in d.states.items()} == {"bl.test": OK, "err.test": ASIDE, "silent.test": UNTESTED}
    assert "err.test set aside: RFC 5782 self-test failed: it lists 127.0.0.1 (answer 127.255.255.254, " \
           "query through a public resolver)" in caplog.text
    dns.clear()
    v = d.lookup(IP("127.0.0.30"))
    assert v.outcome == "listed"
    assert [e.error for e in v.errors] == ["not yet verified by the self-test"]
    assert dns.queries() == [("30.0.0.127.bl.test", "A"), ("30.0.0.127.bl.test", "TXT")]   # set aside: never asked
    dns.zones["err.test"].answer_all = None
    dns.zones["err.test"].list_ip("127.0.0.2")
    d.self_test()
    assert d.states["err.test"].status == OK
    assert "err.test passes its self-test again; back in use" in caplog.text
    dns.zones["bl.test"].list_ip("127.0.0.1")               # now it answers for 127.0.0.1 too
    d.self_test()
    assert d.states["bl.test"].status == ASIDE
    assert d.lookup(IP("127.0.0.30")).outcome == "clean"


def test_a_list_without_the_test_point_is_set_aside(dns):
    d = started(dns, "allow.test", "odd.test")
    assert d.states["allow.test"].status == OK                 # 127.0.0.2 -> 127.0.10.2: a valid answer
    dns.zones["odd.test"].records.pop("2.0.0.127")
    d.self_test()
    assert (d.states["odd.test"].status, d.states["odd.test"].why) == (ASIDE, "it does not list 127.0.0.2")


def test_answers_cached_for_their_ttl_errors_never(dns):
    dns.zones["bl.test"].ttl = 1
    d = started(dns, "bl.test", "odd.test")
    dns.clear()
    for _ in range(3):
        d.lookup(IP("127.0.0.30"))
        d.lookup(IP("127.0.0.40"))        # negative answers too (SOA minimum 60 s)
    assert sorted(set(dns.queries())) == sorted(dns.queries())      # each asked once
    assert len(dns.queries("40.0.0.127")) == 2
    time.sleep(1.1)
    d.lookup(IP("127.0.0.30"))
    assert dns.asked("30.0.0.127.bl.test", "A") == 2 and dns.asked("30.0.0.127.odd.test", "A") == 1
    dns.clear()
    for _ in range(3):
        assert d.lookup(IP("127.0.0.33")).errors[0].answer == "127.255.255.255"
    assert dns.asked("33.0.0.127.odd.test", "A") == 3
    assert d.errors[("odd.test", "127.255.255.255 (too many queries)")] == 3


def test_cache_is_bounded(dns, monkeypatch):
    monkeypatch.setattr(checkermod, "CACHE_MAX", 20)
    d = started(dns, "bl.test")
    for i in range(100):
        d.lookup(IP("192.0.2.%d" % i))
        assert d.cached() <= 20
    assert d.cached() > 0


def test_errors_reported_and_counted(dns, caplog):
    caplog.set_level(logging.INFO, "relaymilter")
    d = started(dns, "odd.test")
    for ip in ("127.0.0.33", "127.0.0.33", "127.0.0.34"):
        d.lookup(IP(ip))
    d.report_errors()
    assert "dnsbl: odd.test: 3 errors since the last report: 2 x 127.255.255.255 (too many queries); " \
           "1 x 192.0.2.1 (answer outside 127.0.0.0/8)" in caplog.text
    assert not d.errors


def test_reload_keeps_verified_lists_and_the_cache(dns):
    first = started(dns, "bl.test", "err.test")
    first.lookup(IP("127.0.0.30"))
    second = Dnsbl(config(dns, "bl.test", "err.test"), first)
    dns.clear()
    assert second.lookup(IP("127.0.0.30")).outcome == "listed" and dns.queries() == []
    assert second.states["err.test"].status == ASIDE and first._retired


def test_asker_pool_answers_in_order(dns):
    asker = Asker(make_resolver((parse_nameserver(dns.nameserver),), 1.0))
    sites = [parse_site(z) for z in ("bl.test", "odd.test", "second.test", "allow.test")]
    got = asker.ask_sites([(s, query_name(IP("127.0.0.30"), s.zone)) for s in sites], time.monotonic() + 1)
    assert [(a.site.zone, a.status) for a in got] == [("bl.test", LISTED), ("odd.test", LISTED),
                                                      ("second.test", LISTED), ("allow.test", CLEAN)]
    asker.close()


def test_zone_helper_lists_ipv6_by_nibbles():
    z = Zone("x.test").list_ip("2001:db8::30")
    assert list(z.records) == ["0.3." + "0." * 22 + "8.b.d.0.1.0.0.2"]


def test_whole_answers_kept_per_client_until_a_list_changes_state(dns):
    from relaymilter.dnsbl.rules import Blocklists

    lists = Blocklists(config(dns, "bl.test", "odd.test", timeout=0.5))
    lists.start()
    first = lists.check("127.0.0.30")
    assert first.decision.rule == "dnsbl" and first.note == "site=bl.test,odd.test answer=127.0.0.4,127.0.0.2 weight=2/1"
    assert str(first.decision.reply) == ("554 5.7.1 Service unavailable; Client host [127.0.0.30] blocked using "
                                         "bl.test; Listed for testing; see http://bl.test/query/127.0.0.30")
    dns.clear()
    assert lists.check("127.0.0.30") is first and dns.queries() == []
    dns.zones["bl.test"].list_ip("127.0.0.1")           # bl.test now fails its self-test
    lists.dnsbl.self_test()
    dns.clear()
    again = lists.check("127.0.0.30")                   # not the kept answer: bl.test is set aside
    assert again.note == "site=odd.test answer=127.0.0.2 weight=1/1" and dns.queries() == []
    assert lists.check("127.0.0.33").note == "dnsbl=pass weight=0/1 dnsbl_error site=odd.test answer=127.255.255.255 " \
                                              "(too many queries)"
    lists.check("127.0.0.33")
    assert dns.asked("33.0.0.127.odd.test", "A") == 2   # an answer with an error is never kept
    assert lists.check("not an address").decision is None
