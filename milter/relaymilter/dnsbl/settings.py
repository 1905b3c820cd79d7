"""NAME
    relaymilter.dnsbl.settings - the ``dnsbl:`` configuration section

DESCRIPTION
    dnsbl:
      sites: [zen.spamhaus.org=127.0.0.[2..11]*3, bl.spamcop.net*2]   # NAME[=FILTER][*WEIGHT]
      threshold: 1              # refuse when the summed weight reaches it
      nameservers: []           # HOST or HOST:PORT ([v6]:PORT); empty: /etc/resolv.conf's
      timeout: 2.0              # seconds for all sites together, per client (at most MAX_TIMEOUT)
      on_error: skip            # skip | tempfail: what a DNS failure or timeout means
      exempt_recipients: [postmaster, abuse]
      reply: "554 5.7.1 Service unavailable; Client host [{client}] blocked using {site}{reason}"
      selftest_interval: 300    # seconds between RFC 5782 self-tests of every site

    Without the section, or with no sites, no DNS query is ever made. The
    timeout is capped well below the MTAs' milter timeouts (sendmail's
    shipped R:10s, Postfix's command_timeout=10s in the shipped snippet): a
    slow DNS must cost one recipient at most that, never the session.

DIAGNOSTICS
    ConfigError ``FILE:LINE: dnsbl: KEY: message`` for a bad site, filter,
    weight, nameserver, timeout, reply template or unknown key.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Optional

from relaymilter.dnsbl.sites import Site, parse_site
from relaymilter.errors import ConfigError
from relaymilter.replies import DNSBL_LISTED, Reply
from relaymilter.yamlcheck import Mapping, where

DNSBL_KEYS = ("sites", "threshold", "nameservers", "timeout", "on_error", "exempt_recipients", "reply",
              "selftest_interval")
DEFAULT_REPLY = DNSBL_LISTED
DEFAULT_TIMEOUT = 2.0
MAX_TIMEOUT = 5.0             # half the shipped sendmail R:10s and Postfix command_timeout=10s
DEFAULT_SELFTEST = 300
RESOLV_CONF = "/etc/resolv.conf"

_REPLY = re.compile(r"^(5\d\d) (5\.\d{1,3}\.\d{1,3}) (\S.*)$")
_FIELDS = ("client", "site", "reason")


@dataclass(frozen=True)
class Nameserver:
    host: str
    port: int = 53

    def __str__(self) -> str:
        return "[%s]:%d" % (self.host, self.port) if ":" in self.host else "%s:%d" % (self.host, self.port)


@dataclass(frozen=True)
class DnsblConfig:
    sites: tuple[Site, ...]
    threshold: int = 1
    nameservers: tuple[Nameserver, ...] = ()
    timeout: float = DEFAULT_TIMEOUT
    on_error: str = "skip"
    exempt_recipients: frozenset[str] = frozenset({"postmaster", "abuse"})
    reply: str = DEFAULT_REPLY
    selftest_interval: int = DEFAULT_SELFTEST

    def refusal(self, client: str, site: str, reason: str) -> Reply:
        """The reply for a listed client (the template is checked at load: it always parses)."""
        text = self.reply.format(client=client, site=site, reason="; " + reason if reason else "")
        code, xcode, rest = text.split(" ", 2)
        return Reply(code, xcode, rest)


def parse_nameserver(text: str) -> Nameserver:
    """HOST, HOST:PORT, [V6] or [V6]:PORT; HOST must be an IP address (no DNS to find the DNS)."""
    text = text.strip()
    port = 53
    m = re.match(r"^\[([^\]]+)\](?::(\d+))?$", text)
    if m:
        host, port_text = m.group(1), m.group(2)
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, None
    if port_text is not None:
        port = int(port_text) if port_text.isdigit() else 0
        if not 0 < port < 65536:
            raise ValueError("bad port in %r" % text)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError("bad nameserver %r (want an IP address, IP:PORT or [IPv6]:PORT)" % text) from None
    return Nameserver(str(ip), port)


def system_nameservers(path: str = RESOLV_CONF) -> tuple[Nameserver, ...]:
    """The ``nameserver`` lines of resolv.conf (ports are always 53 there)."""
    found = []
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                words = line.split()
                if len(words) >= 2 and words[0] == "nameserver":
                    try:
                        found.append(Nameserver(str(ipaddress.ip_address(words[1].split("%")[0]))))
                    except ValueError:
                        continue
    except OSError:
        return ()
    return tuple(found)


def check_reply(template: str) -> str:
    """A reply template must give a 5xx reply and name only {client}, {site} and {reason}."""
    try:
        sample = template.format(client="192.0.2.1", site="bl.example", reason="; listed")
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError("bad reply template %r: %s (fields: {client}, {site}, {reason})" % (template, exc)) from None
    if not _REPLY.match(sample):
        raise ValueError("bad reply %r: want '5XY 5.X.Y text' (a refusal), e.g. %r" % (template, DEFAULT_REPLY))
    if "%" in template or "\r" in template or "\n" in template:
        raise ValueError("bad reply %r: no '%%' or line breaks" % template)
    return template


def _float(m: Mapping, key: str, default: float, low: float, high: float) -> float:
    v = m.value(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not low < v <= high:
        raise m.err(key, "must be a number of seconds above %g and at most %g" % (low, high))
    return float(v)


def load_dnsbl(top: Mapping) -> Optional[DnsblConfig]:
    """The dnsbl section of the configuration, or None when it lists no site (no DNS query then)."""
    if not top.has("dnsbl"):
        return None
    m = top.sub("dnsbl")
    m.check_keys(DNSBL_KEYS, "dnsbl key")
    sites = tuple(m.str_list("sites", check=parse_site))
    zones = [s.zone for s in sites]
    if len(set(zones)) != len(zones):
        raise m.err("sites", "a list is named twice")
    nameservers = tuple(m.str_list("nameservers", check=parse_nameserver))
    if len({ns.host for ns in nameservers}) != len(nameservers):
        raise m.err("nameservers", "an address is named twice (one port per address)")
    on_error = m.str("on_error", "skip")
    if on_error not in ("skip", "tempfail"):
        raise m.err("on_error", "must be skip or tempfail")
    exempt = m.str_list("exempt_recipients", ("postmaster", "abuse"))
    for word in exempt:
        if "@" in word or " " in word.strip():
            raise m.err("exempt_recipients", "want local parts like postmaster, got %r" % word)
    try:
        reply = check_reply(m.str("reply", DEFAULT_REPLY) or DEFAULT_REPLY)
    except ValueError as exc:
        raise m.err("reply", str(exc)) from None
    threshold = m.int("threshold", 1, minimum=1) or 1
    timeout = _float(m, "timeout", DEFAULT_TIMEOUT, 0.0, MAX_TIMEOUT)
    interval = m.int("selftest_interval", DEFAULT_SELFTEST, minimum=5) or DEFAULT_SELFTEST
    if not sites:
        return None
    if not nameservers:
        nameservers = system_nameservers()
        if not nameservers:
            raise ConfigError("%s: dnsbl: nameservers: none given and %s names none"
                              % (where(top.source, m.node), RESOLV_CONF))
    return DnsblConfig(
        sites=sites,
        threshold=threshold,
        nameservers=nameservers,
        timeout=timeout,
        on_error=on_error,
        exempt_recipients=frozenset(w.strip().lower() for w in exempt),
        reply=reply,
        selftest_interval=interval,
    )
