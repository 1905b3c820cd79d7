"""NAME
    relaymilter.adapter - pymilter callbacks in, policy decisions out

DESCRIPTION
    The only module that imports pymilter's Milter. Each SMTP connection gets
    one RelayMilter object (pymilter's factory); it snapshots the Runtime
    current when the connection opened, so a SIGHUP reload never changes the
    rules half-way through a session. State lives on that object, never in
    threading.local: libmilter's worker pool may run one connection's
    callbacks on different threads.

    connect() records the client address, envfrom() checks the sender against
    spammers.db and notes {auth_authen}, envrcpt() asks the policy core and
    turns its decision into setreply() + a return code. Callbacks we do not
    need are not overridden, so pymilter declines them in negotiation;
    connect asks for no reply (P_NR_CONN): the MTA does not wait for one.

    Hot path (libmilter's workers share one GIL, so every callback's Python
    time is everyone's latency): the envfrom/envrcpt_bytes entry points
    decode only the address; what a recipient resolves to and whether it is
    local or relay, and a sender's spammers keys, depend only on the frozen
    configuration and are memoised per Runtime (relaymilter.runtime); trust,
    authentication and the relayers key are worked out once per MAIL
    (policy.rcpt.ClientRules). spammers.db is checked at every MAIL;
    relayers.db is read at the first RCPT of a transaction that the client
    rules decide, and that answer holds for the transaction's other
    recipients. So a vsmtprelay add or delete counts from the next MAIL on,
    as an admin would expect of a map lookup made for the envelope.

    One log line per decision, Postfix style, queued on the decision log (relaymilter.decisionlog):
      <id>: reject: RCPT from [192.0.2.7]: 550 5.7.1 <bob@remote.example>: Relaying denied; from=<a@b> to=<bob@remote.example> rule=default_reject

DIAGNOSTICS
    Fail closed: any exception in a callback is logged with its traceback
    and answered 451 4.3.0 (TEMPFAIL), never CONTINUE; an exception in
    connect, which sends no reply, is remembered and MAIL and RCPT get the
    451. pymilter's own exception policy is set to TEMPFAIL as a second guard.
"""

from __future__ import annotations

import itertools
import logging
import socket
import time
from typing import Any, Optional

import Milter

from relaymilter import replies
from relaymilter.errors import StoreUnavailable
from relaymilter.policy.decision import Continue, Decision, Reject, TempFail
from relaymilter.policy.mail import SPAMMERS_UNAVAILABLE, check_listed
from relaymilter.policy.rcpt import Client, ClientRules
from relaymilter.replies import Reply
from relaymilter.runtime import Runtime, RuntimeHolder

log = logging.getLogger("relaymilter")


_ids = itertools.count(1)

_CONTINUE = Milter.CONTINUE
_NOREPLY = Milter.NOREPLY
_NR_CONN = Milter.P_NR_CONN
_REJECT = Milter.REJECT
_TEMPFAIL = Milter.TEMPFAIL
_INTERNAL = TempFail(replies.INTERNAL_ERROR, "internal_error")
_NO_CLIENT = Client(None)
_UNASKED = object()     # RelayMilter.granted before the client rules were asked in a transaction
_time = time.time
_AF_INET = socket.AF_INET
_AF_INET6 = socket.AF_INET6


def _brackets(addr: str) -> str:
    addr = addr.strip()
    return addr if addr.startswith("<") else "<%s>" % addr


