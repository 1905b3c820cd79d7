"""NAME
    relaymilter.harness.errors - what the milter test harness can fail with

DESCRIPTION
    The harness talks to a milter it does not trust: the milter may be down,
    answer garbage, stop answering, or close the socket half-way. Every such
    case ends in one of these exceptions, whose message names the protocol
    step (``RCPT <bob@x>``) so a person reading a one-line error knows where
    the conversation broke.

DIAGNOSTICS
    ProtocolError     the milter broke the protocol or did not answer in time
    MilterUnreachable the socket could not be opened at all
    SocketSpecError   a socket specification could not be parsed (bad usage)
    ScenarioError     a scenario file is invalid; the message starts FILE:LINE:
"""

from __future__ import annotations

from relaymilter.errors import RelaymilterError


class HarnessError(RelaymilterError):
    """Base class of every error the milter test harness raises on purpose."""


class ProtocolError(HarnessError):
    """The milter broke the milter protocol, closed early or did not answer.

    ``step`` is the label of the step being performed (``"OPTNEG"``,
    ``"RCPT <bob@x>"``), empty while decoding a packet outside any step.
    """

    def __init__(self, detail: str, step: str = "") -> None:
        self.detail = detail
        self.step = step
        super().__init__(self._text())

    def _text(self) -> str:
        if self.step:
            return "%s: protocol error: %s" % (self.step, self.detail)
        return "protocol error: %s" % self.detail

    def at(self, step: str) -> "ProtocolError":
        """Return the same error, now naming ``step`` (codec errors know none)."""
        return ProtocolError(self.detail, step)


class MilterUnreachable(HarnessError):
    """The milter's socket could not be connected to."""

    def __init__(self, spec: str, reason: str) -> None:
        self.spec = spec
        self.reason = reason
        super().__init__("cannot reach milter at %s: %s" % (spec, reason))


class SocketSpecError(HarnessError, ValueError):
    """A socket specification (``inet:PORT@HOST``, ``unix:/path``) is malformed."""


class ScenarioError(HarnessError):
    """A scenario file is invalid; the message starts with ``FILE:LINE:``."""
