"""NAME
    relaymilter.policy.decision - decisions as values

DESCRIPTION
    The policy core never talks SMTP or pymilter; it returns one of these
    values and the adapter turns it into setreply() + a return code. Every
    decision names the rule that produced it, for the log line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from relaymilter.replies import Reply


@dataclass(frozen=True)
class Continue:
    rule: str


@dataclass(frozen=True)
class Reject:
    reply: Reply
    rule: str


@dataclass(frozen=True)
class TempFail:
    reply: Reply
    rule: str


Decision = Union[Continue, Reject, TempFail]
