"""The dnsbl: section: defaults, FILE:LINE errors, what turns it off."""

from __future__ import annotations

from pathlib import Path

import pytest

from relaymilter.config import load_config
from relaymilter.dnsbl import settings
from relaymilter.dnsbl.settings import Nameserver, system_nameservers
from relaymilter.errors import ConfigError


def load(tmp_path: Path, text: str):
    p = tmp_path / "c.yaml"
    p.write_text("add_host_names: false\n" + text)
    return load_config(str(p)), str(p)


def test_full_section(tmp_path):
    c, _ = load(tmp_path, """dnsbl:
  sites:
    - zen.spamhaus.org=127.0.0.[2..11]*3
    - bl.spamcop.net*2
    - list.dnswl.org=127.0.[0..255].[1..3]*-5
  threshold: 3
  nameservers: ["127.0.0.1:5353", "::1"]
  timeout: 1.5
  on_error: tempfail
  exempt_recipients: [Postmaster, abuse, hostmaster]
  reply: "550 5.7.1 Rejected: [{client}] listed at {site}{reason}"
  selftest_interval: 60
""")
    d = c.dnsbl
    assert [(s.zone, s.weight) for s in d.sites] == [("zen.spamhaus.org", 3), ("bl.spamcop.net", 2),
                                                      ("list.dnswl.org", -5)]
    assert d.threshold == 3 and d.timeout == 1.5 and d.on_error == "tempfail" and d.selftest_interval == 60
    assert d.nameservers == (Nameserver("127.0.0.1", 5353), Nameserver("::1", 53))
    assert d.exempt_recipients == {"postmaster", "abuse", "hostmaster"}
    assert str(d.refusal("192.0.2.9", "bl.spamcop.net", "")) == "550 5.7.1 Rejected: [192.0.2.9] listed at bl.spamcop.net"


def test_defaults_and_off(tmp_path, monkeypatch):
    assert load(tmp_path, "")[0].dnsbl is None
    assert load(tmp_path, "dnsbl:\n  sites: []\n  timeout: 2.0\n")[0].dnsbl is None
    assert load(tmp_path, "dnsbl: null\n")[0].dnsbl is None
    monkeypatch.setattr(settings, "system_nameservers", lambda: (Nameserver("192.0.2.53"),))
    d = load(tmp_path, "dnsbl:\n  sites: [bl.test]\n")[0].dnsbl
    assert (d.threshold, d.timeout, d.on_error, d.selftest_interval) == (1, 2.0, "skip", 300)
    assert d.exempt_recipients == {"postmaster", "abuse"} and d.nameservers == (Nameserver("192.0.2.53"),)
    assert d.reply == "554 5.7.1 Service unavailable; Client host [{client}] blocked using {site}{reason}"


def test_no_nameserver_anywhere_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(settings, "system_nameservers", lambda: ())
    with pytest.raises(ConfigError, match=r"c.yaml:3: dnsbl: nameservers: none given and /etc/resolv.conf"):
        load(tmp_path, "dnsbl:\n  sites: [bl.test]\n")


def test_resolv_conf(tmp_path):
    conf = tmp_path / "resolv.conf"
    conf.write_text("# x\nsearch example\nnameserver 192.0.2.53\nnameserver fe80::1%eth0\nnameserver bogus\n")
    assert system_nameservers(str(conf)) == (Nameserver("192.0.2.53"), Nameserver("fe80::1"))
    assert system_nameservers(str(tmp_path / "none")) == ()


@pytest.mark.parametrize("text,line,message", [
    ("dnsbl:\n  sites:\n    - zen.spamhaus.org=127.0.0.[2..300]\n", 4, "bad filter range"),
    ("dnsbl:\n  sites:\n    - bl.test\n    - zen.spamhaus.org=10.0.0.2\n", 5, "must start with 127"),
    ("dnsbl:\n  sites: [bl.test, BL.test.]\n", 3, "named twice"),
    ("dnsbl:\n  sites: [bl.test]\n  threshold: 0\n", 4, "threshold"),
    ("dnsbl:\n  sites: [bl.test]\n  timeout: 30\n", 4, "at most 5"),
    ("dnsbl:\n  sites: [bl.test]\n  timeout: 0\n", 4, "above 0"),
    ("dnsbl:\n  sites: [bl.test]\n  on_error: defer\n", 4, "skip or tempfail"),
    ("dnsbl:\n  sites: [bl.test]\n  nameservers: [dns.google]\n", 4, "bad nameserver"),
    ("dnsbl:\n  sites: [bl.test]\n  reply: '450 4.7.1 later'\n", 4, "want '5XY 5.X.Y text'"),
    ("dnsbl:\n  sites: [bl.test]\n  reply: '554 5.7.1 {ip}'\n", 4, "bad reply template"),
    ("dnsbl:\n  sites: [bl.test]\n  exempt_recipients: [postmaster@example.com]\n", 4, "local parts"),
    ("dnsbl:\n  sites: [bl.test]\n  treshold: 2\n", 4, "unknown dnsbl key 'treshold'"),
    ("dnsbl: [bl.test]\n", 2, "must be a mapping"),
])
def test_errors_name_file_and_line(tmp_path, text, line, message):
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, text)
    assert str(exc.value).startswith("%s:%d: " % (tmp_path / "c.yaml", line)), str(exc.value)
    assert message in str(exc.value)
