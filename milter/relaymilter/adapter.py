"""NAME
    relaymilter.adapter - pymilter callbacks in, policy verdicts out

DESCRIPTION
    The only module that imports pymilter. callbacks() builds the functions
    run() registers with pymilter's C module, one per milter step relaymilter
    uses; each SMTP connection gets one Connection (the libmilter context's
    private object), which holds a policy Session. A callback hands the
    session what the MTA sent, gets a typed verdict back (relaymilter.policy:
    Continue, Reject or TempFail, with reply and rule) and turns it into
    setreply() + a return code; the decision itself is never made here.

    The Connection snapshots the Runtime current when it opened, so a SIGHUP
    reload never changes the rules half-way through a session. State lives
    on that object, never in threading.local: libmilter's worker pool may run
    one connection's callbacks on different threads.

    Negotiation asks for CONNECT (with no reply: P_NR_CONN), MAIL, RCPT and
    DATA, and declines the rest. DATA is asked for although relaymilter has
    nothing to say there: pymilter answers it CONTINUE in C (no Python
    callback), and the answer keeps the MTA's stream moving. A milter that
    declines DATA still gets the step's macro packet from Postfix, with no
    reply expected; over TCP, Nagle on the MTA's side and delayed ACK on ours
    then hold the next packet about 40 ms, every message.

    One log line per decision, Postfix style, queued on the decision log
    (relaymilter.decisionlog):
      <id>: reject: RCPT from [192.0.2.7]: 550 5.7.1 <bob@remote.example>: Relaying denied; from=<a@b> to=<bob@remote.example> resolved=bob@remote.example rule=default_reject
    A relayed recipient's line names the identity (user=alice); a refusal
    a warn-only rule family did not make is logged as "would reject:" in
    the same shape, and the step continues. A rule step may add a note
    after the rule (dnsbl: site=zen.spamhaus.org answer=127.0.0.4 weight=3/3).
    <id> is the connection id; the log's own prefix carries the worker's PID.

DIAGNOSTICS
    Fail closed: any exception in a callback is logged with its traceback
    and answered 451 4.3.0 (TEMPFAIL), never CONTINUE; an exception in
    connect, which sends no reply, is remembered and MAIL and RCPT get the
    451. pymilter's own exception policy is set to TEMPFAIL as a second guard.
    MAIL or RCPT with no CONNECT before it is judged as an unknown client
    (a stranger: no relaying), and so is a session after a QUIT_NC that
    libmilter honours (it closes the context; the next one starts unknown).
    libmilter ignores a QUIT_NC sent in the middle of a transaction (its
    state table allows one only after the end of a message): what follows is,
    for libmilter and so for relaymilter, more of the same session. No MTA
    sends that; a peer that can write to the milter socket could as well
    send a CONNECT with any address, so the socket's permissions are the
    guard (packaging/systemd: a private directory).
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import socket
import time
from typing import Any, Callable, Optional

import Milter
from milter import error as MilterError  # pymilter's C extension

from relaymilter import replies
from relaymilter.decisionlog import printable
from relaymilter.policy.decision import Continue, Decision, Reject, TempFail
from relaymilter.policy.rcpt import UNKNOWN_CLIENT, Client
from relaymilter.policy.session import Session
from relaymilter.runtime import Runtime, RuntimeHolder

log = logging.getLogger("relaymilter")

_ids = itertools.count(1)

# The protocol flags negotiate() takes away from the MTA's offer: the steps
# relaymilter needs (CONNECT, MAIL, RCPT, DATA) and their replies.
_WANTED = (Milter.P_NOCONNECT | Milter.P_NOMAIL | Milter.P_NORCPT | Milter.P_NODATA
           | Milter.P_NR_MAIL | Milter.P_NR_RCPT | Milter.P_NR_DATA)
_INTERNAL = TempFail(replies.INTERNAL_ERROR, "internal_error")
LOG_TEXT_MAX = 320       # characters of an address or AUTH name a log line shows
_clock = time.perf_counter


def _brackets(addr: str) -> str:
    if addr[:1] == "<" and addr[-1:] == ">":
        return addr
    addr = addr.strip(" \t")       # SMTP's blanks only: a trailing U+00A0 is part of what was sent
    return addr if addr.startswith("<") else "<%s>" % addr


def _macro(ctx: Any, name: str) -> Optional[str]:
    """A macro's value; one that is not UTF-8 is decoded leniently rather than failing the step."""
    try:
        value = ctx.getsymval(name)
    except UnicodeDecodeError as exc:
        value = exc.object.decode("utf-8", "backslashreplace")
    return value or None


