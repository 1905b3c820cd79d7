"""NAME
    relaymilter.dnsbl.sites - DNS blocklist sites in Postfix's syntax, query names, answers

DESCRIPTION
    A site is written as in Postfix's postscreen_dnsbl_sites:

        NAME[=FILTER][*WEIGHT]
        zen.spamhaus.org=127.0.0.[2..11]*3
        bl.spamcop.net*2
        list.dnswl.org=127.0.[0..255].[1..3]*-5      (a negative weight allowlists)

    FILTER is four dot-separated parts, each a number or a bracketed list of
    numbers and ranges separated by ';' (``[2;4;9..11]``). Without a filter
    a site lists a client by any answer in 127.0.0.0/8.

    Answers that are NOT listings, whatever the filter says: anything in
    127.255.255.0/24 (Spamhaus and others use .252, .254 and .255 to say the
    query itself went wrong) and anything outside 127.0.0.0/8. Both are
    classified as errors with their meaning (answer_meaning), so they are
    logged and counted, and can never refuse mail; Postfix counts them as
    listings unless the admin writes a filter.

    Query names are the standard ones (RFC 5782 2.1, 2.4): an IPv4 client
    (or an IPv4-mapped IPv6 one) as its reversed octets, an IPv6 client as
    its 32 reversed nibbles, then the site's zone.

DIAGNOSTICS
    parse_site() raises ValueError with a one-line reason naming the part
    of the site text that is wrong; the configuration turns it into
    FILE:LINE: message.

Stdlib only.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Optional, Union

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
_SITE = re.compile(r"^(?P<zone>[^=*\s]+)(?:=(?P<filter>[^*\s]+))?(?:\*(?P<weight>[-+]?\d+))?$")
_FILTER_PART = re.compile(r"\[[^\]]*\]|[^.\[\]]+")
_RANGE = re.compile(r"^(\d{1,3})(?:\.\.(\d{1,3}))?$")

ERROR_NET = ipaddress.IPv4Network("127.255.255.0/24")
LOOPBACK_NET = ipaddress.IPv4Network("127.0.0.0/8")

# What the error answers mean (Spamhaus' return codes, shared by other lists).
ERROR_MEANINGS = {
    "127.255.255.252": "typo in the list name",
    "127.255.255.254": "query through a public resolver",
    "127.255.255.255": "too many queries",
}

# RFC 5782 section 5: every IPv4 list lists 127.0.0.2 and does not list 127.0.0.1.
TEST_LISTED = ipaddress.IPv4Address("127.0.0.2")
TEST_UNLISTED = ipaddress.IPv4Address("127.0.0.1")


@dataclass(frozen=True)
class AnswerFilter:
    """FILTER: for each of the four octets, the values it accepts."""

    octets: tuple[frozenset[int], frozenset[int], frozenset[int], frozenset[int]]
    text: str

    def accepts(self, answer: ipaddress.IPv4Address) -> bool:
        return all(value in allowed for value, allowed in zip(answer.packed, self.octets))


@dataclass(frozen=True)
class Site:
    """One blocklist (or allowlist, with a negative weight)."""

    zone: str                                # lowercase, no trailing dot
    filter: Optional[AnswerFilter] = None    # None: any listing answer in 127.0.0.0/8
    weight: int = 1
    spec: str = ""                           # the text as configured, for messages

    def listing(self, answer: ipaddress.IPv4Address) -> bool:
        """Whether *answer* (already known not to be an error answer) lists the client here."""
        return self.filter is None or self.filter.accepts(answer)


def _octet_values(part: str, site: str) -> frozenset[int]:
    if part.startswith("[") and part.endswith("]"):
        items = part[1:-1].split(";")
    else:
        items = [part]
    values: set[int] = set()
    for item in items:
        m = _RANGE.match(item.strip())
        if not m:
            raise ValueError("%s: bad filter part %r (want a number or [n;m..k])" % (site, part))
        low = int(m.group(1))
        high = int(m.group(2)) if m.group(2) is not None else low
        if low > 255 or high > 255 or low > high:
            raise ValueError("%s: bad filter range %r (numbers 0..255, low..high)" % (site, item.strip()))
        values.update(range(low, high + 1))
    return frozenset(values)


def parse_filter(text: str, site: str = "") -> AnswerFilter:
    """FILTER text (``127.0.0.[2..11]``) as an AnswerFilter; ValueError with the reason."""
    parts = _FILTER_PART.findall(text)
    if len(parts) != 4 or ".".join(parts) != text:
        raise ValueError("%s: bad filter %r (want four parts like 127.0.0.[2..11])" % (site or text, text))
    octets = tuple(_octet_values(p, site or text) for p in parts)
    if octets[0] != frozenset({127}):
        raise ValueError("%s: filter %r must start with 127 (answers outside 127.0.0.0/8 are errors, "
                         "never listings)" % (site or text, text))
    return AnswerFilter((octets[0], octets[1], octets[2], octets[3]), text)


def normalize_zone(text: str) -> str:
    """A DNS zone name, lowercase without a trailing dot; ValueError if it is not one."""
    zone = text.strip().lower().rstrip(".")
    labels = zone.split(".")
    if len(zone) > 200 or len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        raise ValueError("bad DNS list name %r (want a zone like zen.spamhaus.org)" % text)
    return zone


def parse_site(text: str) -> Site:
    """``NAME[=FILTER][*WEIGHT]`` as a Site; ValueError with a one-line reason."""
    spec = text.strip()
    m = _SITE.match(spec)
    if not m:
        raise ValueError("bad site %r (want NAME[=FILTER][*WEIGHT], e.g. zen.spamhaus.org=127.0.0.[2..11]*3)" % text)
    zone = normalize_zone(m.group("zone"))
    answer_filter = parse_filter(m.group("filter"), spec) if m.group("filter") is not None else None
    weight = int(m.group("weight")) if m.group("weight") is not None else 1
    if weight == 0:
        raise ValueError("%s: a weight of 0 would make the site count for nothing" % spec)
    return Site(zone, answer_filter, weight, spec)


def answer_meaning(answer: str) -> Optional[str]:
    """Why an A answer is an error and not a listing, or None when it is a valid answer."""
    try:
        ip = ipaddress.IPv4Address(answer)
    except ValueError:
        return "not an IPv4 address"
    if ip in ERROR_NET:
        return ERROR_MEANINGS.get(answer, "error code in 127.255.255.0/24")
    if ip not in LOOPBACK_NET:
        return "answer outside 127.0.0.0/8"
    return None


def query_name(ip: IPAddress, zone: str) -> str:
    """The name to ask for *ip* on *zone* (absolute, with the trailing dot)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv4Address):
        head = ".".join(reversed(str(ip).split(".")))
    else:
        head = ".".join(reversed(ip.exploded.replace(":", "")))
    return "%s.%s." % (head, zone)
