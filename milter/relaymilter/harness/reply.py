"""NAME
    relaymilter.harness.reply - a milter's answers, as values

DESCRIPTION
    The codec turns response packets into these values and the client hands
    them to callers. ``Reply`` is the milter's decision on one step:

        r.action   'continue', 'accept', 'reject', 'tempfail', 'discard',
                   'skip', 'shutdown' or 'connfail'
        r.code     '550'      (only when the milter sent a full reply code)
        r.xcode    '5.7.1'
        r.text     'Relaying denied'
        str(r)     '550 5.7.1 Relaying denied', or just the action

    A reply code (SMFIR_REPLYCODE) carries its action in its first digit:
    4xx is a tempfail, 5xx a reject, as sendmail reads it.

    At end of message a milter may first send modification requests
    (add a header, delete a recipient, ...); they are kept, in order, on
    the final ``Reply.modifications``.

    A step the milter declined in option negotiation is not sent at all and
    a step whose reply it declined is not waited for; in both cases the MTA
    goes on as if the milter had said continue, so the harness reports
    ``continue`` with ``sent`` or ``awaited`` false and a ``note`` saying why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Tuple

# Actions after which an MTA sends nothing more to the milter for the
# message (or, at connect/helo, for the whole connection).
FINAL_ACTIONS = frozenset({"accept", "reject", "tempfail", "discard", "shutdown", "connfail"})


@dataclass(frozen=True)
class Modification:
    """One end-of-message modification request."""

    def describe(self) -> str:
        """One line for reports; each kind of modification says what it changes."""
        return type(self).__name__.lower()

    def __str__(self) -> str:
        return self.describe()


@dataclass(frozen=True)
class AddRcpt(Modification):
    rcpt: str
    args: str = ""

    def describe(self) -> str:
        return "addrcpt %s%s" % (self.rcpt, " " + self.args if self.args else "")


@dataclass(frozen=True)
class DelRcpt(Modification):
    rcpt: str

    def describe(self) -> str:
        return "delrcpt %s" % self.rcpt


@dataclass(frozen=True)
class AddHeader(Modification):
    name: str
    value: str

    def describe(self) -> str:
        return "addheader %s: %s" % (self.name, self.value)


@dataclass(frozen=True)
class InsHeader(Modification):
    index: int
    name: str
    value: str

    def describe(self) -> str:
        return "insheader %d %s: %s" % (self.index, self.name, self.value)


@dataclass(frozen=True)
class ChgHeader(Modification):
    """Change the index-th (1-based) occurrence of a header; empty value deletes it."""

    index: int
    name: str
    value: str

    def describe(self) -> str:
        if not self.value:
            return "chgheader %s[%d]: (deleted)" % (self.name, self.index)
        return "chgheader %s[%d]: %s" % (self.name, self.index, self.value)


@dataclass(frozen=True)
class ReplBody(Modification):
    chunk: bytes

    def describe(self) -> str:
        return "replbody %d bytes" % len(self.chunk)


@dataclass(frozen=True)
class ChgFrom(Modification):
    sender: str
    args: str = ""

    def describe(self) -> str:
        return "chgfrom %s%s" % (self.sender, " " + self.args if self.args else "")


@dataclass(frozen=True)
class Quarantine(Modification):
    reason: str

    def describe(self) -> str:
        return "quarantine %s" % self.reason


@dataclass(frozen=True)
class Progress:
    """SMFIR_PROGRESS: the milter is still working; the MTA restarts its timer."""


@dataclass(frozen=True)
class OptNeg:
    """The milter's answer to option negotiation."""

    version: int
    actions: int
    protocol: int
    # SMFIR_SETSYMLIST: macro stage (SMFIM_*) -> space-separated macro names
    symlists: Tuple[Tuple[int, str], ...] = ()


@dataclass(frozen=True)
class Reply:
    """The milter's decision on one step (see the module docstring)."""

    action: str
    code: str = ""
    xcode: str = ""
    text: str = ""
    raw: str = ""
    modifications: Tuple[Modification, ...] = field(default=())
    sent: bool = True
    awaited: bool = True
    note: str = ""

    def __str__(self) -> str:
        if self.raw:
            # A multi-line reply arrives with CRLF between lines.
            return self.raw.replace("\r\n", "\n")
        return self.action

    @property
    def final(self) -> bool:
        """True when an MTA sends nothing more for this message/connection."""
        return self.action in FINAL_ACTIONS

    def describe(self) -> str:
        """``str(self)`` plus why it was not sent or not awaited, if so."""
        if self.note:
            return "%s (%s)" % (self, self.note)
        return str(self)