class Connection:
    """One SMTP connection as seen through the milter protocol."""

    __slots__ = ("ctx", "rt", "session", "note", "tally", "tag", "client_text", "broken", "protocol")

    def __init__(self, holder: RuntimeHolder, ctx: Any) -> None:
        self.ctx = ctx
        self.rt = holder.current
        self.session = Session(self.rt)
        self.note: Optional[Callable[[str], None]] = holder.decisions.append   # None: not logged
        self.tally = holder.tally           # the metrics' counters (relaymilter.metrics.milter); None: off
        self.tag = "%06X" % next(_ids)      # the connection id as logged
        self.client_text = UNKNOWN_CLIENT.text
        self.broken = False                 # connect failed: every later step tempfails
        self.protocol = 0                   # what negotiation agreed to
        ctx.setpriv(self)

    def negotiate(self, opts: list[int]) -> int:
        """Take from the MTA's offer only the steps and replies relaymilter needs."""
        try:
            opts[1] = self.protocol = opts[1] & ~_WANTED
            opts[2] = 0
            opts[3] = 0
        except (IndexError, TypeError):
            return Milter.ALL_OPTS
        return Milter.CONTINUE

    def connect(self, hostname: str, family: int, hostaddr: Any) -> None:
        # No reply is sent for connect (P_NR_CONN): a failure here is kept
        # and answered at MAIL and RCPT instead, so it is never lost.
        try:
            rt = self.rt
            if family in (socket.AF_INET, socket.AF_INET6) and hostaddr:
                client: Client = rt.client(str(hostaddr[0]))
            elif family == socket.AF_UNIX:
                client = rt.policy.local_client()
            else:
                client = UNKNOWN_CLIENT
            self.session.connect(client)
            name = printable(hostname or "", 80)
            self.client_text = client.text if not name or name[0] == "[" else name + client.text
            self.broken = False
        except Exception:  # noqa: BLE001 - the fail-closed guard: a bug must tempfail, never relay
            self.broken = True
            log.exception("%s: internal error in connect from %s; MAIL and RCPT will get %s",
                          self.tag, self.client_text, replies.INTERNAL_ERROR)

    def mail(self, mailfrom: str) -> int:
        try:
            sender = _brackets(mailfrom)
            auth = _macro(self.ctx, "{auth_authen}")
            extra = "sasl_username=%s " % printable(auth, LOG_TEXT_MAX) if auth else ""
            if self.broken:
                self.session.sender = sender        # for the log line
                decision: Decision = _INTERNAL
            else:
                decision = self.session.mail(sender, auth)
                extra += self.session.note
            return self._answer("MAIL", decision, None, extra)
        except Exception:  # noqa: BLE001 - the fail-closed guard: a bug must tempfail, never relay
            return self._internal_error("envfrom")

    def rcpt(self, to: str) -> int:
        started = _clock() if self.tally is not None else 0.0
        try:
            rcpt = _brackets(to)
            if self.broken:
                return self._answer("RCPT", _INTERNAL, rcpt, "", started)
            verdict = self.session.rcpt(rcpt)
            extra = verdict.destination.detail + self.session.note
            return self._answer("RCPT", verdict.decision, rcpt, extra, started, verdict.source, verdict.note)
        except Exception:  # noqa: BLE001 - the fail-closed guard: a bug must tempfail, never relay
            return self._internal_error("envrcpt", started)

    def close(self) -> None:
        try:
            self.session.close()
        except Exception:  # noqa: BLE001 - nothing to answer at close: logged, and the connection ends
            log.exception("%s: internal error at close from %s", self.tag, self.client_text)

    def _answer(self, stage: str, decision: Decision, rcpt: Optional[str], extra: str, started: float = 0.0,
                source: Optional[str] = None, note: str = "") -> int:
        """Log and count the decision (*note* after its rule) and turn it into setreply() + a pymilter return code."""
        if note:
            note = " " + note
        if self.tally is not None:
            self.tally.decided(stage, decision, started, None if self.broken else self.session.warned)
        if type(decision) is Continue:
            if self.note is not None:
                warned = self.session.warned
                if warned is not None and not self.broken:     # warn-only mode (policy.modes)
                    self._log_refusal(stage, warned, rcpt, extra, "would reject", note)
                else:
                    self._log_pass(stage, decision, rcpt, extra, source, note)
            return Milter.CONTINUE
        assert isinstance(decision, (Reject, TempFail))
        if self.note is not None:
            self._log_refusal(stage, decision, rcpt, extra, "", note)
        reply = decision.reply
        # Straight to the context: Base.setreply's '%' check is for texts we
        # do not own; every reply in relaymilter.replies is a constant without '%'.
        self.ctx.setreply(reply.code, reply.xcode, reply.text)
        return Milter.REJECT if type(decision) is Reject else Milter.TEMPFAIL

    def _log_pass(self, stage: str, decision: Continue, rcpt: Optional[str], extra: str,
                  source: Optional[str] = None, note: str = "") -> None:
        assert self.note is not None
        sender = printable(self.session.sender, LOG_TEXT_MAX)
        rule = decision.rule + note
        if rcpt is None:
            self.note(_PASS_MAIL % (self.tag, self.client_text, sender, extra, decision.rule))
        elif source is None:
            self.note(_PASS_RCPT % (self.tag, self.client_text, sender, printable(rcpt, LOG_TEXT_MAX),
                                    extra, rule))
        else:   # local_recipients: which source knew the user
            self.note(_PASS_RCPT_KNOWN % (self.tag, self.client_text, sender, printable(rcpt, LOG_TEXT_MAX),
                                          extra, rule, source))

    def _log_refusal(self, stage: str, decision: Decision, rcpt: Optional[str], extra: str,
                     verb: str = "", note: str = "") -> None:
        assert self.note is not None and not isinstance(decision, Continue)
        reply = decision.reply
        verb = verb or ("reject" if type(decision) is Reject else "tempfail")
        sender = printable(self.session.sender, LOG_TEXT_MAX)
        rule = decision.rule
        if type(decision) is TempFail and decision.cause:      # why a map was unavailable
            rule = '%s cause="%s"' % (rule, printable(decision.cause, LOG_TEXT_MAX).replace('"', "'"))
        rule += note
        if rcpt is None:
            self.note(_REFUSE_MAIL % (self.tag, verb, stage, self.client_text, reply.code, reply.xcode,
                                      sender, reply.text, sender, extra, rule))
        else:
            shown = printable(rcpt, LOG_TEXT_MAX)
            self.note(_REFUSE_RCPT % (self.tag, verb, stage, self.client_text, reply.code, reply.xcode,
                                      shown, reply.text, sender, shown, extra, rule))

    def _internal_error(self, stage: str, started: float = 0.0) -> int:
        """The fail-closed answer: log the traceback, 451 4.3.0, TEMPFAIL."""
        log.exception("%s: internal error in %s from %s; answering %s", self.tag, stage,
                      self.client_text, replies.INTERNAL_ERROR)
        if self.tally is not None:
            self.tally.decided("RCPT" if stage == "envrcpt" else "MAIL", _INTERNAL, started)
        try:
            reply = replies.INTERNAL_ERROR
            self.ctx.setreply(reply.code, reply.xcode, reply.text)
        except Exception:  # noqa: BLE001 - TEMPFAIL must go out even if setreply fails
            log.exception("%s: cannot set the reply", self.tag)
        return Milter.TEMPFAIL


