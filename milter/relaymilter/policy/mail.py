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

    The keys come from relaymilter.address.keys, the normaliser the
    spammers store uses for the file's lines (normalize_entry), so the two
    always agree.

    The lookup is made by relaymilter.policy.session at every MAIL FROM.

DIAGNOSTICS
    An unreadable spammers map -> 451 4.3.0 (SPAMMERS_UNAVAILABLE, answered
    by the session).  A sender that cannot be parsed passes (sender_unparsed): sendmail has
    already refused anything truly malformed before the milter sees it.

Stdlib only: part of the pure policy core.
"""

from __future__ import annotations

from typing import NamedTuple

from relaymilter import replies
from relaymilter.address.keys import lookup_keys
from relaymilter.address.resolve import BadAddress, ascii_lower, is_null, resolve
from relaymilter.policy.decision import Continue, Decision, Reject, TempFail

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
    return SenderKeys(tuple(ascii_lower(key) for key in lookup_keys(resolved)))
