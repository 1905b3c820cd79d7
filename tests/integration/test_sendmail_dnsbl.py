"""DNS blocklists end to end: a real sendmail, a real relaymilter, a real DNS server on loopback.

The DNS server (tests/dnsserver.py) runs in this process and logs every query,
so the tests can tell that a user caused none. Clients bind 127.0.0.x:
127.0.0.30 and friends are listed in bl.test (see dnsserver.standard_zones).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

import mta
from dnsserver import DnsServer, rfc5782_zone, standard_zones
from milterproc import MilterProcess

LOCAL = ("local.test",)
TIMEOUT = 1.0
WORKERS = 2         # libmilter worker processes; each keeps its own answers
# sendmail puts no "<addr>... " before a 554 (it does before a 550)
LISTED_REPLY = (554, "5.7.1 Service unavailable; Client host [127.0.0.30] blocked using bl.test; "
                "Listed for testing; see http://bl.test/query/127.0.0.30")


def codes(replies) -> list[int]:
    return [r[0] for r in replies]


def sites() -> list[str]:
    return ["bl.test", "allow.test=127.0.[0..255].[1..3]*-5", "err.test", "odd.test=127.0.0.[2..3]", "quiet.test"]


def settings(dns: DnsServer, on_error: str = "skip") -> dict:
    return {
        "local_domains": list(LOCAL),
        "trusted_networks": ["127.0.0.1/32", "127.0.0.37/32"],
        "workers": WORKERS,
        "dnsbl": {"sites": sites(), "nameservers": [dns.nameserver], "timeout": TIMEOUT, "on_error": on_error},
    }


@pytest.fixture(scope="module")
def rig(module_sendmail_factory):
    zones = standard_zones()
    quiet = rfc5782_zone("quiet.test")          # passes the self-test at start, then goes silent
    zones.append(quiet)
    bl = next(z for z in zones if z.name == "bl.test")
    next(z for z in zones if z.name == "odd.test").records.pop("30.0.0.127")     # bl.test alone lists .30 here
    for n in (36, 37, 38, 41):                  # listed users: relayers.db, trusted, AUTH; a quiet-zone client
        bl.list_ip("127.0.0.%d" % n, "127.0.0.2", "Listed user %d" % n)
    base = Path(tempfile.mkdtemp(prefix="rm-dnsbl-", dir="/tmp"))
    os.chmod(base, 0o755)
    dns = DnsServer(zones).start()
    milter = MilterProcess(base, settings(dns))
    try:
        milter.start()
        mx = module_sendmail_factory(milter_socket="unix:%s" % milter.sock_path, local_domains=LOCAL,
                                     auth_users={"alice": "wonderland"},
                                     aliases={u: "root" for u in ("postmaster", "abuse", "alice", "bob", "carol")})
        yield dns, milter, mx, quiet
    finally:
        milter.stop()
        dns.stop()
        shutil.rmtree(base, ignore_errors=True)


def reload(milter: MilterProcess, settings_: dict | None = None, text: str | None = None) -> None:
    """Write a new configuration, SIGHUP, and wait (bounded) until the milter says it reloaded."""
    before = milter.log().count("reloaded ")
    milter.write_config(settings_, text)
    milter.hup()
    mta.wait_until(lambda: milter.log().count("reloaded ") > before, 15, "the reload")


def vsmtprelay(milter: MilterProcess, *args: str) -> None:
    subprocess.run(["vsmtprelay", "-f", milter.relayers_db, *args], check=True, timeout=60)


def test_self_test_at_start_sets_the_error_zone_aside(rig):
    dns, milter, mx, quiet = rig
    log = milter.wait_for_log("err.test set aside")
    assert "dnsbl: err.test set aside: RFC 5782 self-test failed: it lists 127.0.0.1 (answer 127.255.255.254, " \
           "query through a public resolver)" in log
    for zone in ("bl.test", "allow.test", "odd.test", "quiet.test"):
        milter.wait_for_log("dnsbl: %s passes its self-test" % zone)
    assert dns.asked("2.0.0.127.err.test", "A") >= 1 and dns.asked("1.0.0.127.err.test", "A") >= 1


def test_listed_stranger_refused_for_local_recipient_but_not_postmaster(rig):
    dns, milter, mx, quiet = rig
    got = mta.rcpt_replies(mx.port, "127.0.0.30", "<someone@example.net>",
                           ["<alice@local.test>", "<postmaster>", "<Postmaster@local.test>", "<abuse@local.test>",
                            "<bob@local.test>", "<bob@remote.example>"])
    assert got[0] == LISTED_REPLY
    assert codes(got[1:4]) == [250, 250, 250]
    assert got[4] == LISTED_REPLY
    assert got[5] == (550, "5.7.1 <bob@remote.example>... Relaying denied")     # a relay attempt: refused anyway
    # one lookup per connection: each list asked once for this client, TXT once
    assert dns.asked("30.0.0.127.bl.test", "A") == 1 and dns.asked("30.0.0.127.bl.test", "TXT") == 1
    assert dns.asked("30.0.0.127.err.test") == 0                               # set aside: never asked
    log = milter.wait_for_log("to=<bob@local.test>")
    assert "to=<alice@local.test> resolved=alice@local.test rule=dnsbl site=bl.test answer=127.0.0.4 weight=1/1" in log


def test_answers_cached_across_connections(rig):
    dns, milter, mx, quiet = rig
    for _ in range(6):
        assert codes(mta.rcpt_replies(mx.port, "127.0.0.35", "<a@example.net>", ["<alice@local.test>"])) == [554]
    assert 1 <= dns.asked("35.0.0.127.bl.test", "A") <= WORKERS


def test_users_relay_with_no_dns_query(rig):
    dns, milter, mx, quiet = rig
    rcpts = ["<alice@local.test>", "<bob@remote.example>"]
    vsmtprelay(milter, "add", "127.0.0.36")
    try:
        assert codes(mta.rcpt_replies(mx.port, "127.0.0.36", "<a@example.net>", rcpts)) == [250, 250]
    finally:
        vsmtprelay(milter, "delete", "127.0.0.36")
    assert codes(mta.rcpt_replies(mx.port, "127.0.0.37", "<a@example.net>", rcpts)) == [250, 250]   # trusted
    t = mta.smtp_session(mx.port, "127.0.0.38", "<alice@local.test>", rcpts, auth=("alice", "wonderland"))
    assert t.auth[0] == 235 and codes(t.rcpts) == [250, 250]
    for n in (36, 37, 38):
        assert dns.queries("%d.0.0.127." % n) == [], n
    # the same listed addresses as strangers: now they are looked up, and refused
    for n in (36, 38):
        assert codes(mta.rcpt_replies(mx.port, "127.0.0.%d" % n, "<a@example.net>", ["<alice@local.test>"])) == [554]
    assert dns.asked("36.0.0.127.bl.test", "A") == 1 and dns.asked("38.0.0.127.bl.test", "A") == 1


def test_error_answers_refuse_nobody(rig):
    dns, milter, mx, quiet = rig
    # odd.test answers 127.255.255.255 (too many queries) for 127.0.0.33 and 192.0.2.1 for 127.0.0.34
    for n in (33, 34):
        assert codes(mta.rcpt_replies(mx.port, "127.0.0.%d" % n, "<a@example.net>", ["<alice@local.test>"])) == [250]
    # each worker process writes its own decision lines: wait for each
    milter.wait_for_log("dnsbl_error site=odd.test answer=127.255.255.255 (too many queries)")
    milter.wait_for_log("dnsbl_error site=odd.test answer=192.0.2.1 (answer outside 127.0.0.0/8)")


def test_allowlist_weight_cancels_a_listing(rig):
    dns, milter, mx, quiet = rig
    assert codes(mta.rcpt_replies(mx.port, "127.0.0.32", "<a@example.net>", ["<alice@local.test>"])) == [250]
    assert dns.asked("32.0.0.127.allow.test", "A") == 1 and dns.asked("32.0.0.127.bl.test", "A") == 1
    milter.wait_for_log("site=bl.test,allow.test answer=127.0.0.2,127.0.10.3 weight=-4/1")


def test_silent_list_costs_at_most_the_timeout_then_skip_or_tempfail(rig):
    dns, milter, mx, quiet = rig
    good = milter.config_path.read_text()
    quiet.silent = True
    try:
        for on_error, want in (("skip", [250, 250]), ("tempfail", [451, 451])):
            if on_error == "tempfail":
                reload(milter, settings(dns, "tempfail"))
            client = "127.0.0.%d" % (50 if on_error == "skip" else 51)
            t = time.monotonic()
            got = mta.rcpt_replies(mx.port, client, "<a@example.net>", ["<alice@local.test>", "<carol@local.test>"])
            took = time.monotonic() - t
            assert codes(got) == want, got
            if on_error == "tempfail":
                assert got[0] == (451, "4.7.1 Client host blocklist check temporarily unavailable, try again later")
            # two recipients, one lookup: the timeout is paid once per connection, and only once
            assert TIMEOUT * 0.9 < took < TIMEOUT + 0.6, took
            assert dns.asked("%s.quiet.test" % ".".join(reversed(client.split("."))), "A") >= 1
        # each worker process writes its own decision lines: wait for each
        milter.wait_for_log("rule=dnsbl_unavailable weight=0/1 dnsbl_error site=quiet.test (timeout)")
        milter.wait_for_log("to=<alice@local.test> resolved=alice@local.test rule=local_domain dnsbl=pass "
                            "weight=0/1 dnsbl_error site=quiet.test (timeout)")
    finally:
        quiet.silent = False
        reload(milter, text=good)


def test_a_slow_list_never_stalls_other_connections(rig):
    dns, milter, mx, quiet = rig
    quiet.silent = True
    vsmtprelay(milter, "add", "127.0.0.42")
    try:
        slow = threading.Thread(target=mta.rcpt_replies,
                                args=(mx.port, "127.0.0.41", "<a@example.net>", ["<alice@local.test>"]))
        slow.start()
        mta.wait_until(lambda: dns.asked("41.0.0.127.quiet.test") > 0, 5, "the slow lookup")
        t = time.monotonic()
        assert codes(mta.rcpt_replies(mx.port, "127.0.0.42", "<a@example.net>",
                                      ["<alice@local.test>", "<bob@remote.example>"])) == [250, 250]
        assert codes(mta.rcpt_replies(mx.port, "127.0.0.43", "<a@example.net>", ["<bob@remote.example>"])) == [550]
        took = time.monotonic() - t
        assert slow.is_alive() and took < TIMEOUT * 0.8, took
        slow.join(10)
    finally:
        quiet.silent = False
        vsmtprelay(milter, "delete", "127.0.0.42")