# The decision lines (see the module notes); the connection id is Connection.tag.
_PASS_MAIL = "%s: pass: MAIL from %s: from=%s %srule=%s"
_PASS_RCPT = "%s: pass: RCPT from %s: from=%s to=%s %srule=%s"
_PASS_RCPT_KNOWN = _PASS_RCPT + " source=%s"
_REFUSE_MAIL = "%s: %s: %s from %s: %s %s %s: %s; from=%s %srule=%s"
_REFUSE_RCPT = "%s: %s: %s from %s: %s %s %s: %s; from=%s to=%s %srule=%s"


def callbacks(holder: RuntimeHolder) -> dict[str, Callable[..., int]]:
    """The functions run() registers with pymilter's C module, by step name.

    Each is one Python call per milter step; the connection's Connection is
    the context's private object, created at negotiation (or at the first
    step of an MTA that skipped it).
    """

    def conn(ctx: Any) -> Connection:
        found = ctx.getpriv()
        return found if found else Connection(holder, ctx)

    def negotiate(ctx: Any, opts: list[int]) -> int:
        return Connection(holder, ctx).negotiate(opts)

    def connect(ctx: Any, hostname: str, family: int, hostaddr: Any) -> int:
        c = conn(ctx)
        c.connect(hostname, family, hostaddr)
        return Milter.NOREPLY if c.protocol & Milter.P_NR_CONN else Milter.CONTINUE

    def envfrom(ctx: Any, mailfrom: bytes, *esmtp: bytes) -> int:
        return conn(ctx).mail(mailfrom.decode("utf-8", "surrogateescape"))

    def envrcpt(ctx: Any, to: bytes, *esmtp: bytes) -> int:
        return conn(ctx).rcpt(to.decode("utf-8", "surrogateescape"))

    def close(ctx: Any) -> int:
        found = ctx.getpriv()
        if found:
            found.ctx = None     # the context and this object refer to each other
            found.close()
        return Milter.CONTINUE

    return {"negotiate": negotiate, "connect": connect, "envfrom": envfrom, "envrcpt": envrcpt, "close": close}


