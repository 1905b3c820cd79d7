"""NAME
    relaymilter.policy.decision - decisions as values

DESCRIPTION
    The policy core never talks SMTP or pymilter; it returns one of these
    values and the adapter turns it into setreply() + a return code. Every
    decision names the rule that produced it, for the log line.  Each is
    its own type, so a Reject can never compare equal to a TempFail.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from relaymilter.replies import Reply


@dataclass(frozen=True)
class Continue:
    """Let the step through."""

    rule: str


@dataclass(frozen=True)
class Reject:
    """Refuse for good (5xx)."""

    reply: Reply
    rule: str


@dataclass(frozen=True)
class TempFail:
    """Refuse for now (4xx): the decision cannot be made safely at the moment."""

    reply: Reply
    rule: str
    cause: str = field(default="", compare=False)   # why, for the log line (a store's error)


Decision = Union[Continue, Reject, TempFail]
