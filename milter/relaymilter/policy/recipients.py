"""NAME
    relaymilter.policy.recipients - is a local domain's user known? (local_recipients)

DESCRIPTION
    With local_recipients configured, a recipient at a local domain must be
    known to one of its sources (passwd, aliases, user lists, maps), else
    it is refused with 550 5.1.1 User unknown, for every client, trusted and
    authenticated ones included, as Postfix's local_recipient_maps does.
    ``postmaster`` and ``MAILER-DAEMON`` are always known (RFC 5321 4.5.1;
    Postfix exempts them too). Relay-domain recipients are never checked:
    the next hop knows its users.

    query() turns what the address resolved to into the lookup keys:
    the local part dequoted and ASCII-lowercased, then, with a
    recipient_delimiter, the same without its extension (``user+tag`` ->
    ``user``): user+tag is known when user is, and an entry for user+tag
    itself is found first. check() asks the sources through the lookup
    callable handed in, which names the source that knew the user.

DIAGNOSTICS
    The lookup raising StoreUnavailable (a source that cannot be read or
    parsed now) gives 451 4.3.0 Temporary lookup failure
    (rule=recipients_unavailable): never a 250 for an unknown user, never a
    550 for a known one.

Stdlib only: part of the pure policy core.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Optional

from relaymilter import replies
from relaymilter.errors import StoreUnavailable
from relaymilter.address.resolve import Resolved
from relaymilter.policy.decision import Continue, Decision, Reject, TempFail
from relaymilter.address.tokens import ascii_lower, dequote

ALWAYS_KNOWN = frozenset({"postmaster", "mailer-daemon"})

KNOWN = Continue("local_domain")
USER_UNKNOWN = Reject(replies.USER_UNKNOWN, "unknown_recipient")
LOOKUP_FAILED = TempFail(replies.RECIPIENT_LOOKUP_FAILED, "recipients_unavailable")

# lookup(local parts, domain) -> the name of the source that knows one of them, or None.
Lookup = Callable[[tuple[str, ...], Optional[str]], Optional[str]]


class Query(NamedTuple):
    """The keys a local recipient is looked up by: local parts (most specific first) and domain."""

    locals: tuple[str, ...]
    domain: Optional[str]

    def __str__(self) -> str:
        return self.locals[0] if self.domain is None else "%s@%s" % (self.locals[0], self.domain)


class RecipientCheck(NamedTuple):
    """check()'s decision and, for a known user, the source that knew it ("postmaster" for the exempt names)."""

    decision: Decision
    source: Optional[str] = None


# check()'s answers are values: made once (a tuple costs less than a frozen dataclass per RCPT).
_EXEMPT = RecipientCheck(KNOWN, "postmaster")
_UNKNOWN = RecipientCheck(USER_UNKNOWN)
_FAILED = RecipientCheck(LOOKUP_FAILED)
_KNOWN_BY = {kind: RecipientCheck(KNOWN, kind) for kind in ("passwd", "aliases", "list", "map")}


def query(resolved: Resolved, delimiter: str = "") -> Optional[Query]:
    """The lookup keys of a local recipient, or None for a name that is always known."""
    local = resolved.local_part
    # dequote walks the text character by character: only a quoted or escaped local part needs it.
    local = ascii_lower(dequote(local) if '"' in local or "\\" in local else local)
    if delimiter:
        cut = min((i for i in (local.find(ch) for ch in delimiter) if i > 0), default=-1)
        if cut > 0:
            base = local[:cut]
            if local in ALWAYS_KNOWN or base in ALWAYS_KNOWN:
                return None
            return Query((local, base), resolved.domain)
    if local in ALWAYS_KNOWN:
        return None
    return Query((local,), resolved.domain)


def check(q: Optional[Query], lookup: Lookup) -> RecipientCheck:
    """The decision for one local recipient (see the module notes)."""
    if q is None:
        return _EXEMPT
    try:
        source = lookup(q[0], q[1])
    except StoreUnavailable:
        return _FAILED
    if source is None:
        return _UNKNOWN
    known = _KNOWN_BY.get(source)
    return known if known is not None else RecipientCheck(KNOWN, source)