def open_socket(socket_spec: str, name: str = "relaymilter") -> None:
    """Open the listening socket in this process, before any worker is forked (libmilter keeps it).

    Each worker's serve() finds it open and accepts on it: N processes share
    one socket. An existing unix socket file is replaced. Raises OSError
    naming the cause (EADDRINUSE, EACCES, ...) when it cannot be opened.
    """
    import milter as _milter  # pymilter's C extension

    _milter.setconn(socket_spec)
    _milter.register(name)
    try:
        _milter.opensocket(True)
    except MilterError:
        raise _socket_error(socket_spec) from None


def serve(holder: RuntimeHolder, name: str = "relaymilter") -> None:
    """Serve the milter protocol on the socket open_socket() opened, until libmilter stops (blocks).

    Registers with pymilter's C module directly rather than through
    Milter.runmilter: only the steps relaymilter uses get a Python callback,
    so ABORT (sent after every transaction) and DATA never take the GIL.
    """
    import milter as _milter  # pymilter's C extension

    funcs = callbacks(holder)
    for step in ("helo", "header", "eoh", "body", "eom", "abort"):
        getattr(_milter, "set_%s_callback" % step)(None)
    for step in ("connect", "envfrom", "envrcpt", "close"):
        getattr(_milter, "set_%s_callback" % step)(funcs[step])
    _milter.set_exception_policy(Milter.TEMPFAIL)
    _milter.settimeout(600)
    _milter.register(name, negotiate=funcs["negotiate"], data=None, unknown=None)
    _milter.main()


def stop() -> None:
    """Ask libmilter to stop accepting connections and return from serve()."""
    import milter as _milter  # pymilter's C extension

    _milter.stop()


def _socket_error(spec: str) -> OSError:
    """Why libmilter could not listen on *spec*: the same bind, made here, names the errno.

    libmilter only says it failed (its reason goes to syslog), so the bind is
    tried again with Python's socket module, which raises with the cause.
    """
    kind, _, rest = spec.partition(":")
    try:
        if kind in ("unix", "local"):
            family, address = socket.AF_UNIX, rest
            probe_path: Optional[str] = rest
        else:
            port, _, host = rest.partition("@")
            family = socket.AF_INET6 if kind == "inet6" else socket.AF_INET
            address = (host, int(port))      # type: ignore[assignment]
            probe_path = None
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
        if probe_path is not None:
            os.unlink(probe_path)
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, "")
        return OSError(exc.errno, "%s%s" % (exc.strerror or exc, " (%s)" % name if name else ""))
    except ValueError as exc:
        return OSError(errno.EINVAL, str(exc))
    return OSError(errno.EIO, "libmilter could not listen (no cause found; see syslog)")


__all__ = ["Connection", "MilterError", "Runtime", "RuntimeHolder", "callbacks", "open_socket", "serve", "stop"]