class RelayMilter(Milter.Base):
    """One SMTP connection as seen through the milter protocol."""

    def __init__(self, holder: RuntimeHolder) -> None:
        self.rt = holder.current
        self.note = holder.decisions.append    # queues one finished decision line; None: not logged
        self.conn_id = next(_ids)
        self.tag = "%06X" % self.conn_id    # the connection id as logged
        self.client = _NO_CLIENT
        self.client_text = "unknown"
        self.sender = "<>"
        self.rules: Optional[ClientRules] = None
        self.granted: Any = _UNASKED       # the client rules' answer in this transaction (ClientRules.permit)
        self.broken = False             # connect failed: every later step tempfails

    def _set_reply(self, reply: Reply) -> None:
        # Straight to the context: Base.setreply's '%' check is for texts we
        # do not own; every reply in relaymilter.replies is a constant without '%'.
        self._ctx.setreply(reply.code, reply.xcode, reply.text)

    def _internal_error(self, stage: str) -> int:
        """The fail-closed answer: log the traceback, 451 4.3.0, TEMPFAIL."""
        log.exception("%s: internal error in %s from %s; answering %s", self.tag, stage,
                      self.client_text, replies.INTERNAL_ERROR)
        try:
            self._set_reply(replies.INTERNAL_ERROR)
        except Exception:  # noqa: BLE001 - TEMPFAIL must go out even if setreply fails
            log.exception("%s: cannot set the reply", self.tag)
        return _TEMPFAIL

    def negotiate(self, opts: list[int]) -> int:
        """Base.negotiate without its per-connection search for @symlist (this class has none)."""
        try:
            self._actions, protocol, _, _ = opts
            opts[1] = self._protocol = protocol & ~self.protocol_mask()
            opts[2] = 0
            opts[3] = 0
        except Exception:  # noqa: BLE001 - as Base.negotiate: change nothing if anything went wrong
            return Milter.ALL_OPTS
        return _CONTINUE

    @Milter.noreply
    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        return self.on_connect(hostname, family, hostaddr)

    def on_connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        # No reply is sent for connect (P_NR_CONN): a failure here is kept
        # and answered at MAIL and RCPT instead, so it is never lost.
        try:
            if (family == _AF_INET or family == _AF_INET6) and hostaddr:
                raw = hostaddr[0]
                rt = self.rt
                entry = rt.client_memo.get(raw) if type(raw) is str else None
                if entry is None:
                    entry = rt.client(str(raw))
                self.client, self.rules, text = entry
                self.client_text = text if not hostname or hostname[0] == "[" else hostname.strip("[]") + text
            else:
                # Local submission (sendmail -bs): empty {client_addr}, as sendmail treats it.
                self.client = _NO_CLIENT
                self.rules = None
                self.client_text = "local"
        except Exception:  # noqa: BLE001 - the fail-closed guard: a bug must tempfail, never relay
            self.broken = True
            log.exception("%s: internal error in connect from %s; MAIL and RCPT will get %s",
                          self.tag, self.client_text, replies.INTERNAL_ERROR)
        return _CONTINUE

    def envfrom_bytes(self, mailfrom: bytes, *esmtp: bytes) -> int:
        """pymilter's entry point: decode only the address (ESMTP parameters are not used)."""
        try:
            sender = mailfrom.decode("utf-8", "surrogateescape")
        except AttributeError:
            sender = str(mailfrom)
        return self._mail(sender)

    def envfrom(self, mailfrom: str, *esmtp: str) -> int:
        return self._mail(mailfrom)

    def envrcpt_bytes(self, to: bytes, *esmtp: bytes) -> int:
        """pymilter's entry point: decode only the address (ESMTP parameters are not used)."""
        try:
            rcpt = to.decode("utf-8", "surrogateescape")
        except AttributeError:
            rcpt = str(to)
        return self._rcpt(rcpt)

    def envrcpt(self, to: str, *esmtp: str) -> int:
        return self._rcpt(to)

    def _mail(self, mailfrom: str) -> int:
        try:
            sender = self.sender = mailfrom if mailfrom[:1] == "<" and mailfrom[-1:] == ">" else _brackets(mailfrom)
            if self.broken:
                self._log_refusal("MAIL", _INTERNAL, sender, None, "")
                return self._refuse(_INTERNAL)
            auth = self._ctx.getsymval("{auth_authen}") or None
            client = self.client
            rt = self.rt
            if auth != client.auth_authen:
                client = self.client = client.authenticated_as(auth)
                self.rules = ClientRules(rt.policy, client)
            elif self.rules is None:
                self.rules = ClientRules(rt.policy, client)
            self.granted = _UNASKED
            plan = rt.sender_memo.get(sender)
            if plan is None:
                plan = rt.mail_plan(sender)
            if type(plan) is tuple:
                try:
                    decision = check_listed(plan, rt.spammers.members())
                except StoreUnavailable:
                    decision = SPAMMERS_UNAVAILABLE
            else:
                decision = plan
            extra = "sasl_username=%s " % auth if auth else ""
            if type(decision) is Continue:
                if self.note is not None:
                    self.note(_PASS_MAIL % (self.tag, self.client_text, sender, extra, decision.rule))
                return _CONTINUE
            self._log_refusal("MAIL", decision, sender, None, extra)
            return self._refuse(decision)
        except Exception:  # noqa: BLE001 - the fail-closed guard: a bug must tempfail, never relay
            return self._internal_error("envfrom")

    def _rcpt(self, to: str) -> int:
        try:
            rcpt = to if to[:1] == "<" and to[-1:] == ">" else _brackets(to)
            if self.broken:
                decision: Optional[Decision] = _INTERNAL
                extra = ""
            else:
                rt = self.rt
                memo = rt.rcpt_memo.get(rcpt)
                if memo is None:
                    memo = rt.destination(rcpt)
                decision, refusal, extra = memo
                if decision is None:
                    # Neither local nor relay: the client rules decide, asked
                    # once per transaction (their answer is the same for every
                    # such recipient; relayers.db is read again at the next MAIL).
                    decision = self.granted
                    if decision is _UNASKED:
                        rules = self.rules
                        if rules is None:   # RCPT before MAIL: not SMTP, but decide it all the same
                            rules = self.rules = ClientRules(rt.policy, self.client)
                        decision = self.granted = rules.permit(rt.relayers.lookup, _time())
                    if decision is None:
                        decision = refusal
            if type(decision) is Continue:
                if self.note is not None:
                    self.note(_PASS_RCPT % (self.tag, self.client_text, self.sender, rcpt, extra, decision.rule))
                return _CONTINUE
            self._log_refusal("RCPT", decision, self.sender, rcpt, extra)
            return self._refuse(decision)
        except Exception:  # noqa: BLE001 - the fail-closed guard: a bug must tempfail, never relay
            return self._internal_error("envrcpt")

    def _refuse(self, decision: Decision) -> int:
        """setreply() for a Reject or TempFail decision, and its return code."""
        self._set_reply(decision.reply)
        return _REJECT if type(decision) is Reject else _TEMPFAIL

    def _log_refusal(self, stage: str, decision: Decision, sender: str, rcpt: Optional[str], extra: str) -> None:
        if self.note is None:
            return
        reply = decision.reply
        verb = "reject" if type(decision) is Reject else "tempfail"
        if rcpt is None:
            self.note(_REFUSE_MAIL % (self.tag, verb, stage, self.client_text, reply.code, reply.xcode,
                                      sender, reply.text, sender, extra, decision.rule))
        else:
            self.note(_REFUSE_RCPT % (self.tag, verb, stage, self.client_text, reply.code, reply.xcode,
                                      rcpt, reply.text, sender, rcpt, extra, decision.rule))


