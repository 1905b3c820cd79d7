"""NAME
    relaymilter.address.keys - the spammers-map keys of a sender and of a spammers line

DESCRIPTION
    The normaliser the sender check and the spammers store share, so a line
    of the spammers file and a sender that matches it always produce the same
    key (sendmail's access-db style, every key lowercase, ASCII letters only,
    as makemap folds):

        user+detail@mail.spam.example   the whole address as resolved
        user@mail.spam.example          without +detail (sendmail's F: lookup)
        mail.spam.example               the host
        spam.example, example           each parent domain, down to the TLD

    An address literal ``user@[192.0.2.1]`` is keyed ``[192.0.2.1]`` (the IP
    normalised, as in relayers.db) with no parent walk.  Neither the policy
    core nor the stores own this module: both import it, and it imports
    neither.

DIAGNOSTICS
    normalize_entry() raises ValueError with a short reason.

Stdlib only.
"""

from __future__ import annotations

import unicodedata

from relaymilter.address.resolve import (
    BadAddress,
    Resolved,
    ascii_lower,
    clean_text,
    is_null,
    normalize_domain,
    parent_domains,
    resolve,
)
from relaymilter.ipaddr import parse_ip

_HOST_PUNCT = frozenset("-_.")
_TRAILING_JUNK = frozenset(("Zs", "Zl", "Zp", "Cf"))     # spaces, line/paragraph separators, format chars


def _host_keys(domain: str) -> list[str]:
    return [domain, *parent_domains(domain)]


def literal_key(domain: str) -> str:
    """A literal's key: the IP in its canonical form (``[IPv6:::ffff:192.0.2.1]`` -> ``[192.0.2.1]``).

    Unlike the local-domain check, which compares the exact spelling as
    sendmail's class w does, a blocklist matches every spelling of an IP.
    """
    addr = parse_ip(domain[1:-1])
    return "[ipv6:%s]" % addr if addr.version == 6 else "[%s]" % addr


def address_keys(resolved: Resolved) -> list[str]:
    assert resolved.domain is not None
    domain = resolved.domain
    if domain.startswith("["):
        domain = literal_key(domain)
    local = ascii_lower(resolved.local_part)
    keys = ["%s@%s" % (local, domain)]
    base = local.split("+", 1)[0]
    if base and base != local:
        keys.append("%s@%s" % (base, domain))
    return keys + _host_keys(domain)


def _trimmed(domain: str) -> str:
    """*domain* without the trailing dots, Unicode spaces and invisible characters a sender may add."""
    end = len(domain)
    while end and (domain[end - 1] == "." or unicodedata.category(domain[end - 1]) in _TRAILING_JUNK):
        end -= 1
    return domain[:end]


def lookup_keys(resolved: Resolved) -> list[str]:
    """The keys to look a sender up by: address_keys(), and again for the domain as a list spells it.

    ``x@spam.example..`` and ``x@spam.example`` + U+00A0 name no other
    domain a listing should miss: sendmail drops the dots, and a
    blocklist errs on the side of matching. (Never used to decide what is
    local: there the exact string counts.)
    """
    keys = address_keys(resolved)
    domain = resolved.domain
    if domain is None or domain.startswith("["):
        return keys
    trimmed = _trimmed(domain)
    if trimmed and trimmed != domain:
        keys += [k for k in address_keys(Resolved(resolved.local_part, trimmed)) if k not in keys]
    return keys


def sender_keys(sender: str) -> list[str]:
    """The spammers-map keys to try for *sender*, in order; [] for <>, unqualified or unparseable."""
    if is_null(sender):
        return []
    try:
        resolved = resolve(sender)
    except BadAddress:
        return []
    if resolved.domain is None:
        return []
    return lookup_keys(resolved)


def _check_host(domain: str) -> str:
    """Refuse ASCII punctuation a host name cannot hold (non-ASCII IDN labels pass)."""
    if domain.startswith("["):
        return domain
    for ch in domain:
        if ch.isascii() and not (ch.isalnum() or ch in _HOST_PUNCT):
            raise ValueError("invalid character %r in host name" % ch)
    return domain


def normalize_entry(text: str) -> str:
    """Normalise one spammers line (``user@host`` or ``host``) to its map key; ValueError if invalid.

    A bare IP address is taken as the literal ``[ip]``, the only form a
    sender's domain can take.
    """
    raw = clean_text(text)
    if not raw:
        raise ValueError("empty entry")
    if raw.startswith("."):
        raise ValueError("leading dot: write the domain alone, its subdomains match too")
    if "*" in raw:
        raise ValueError("no wildcards: a domain entry already matches its subdomains")
    if not any(ch in raw for ch in '@%!"<>\\'):
        if not raw.startswith("["):
            try:
                parse_ip(raw)
            except ValueError:
                return _check_host(normalize_domain(raw))
            return literal_key("[%s]" % raw)
        return literal_key(normalize_domain(raw))
    resolved = resolve(raw)
    if resolved.domain is None:
        raise ValueError("not user@host or host")
    _check_host(resolved.domain)
    return address_keys(resolved)[0]
