"""NAME
    relaymilter.policy - the pure decision core

DESCRIPTION
    Address resolution (address), where a recipient goes and who the client
    is (rcpt), the spammers keys of a sender (mail), and the one decision
    path that puts them together for a connection (session).  Decisions are
    values (decision); the maps are asked
    through lookup callables handed in, so nothing here opens a file, a
    socket or a database, and everything is tested without them.

    Stdlib only, and never Milter, berkeleydb, yaml, relaymilter.store or
    relaymilter.adapter: tests/unit/test_policy_imports.py guards that.
"""

from __future__ import annotations

from relaymilter.policy.address import (
    BadAddress,
    Resolved,
    is_null,
    normalize_domain,
    parent_domains,
    resolve,
)
from relaymilter.policy.decision import Continue, Decision, Reject, TempFail
from relaymilter.policy.mail import SenderKeys, mail_plan, normalize_entry, sender_keys
from relaymilter.policy.rcpt import Client, Destination, Place, RcptPolicy, destination
from relaymilter.policy.session import RcptVerdict, Session, Sources, Standing

__all__ = [
    "BadAddress",
    "Client",
    "Continue",
    "Decision",
    "Destination",
    "Place",
    "RcptPolicy",
    "RcptVerdict",
    "Reject",
    "Resolved",
    "SenderKeys",
    "Session",
    "Sources",
    "Standing",
    "TempFail",
    "destination",
    "is_null",
    "mail_plan",
    "normalize_domain",
    "normalize_entry",
    "parent_domains",
    "resolve",
    "sender_keys",
]
