"""NAME
    relaymilter.policy - the pure decision core

DESCRIPTION
    Address resolution (address), the RCPT TO decision (rcpt) and the MAIL
    FROM check (mail).  Decisions are values (decision); the maps are asked
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
from relaymilter.policy.mail import check_mail, normalize_entry, sender_keys
from relaymilter.policy.rcpt import Client, RcptPolicy, RcptVerdict, check_rcpt, evaluate_rcpt

__all__ = [
    "BadAddress",
    "Client",
    "Continue",
    "Decision",
    "RcptPolicy",
    "RcptVerdict",
    "Reject",
    "Resolved",
    "TempFail",
    "check_mail",
    "check_rcpt",
    "evaluate_rcpt",
    "is_null",
    "normalize_domain",
    "normalize_entry",
    "parent_domains",
    "resolve",
    "sender_keys",
]
