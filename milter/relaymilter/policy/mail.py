"""NAME
    relaymilter.policy.mail - the MAIL FROM check against the spammers list

DESCRIPTION
    A sender is looked up the way sendmail's access db looks up From:
    entries, every key lowercase (ASCII letters only, as makemap folds):

        user+detail@mail.spam.example   the whole address as resolved
        user@mail.spam.example          without +detail (sendmail's F: lookup)
        mail.spam.example               the host
        spam.example, example           each parent domain, down to the TLD

    Like sendmail's D: lookup the walk goes down to the bare TLD, so an
    entry ``example`` would block every sender under it; that is the
    entry's meaning, and a list that wants less says less.  An address
    literal ``user@[192.0.2.1]`` is looked up as ``[192.0.2.1]`` (the IP
    normalised, as in relayers.db) with no parent walk.

    The sender is resolved first (address.resolve with no local domains):
    a source route is stripped, quotes dropped, a bare ``user%host`` or
    ``host!user`` given its host, a trailing dot dropped.  The null sender
    ``<>`` is never refused and costs no lookup (RFC 5321 requires it for
    bounces); an unqualified sender has no host to list and passes.

    normalize_entry() turns a line of the spammers file into the key the
    lookups will use, through the same code, so the two always agree.

    The lookup is made by relaymilter.policy.session at every MAIL FROM.

DIAGNOSTICS
    An unreadable spammers map -> 451 4.3.0 (SPAMMERS_UNAVAILABLE, answered
    by the session).  A sender that cannot be parsed passes (sender_unparsed): sendmail has
    already refused anything truly malformed before the milter sees it.
    normalize_entry() raises ValueError with a short reason.

Stdlib only: part of the pure policy core.
"""

from __future__ import annotations

from typing import NamedTuple

from relaymilter import replies
from relaymilter.ipaddr import parse_ip
from relaymilter.policy.address import (
    BadAddress,
    Resolved,
    ascii_lower,
    clean_text,
    is_null,
    normalize_domain,
    parent_domains,
    resolve,
)
from relaymilter.policy.decision import Continue, Decision, Reject, TempFail

_HOST_PUNCT = frozenset("-_.")


def _host_keys(domain: str) -> list[str]:
    return [domain, *parent_domains(domain)]


def _address_keys(resolved: Resolved) -> list[str]:
    assert resolved.domain is not None
    local = ascii_lower(resolved.local_part)
    keys = ["%s@%s" % (local, resolved.domain)]
    base = local.split("+", 1)[0]
    if base and base != local:
        keys.append("%s@%s" % (base, resolved.domain))
    return keys + _host_keys(resolved.domain)


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
    return _address_keys(resolved)


class SenderKeys(NamedTuple):
    """The spammers-map keys of a sender, in lookup order (ASCII-lowercased)."""

    keys: tuple[str, ...]


SENDER_OK = Continue("sender_ok")
NULL_SENDER = Continue("null_sender")
SENDER_UNPARSED = Continue("sender_unparsed")
SPAMMER = Reject(replies.ACCESS_DENIED, "spammers")
SPAMMERS_UNAVAILABLE = TempFail(replies.SENDER_CHECK_UNAVAILABLE, "spammers_unavailable")


def mail_plan(sender: str) -> SenderKeys | Decision:
    """The spammers keys to look up for *sender*, or its decision when it needs no lookup.

    Depends only on the sender text, so a caller may memoise it; the lookup
    itself belongs to each MAIL FROM (relaymilter.policy.session).
    """
    if is_null(sender):
        return NULL_SENDER
    try:
        resolved = resolve(sender)
    except BadAddress:
        return SENDER_UNPARSED
    if resolved.domain is None:
        return SENDER_OK
    return SenderKeys(tuple(ascii_lower(key) for key in _address_keys(resolved)))


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
    raw = clean_text(text.strip() if isinstance(text, str) else text)
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
            raw = "[%s]" % raw
        return normalize_domain(raw)
    resolved = resolve(raw)
    if resolved.domain is None:
        raise ValueError("not user@host or host")
    _check_host(resolved.domain)
    return _address_keys(resolved)[0]
