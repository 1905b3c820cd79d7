"""NAME
    relaymilter.harness.runner - run one scripted SMTP session against a milter

DESCRIPTION
    run_session() plays a whole session (client address, HELO, optional AUTH
    user, MAIL FROM, recipients, optionally headers and body) through a
    MilterSession and returns one StepResult per planned step.

    It follows what sendmail would do after each answer, so the results are
    what a real MTA would have asked the milter:
      - a final answer at CONNECT or HELO (reject, tempfail, accept, ...)
        ends the milter's part of the connection: nothing more is sent;
      - a rejected (tempfailed, discarded) MAIL ends the transaction: the
        message is aborted and no RCPT is sent;
      - a rejected RCPT drops only that recipient; the next one goes on;
      - accept or discard at MAIL/RCPT ends the milter's part of the message;
      - DATA is only reached with at least one accepted recipient;
      - a transaction that does not reach end of message is aborted.
    Steps that were planned but not sent are reported as ``not sent`` with
    the reason, never silently dropped.

DIAGNOSTICS
    Errors do not raise: SessionResult.error holds the MilterUnreachable or
    ProtocolError (which names the step) and ``steps`` what was done before.
    A malformed client address raises ValueError before anything is sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Tuple, Union

from relaymilter.harness.client import MilterSession, bracket
from relaymilter.harness.errors import HarnessError
from relaymilter.harness.protocol import MILTER_CHUNK_SIZE
from relaymilter.harness.reply import Reply
from relaymilter.ipaddr import parse_ip

# Answers that end the message (after MAIL) and make sendmail abort the filters.
_ABORTING = frozenset({"reject", "tempfail", "discard"})
# Answers that end the milter's part of the whole connection at any step.
_CONNECTION_ENDING = frozenset({"shutdown", "connfail"})


@dataclass(frozen=True)
class SessionSpec:
    """What the simulated SMTP client does. The data phase runs when headers or body is given."""

    client: str
    mail_from: str
    rcpts: Sequence[str]
    helo: Optional[str] = None
    auth: Optional[str] = None
    client_name: Optional[str] = None
    headers: Optional[Sequence[Tuple[str, str]]] = None
    body: Optional[Union[str, bytes]] = None

    @property
    def has_data(self) -> bool:
        return self.headers is not None or self.body is not None


@dataclass(frozen=True)
class StepResult:
    """One planned step: what was sent and what the milter answered (reply None: not sent)."""

    step: str
    arg: str
    reply: Optional[Reply]
    reason: str = ""
    index: int = 0

    @property
    def label(self) -> str:
        return ("%s %s" % (self.step.upper(), self.arg)).rstrip()

    @property
    def answer(self) -> str:
        """The string scenarios compare: ``str(reply)``, or ``not sent``."""
        return str(self.reply) if self.reply is not None else "not sent"

    def describe(self) -> str:
        if self.reply is None:
            return "not sent (%s)" % self.reason
        return self.reply.describe()


@dataclass
class SessionResult:
    """The steps of one session, in order, and the error that stopped it, if any."""

    steps: List[StepResult] = field(default_factory=list)
    error: Optional[HarnessError] = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def __iter__(self) -> Iterator[StepResult]:
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, i: int) -> StepResult:
        return self.steps[i]


def body_bytes(body: Union[str, bytes]) -> bytes:
    """A body as the MTA sends it: CRLF line ends (str bodies are UTF-8)."""
    raw = body.encode("utf-8") if isinstance(body, str) else body
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _plan(spec: SessionSpec) -> List[Tuple[str, str, int]]:
    plan = [("connect", spec.client, 0)]
    if spec.helo is not None:
        plan.append(("helo", spec.helo, 0))
    plan.append(("mail", bracket(spec.mail_from), 0))
    plan.extend(("rcpt", bracket(r), i) for i, r in enumerate(spec.rcpts))
    if spec.has_data:
        plan.append(("data", "", 0))
        plan.extend(("header", "%s: %s" % h, i) for i, h in enumerate(spec.headers or ()))
        plan.append(("eoh", "", 0))
        raw = body_bytes(spec.body or b"")
        chunks = [raw[i:i + MILTER_CHUNK_SIZE] for i in range(0, len(raw), MILTER_CHUNK_SIZE)]
        plan.extend(("body", "%d bytes" % len(c), i) for i, c in enumerate(chunks))
        plan.append(("eom", "", 0))
    return plan


class _Run:
    """Walks the plan, recording each step; ``skip_*`` marks the rest as not sent."""

    def __init__(self, spec: SessionSpec) -> None:
        self.plan = _plan(spec)
        self.pos = 0
        self.result = SessionResult()

    def record(self, reply: Reply) -> Reply:
        step, arg, index = self.plan[self.pos]
        self.result.steps.append(StepResult(step, arg, reply, index=index))
        self.pos += 1
        return reply

    def skip_while(self, step: str, reason: str) -> None:
        while self.pos < len(self.plan) and self.plan[self.pos][0] == step:
            step_, arg, index = self.plan[self.pos]
            self.result.steps.append(StepResult(step_, arg, None, reason, index))
            self.pos += 1

    def skip_rest(self, reason: str) -> None:
        while self.pos < len(self.plan):
            self.skip_while(self.plan[self.pos][0], reason)


def run_session(socket_spec: str, spec: SessionSpec, timeout: float = 10.0) -> SessionResult:
    """Play ``spec`` against the milter at ``socket_spec``; see the module docstring."""
    parse_ip(spec.client)  # refuse a malformed address before touching the milter
    run = _Run(spec)
    try:
        with MilterSession(socket_spec, timeout=timeout) as session:
            _converse(session, spec, run)
    except HarnessError as err:
        run.result.error = err
    return run.result


def _converse(s: MilterSession, spec: SessionSpec, run: _Run) -> None:
    r = run.record(s.connect(spec.client, spec.client_name))
    if r.final:
        return run.skip_rest(_after("CONNECT", r))
    if spec.helo is not None:
        r = run.record(s.helo(spec.helo))
        if r.final:
            return run.skip_rest(_after("HELO", r))
    r = run.record(s.mail(spec.mail_from, auth=spec.auth))
    if r.final:
        if r.action in _ABORTING:
            s.abort()
        return run.skip_rest(_after("MAIL", r))
    accepted = 0
    for rcpt in spec.rcpts:
        r = run.record(s.rcpt(rcpt))
        if r.action in _CONNECTION_ENDING:
            return run.skip_rest(_after("RCPT", r))
        if r.action in ("accept", "discard"):
            # The milter is done with this message: sendmail asks it nothing more.
            return run.skip_rest(_after("RCPT", r))
        if r.action == "continue":
            accepted += 1
    if not spec.has_data:
        s.abort()  # the client leaves without DATA: the MTA aborts the message
        return None
    if not accepted:
        s.abort()
        return run.skip_rest("no recipient was accepted")
    return _data_phase(s, spec, run)


def _data_phase(s: MilterSession, spec: SessionSpec, run: _Run) -> None:
    r = run.record(s.data())
    if r.final:
        return _end_message(s, run, r, "DATA")
    for name, value in spec.headers or ():
        r = run.record(s.header(name, value))
        if r.final:
            return _end_message(s, run, r, "HEADER")
    r = run.record(s.eoh())
    if r.final:
        return _end_message(s, run, r, "EOH")
    raw = body_bytes(spec.body or b"")
    for offset in range(0, len(raw), MILTER_CHUNK_SIZE):
        r = run.record(s.body(raw[offset:offset + MILTER_CHUNK_SIZE]))
        if r.action == "skip":
            run.skip_while("body", "milter asked to skip the rest of the body")
            break
        if r.final:
            return _end_message(s, run, r, "BODY")
    run.record(s.end_of_message())
    return None


def _after(where: str, r: Reply) -> str:
    """Why later steps were not sent: ``MAIL got 550 5.7.1``, ``CONNECT got reject``."""
    return "%s got %s" % (where, " ".join(x for x in (r.code, r.xcode) if x) or r.action)


def _end_message(s: MilterSession, run: _Run, r: Reply, where: str) -> None:
    if r.action in _ABORTING:
        s.abort()
    run.skip_rest(_after(where, r))
