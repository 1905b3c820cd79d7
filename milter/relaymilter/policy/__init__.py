"""NAME
    relaymilter.policy - the pure decision core

DESCRIPTION
    Where a recipient goes and who the client is (rcpt), the sender check's
    plan (mail), and the one decision path that puts them together for a
    connection (session, with its values and interfaces in verdict), on addresses resolved by the neutral
    relaymilter.address package.  Decisions are values (decision); the maps
    are asked through the Sources a session is handed, so nothing here opens
    a file, a socket or a database, and everything is tested without them.

    Stdlib only, and never Milter, berkeleydb, yaml, relaymilter.store or
    relaymilter.adapter: tests/unit/test_policy_imports.py guards that.
"""

from __future__ import annotations

from relaymilter.policy.decision import Continue, Decision, Reject, TempFail
from relaymilter.policy.mail import SenderKeys, mail_plan
from relaymilter.policy.rcpt import Client, Destination, Place, RcptPolicy, destination
from relaymilter.policy.session import Session
from relaymilter.policy.verdict import RcptVerdict, Sources, Standing

__all__ = [
    "Client",
    "Continue",
    "Decision",
    "Destination",
    "Place",
    "RcptPolicy",
    "RcptVerdict",
    "Reject",
    "SenderKeys",
    "Session",
    "Sources",
    "Standing",
    "TempFail",
    "destination",
    "mail_plan",
]
