"""NAME
    relaymilter.ipaddr - client address normalisation

DESCRIPTION
    Every key in relayers.db is a client address in one canonical spelling, so
    that the milter, the log watcher, vsmtprelay, sendmail and Postfix all
    agree on it: IPv4 as a dotted quad, IPv6 in RFC 5952 compressed lowercase
    form, and an IPv4-mapped IPv6 address (``::ffff:a.b.c.d``) as the plain
    dotted quad (a dual-stack listener reports IPv4 clients that way).

    Spellings seen in the wild are accepted on input: sendmail's ``IPv6:``
    prefix, ``[brackets]`` around a literal, surrounding whitespace.

DIAGNOSTICS
    normalize_ip() raises ValueError naming the offending text (shortened)
    for anything that is not one IP address; zone ids (``fe80::1%eth0``) are
    refused because they mean nothing to another host.

Stdlib only: the pure policy core imports this module.
"""

from __future__ import annotations

import ipaddress
import socket

MAX_ADDRESS_LEN = 64


def shorten(text: str, limit: int = 40) -> str:
    """Return *text* cut to *limit* characters for an error message."""
    if len(text) <= limit:
        return text
    return text[:limit] + "...(%d chars)" % len(text)


def parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Parse one client address, unwrapping IPv4-mapped IPv6; ValueError if invalid."""
    if not isinstance(text, str):
        raise ValueError("invalid IP address: %r" % (text,))
    try:
        # C-fast for a plain dotted quad (glibc's inet_pton is strict: canonical only)
        return ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, text))
    except (OSError, ValueError):
        pass
    raw = text.strip(" \t\r\n")
    if raw.startswith("[") and raw.endswith("]"):
        raw = raw[1:-1]
    if raw[:5].lower() == "ipv6:":
        raw = raw[5:]
    if not raw or len(raw) > MAX_ADDRESS_LEN or "%" in raw:
        raise ValueError("invalid IP address: %r" % shorten(text))
    try:
        addr = ipaddress.ip_address(raw)
    except ValueError:
        raise ValueError("invalid IP address: %r" % shorten(text)) from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def normalize_ip(text: str) -> str:
    """Return the canonical relayers.db key for *text*; ValueError if it is not an IP."""
    # Fast path for the common case, a plain dotted quad: glibc's inet_pton is
    # strict (four decimal octets, no leading zeros, nothing around them), so
    # whatever it accepts is already canonical.
    try:
        socket.inet_pton(socket.AF_INET, text)
        return text
    except (OSError, TypeError, ValueError):
        pass
    return str(parse_ip(text))


def sort_key(key: str) -> tuple:
    """Order map keys by address: IPv4 numerically, then IPv6, then anything else by text."""
    # inet_pton is C-fast; dumps of 100,000 entries sort in a blink.
    for rank, family in ((0, socket.AF_INET), (1, socket.AF_INET6)):
        try:
            return (rank, socket.inet_pton(family, key), key)
        except (OSError, ValueError):
            continue
    return (2, b"", key)