# The decision lines (see the module notes); the connection id is RelayMilter.tag.
_PASS_MAIL = "%s: pass: MAIL from %s: from=%s %srule=%s"
_PASS_RCPT = "%s: pass: RCPT from %s: from=%s to=%s %srule=%s"
_REFUSE_MAIL = "%s: %s: %s from %s: %s %s %s: %s; from=%s %srule=%s"
_REFUSE_RCPT = "%s: %s: %s from %s: %s %s %s: %s; from=%s to=%s %srule=%s"


def callbacks(holder: RuntimeHolder) -> dict[str, Any]:
    """The functions run() registers with pymilter's C module, by step name.

    Each is one Python call per milter step: the connection's RelayMilter
    is the context's private object, created at negotiation.
    """

    def negotiate(ctx: Any, opts: list[int]) -> int:
        m = RelayMilter(holder)
        m._setctx(ctx)
        return m.negotiate(opts)

    def connect(ctx: Any, hostname: str, family: int, hostaddr: Any) -> int:
        m = ctx.getpriv()
        if not m:               # an MTA that skipped negotiation
            m = RelayMilter(holder)
            m._setctx(ctx)
        m.on_connect(hostname, family, hostaddr)
        return _NOREPLY if m._protocol & _NR_CONN else _CONTINUE

    def envfrom(ctx: Any, mailfrom: bytes, *esmtp: bytes) -> int:
        return ctx.getpriv()._mail(mailfrom.decode("utf-8", "surrogateescape"))

    def envrcpt(ctx: Any, to: bytes, *esmtp: bytes) -> int:
        return ctx.getpriv()._rcpt(to.decode("utf-8", "surrogateescape"))

    def close(ctx: Any) -> int:
        m = ctx.getpriv()
        if m:
            m._ctx = None       # the context and this object refer to each other
        return _CONTINUE

    return {"negotiate": negotiate, "connect": connect, "envfrom": envfrom, "envrcpt": envrcpt, "close": close}


def run(holder: RuntimeHolder, socket_spec: str, name: str = "relaymilter") -> None:
    """Serve the milter protocol on *socket_spec* until libmilter stops (blocks).

    Registers with pymilter's C module directly rather than through
    Milter.runmilter: only the steps relaymilter uses get a Python callback,
    so ABORT (sent after every transaction) never takes the GIL, and each
    step is one Python call instead of a lambda and a method wrapper.
    Negotiation is Milter.Base's (RelayMilter.negotiate), so the MTA never
    sends the steps declined there.
    """
    import milter as _milter  # pymilter's C extension

    funcs = callbacks(holder)
    for step in ("helo", "header", "eoh", "body", "eom", "abort"):
        getattr(_milter, "set_%s_callback" % step)(None)
    for step in ("connect", "envfrom", "envrcpt", "close"):
        getattr(_milter, "set_%s_callback" % step)(funcs[step])
    _milter.set_exception_policy(_TEMPFAIL)
    _milter.setconn(socket_spec)
    _milter.settimeout(600)
    _milter.register(name, negotiate=funcs["negotiate"], data=None, unknown=None)
    _milter.opensocket(True)
    _milter.main()


def stop() -> None:
    """Ask libmilter to stop accepting connections and return from run()."""
    import milter as _milter  # pymilter's C extension

    _milter.stop()


__all__ = ["RelayMilter", "Runtime", "RuntimeHolder", "run", "stop", "StoreUnavailable", "TempFail"]
