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
    need are not overridden, so pymilter declines them in negotiation.

    One log line per decision, Postfix style:
      <id>: reject: RCPT from [192.0.2.7]: 550 5.7.1 <bob@remote.example>: Relaying denied; from=<a@b> to=<bob@remote.example> rule=default_reject

DIAGNOSTICS
    Fail closed: any exception escaping a callback is logged with its
    traceback and answered 451 4.3.0 (TEMPFAIL), never CONTINUE; pymilter's
    own exception policy is set to TEMPFAIL as a second guard.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import socket
import threading
import time
from typing import Any, Callable, Optional

import Milter

from relaymilter import replies
from relaymilter.config import Config
from relaymilter.decisionlog import DecisionLog, logging_sink
from relaymilter.errors import StoreUnavailable
from relaymilter.ipaddr import normalize_ip
from relaymilter.policy.decision import Continue, Decision, Reject, TempFail
from relaymilter.policy.mail import check_mail
from relaymilter.policy.rcpt import Client, RcptPolicy, evaluate_rcpt
from relaymilter.replies import Reply
from relaymilter.store.relayers import RelayStore, open_relay_store
from relaymilter.store.spammers import SpammersMap

log = logging.getLogger("relaymilter")


class Runtime:
    """One configuration with the policy and the stores built from it."""

    def __init__(self, config: Config, previous: Optional["Runtime"] = None) -> None:
        self.config = config
        self.policy = RcptPolicy(
            local_domains=config.local_domains,
            relay_domains=config.relay_domains,
            trusted_networks=config.trusted_networks,
            permit_authenticated=config.permit_authenticated,
            window=config.relayers.window,
            relay_subdomains=config.relay_subdomains,
            percent_hack=config.percent_hack,
            bang_paths=config.bang_paths,
        )
        # Keep open stores across a reload when they name the same map: their
        # handles and last-good state stay valid, and nothing is reopened.
        location = config.relayers.location
        if previous is not None and previous.relayers.location == location:
            self.relayers: RelayStore = previous.relayers
        else:
            self.relayers = open_relay_store(location)
        spam_path = os.path.expanduser(config.spammers.path)
        if previous is not None and previous.spammers_path == spam_path:
            self.spammers = previous.spammers
        else:
            self.spammers = SpammersMap(spam_path)
        self.spammers_path = spam_path


class RuntimeHolder:
    """The Runtime new connections use (swapped whole on reload), and the decision log."""

    def __init__(self, runtime: Runtime, decisions: Optional[DecisionLog] = None) -> None:
        self._runtime = runtime
        self._lock = threading.Lock()
        self.decisions = decisions if decisions is not None else DecisionLog(logging_sink(log))

    @property
    def current(self) -> Runtime:
        return self._runtime

    def swap(self, config: Config) -> Runtime:
        with self._lock:
            self._runtime = Runtime(config, self._runtime)
            return self._runtime


_ids = itertools.count(1)


def fail_closed(func: Callable[..., int]) -> Callable[..., int]:
    """Turn any unexpected exception in a callback into a logged 451 TEMPFAIL."""

    @functools.wraps(func)
    def guarded(self: "RelayMilter", *args: Any) -> int:
        try:
            return func(self, *args)
        except Exception:  # noqa: BLE001 - the fail-closed guard: a bug must tempfail, never relay
            log.exception("%s: internal error in %s from %s; answering %s", self.conn_id, func.__name__,
                          self.client_text, replies.INTERNAL_ERROR)
            self._set_reply(replies.INTERNAL_ERROR)
            return Milter.TEMPFAIL

    return guarded


def _brackets(addr: str) -> str:
    addr = addr.strip()
    return addr if addr.startswith("<") else "<%s>" % addr


class RelayMilter(Milter.Base):
    """One SMTP connection as seen through the milter protocol."""

    def __init__(self, holder: RuntimeHolder) -> None:
        self.rt = holder.current
        self.decide_log = holder.decisions.log
        self.conn_id = "%06X" % next(_ids)
        self.client = Client(None)
        self.client_text = "unknown"
        self.sender = "<>"

    def _set_reply(self, reply: Reply) -> None:
        self.setreply(reply.code, reply.xcode, reply.text)

    def _answer(self, decision: Decision) -> int:
        if isinstance(decision, Continue):
            return Milter.CONTINUE
        self._set_reply(decision.reply)
        return Milter.REJECT if isinstance(decision, Reject) else Milter.TEMPFAIL

    @fail_closed
    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        if family in (socket.AF_INET, socket.AF_INET6) and hostaddr:
            raw = str(hostaddr[0])
            try:
                addr: Optional[str] = normalize_ip(raw)
            except ValueError:
                addr = raw      # never None: no address at all would count as a local submission
            self.client_text = "%s[%s]" % (hostname.strip("[]") if hostname and not hostname.startswith("[") else "", addr)
        else:
            addr = None         # local submission (sendmail -bs): empty {client_addr}, as sendmail treats it
            self.client_text = "local"
        self.client = Client(addr)
        return Milter.CONTINUE

    @fail_closed
    def envfrom(self, mailfrom: str, *esmtp: str) -> int:
        self.sender = _brackets(mailfrom)
        auth = self.getsymval("{auth_authen}")
        self.client = self.client.authenticated_as(auth or None)
        decision = check_mail(self.sender, self.rt.spammers.snapshot())
        self._log("MAIL", decision, self.sender, None, "sasl_username=%s " % auth if auth else "")
        return self._answer(decision)

    @fail_closed
    def envrcpt(self, to: str, *esmtp: str) -> int:
        rcpt = _brackets(to)
        verdict = evaluate_rcpt(self.rt.policy, self.client, rcpt, self.rt.relayers.lookup, time.time())
        extra = "resolved=%s " % verdict.resolved if verdict.resolved is not None else ""
        if verdict.error:
            extra += "error=%r " % verdict.error
        self._log("RCPT", verdict.decision, self.sender, rcpt, extra)
        return self._answer(verdict.decision)

    def _log(self, stage: str, decision: Decision, sender: str, rcpt: Optional[str], extra: str) -> None:
        # Formatting happens in the decision log's writer thread, not here.
        to = "to=%s " % rcpt if rcpt is not None else ""
        if isinstance(decision, Continue):
            self.decide_log("%s: pass: %s from %s: from=%s %s%srule=%s", self.conn_id, stage, self.client_text,
                            sender, to, extra, decision.rule)
            return
        reply = decision.reply
        self.decide_log("%s: %s: %s from %s: %s %s %s: %s; from=%s %s%srule=%s", self.conn_id,
                        "reject" if isinstance(decision, Reject) else "tempfail", stage, self.client_text,
                        reply.code, reply.xcode, rcpt or sender, reply.text, sender, to, extra, decision.rule)


def run(holder: RuntimeHolder, socket_spec: str, name: str = "relaymilter") -> None:
    """Serve the milter protocol on *socket_spec* until libmilter stops (blocks)."""
    Milter.factory = lambda: RelayMilter(holder)
    Milter.set_exception_policy(Milter.TEMPFAIL)
    Milter.runmilter(name, socket_spec, timeout=600)


def stop() -> None:
    """Ask libmilter to stop accepting connections and return from run()."""
    import milter as _milter  # pymilter's C extension

    _milter.stop()


__all__ = ["RelayMilter", "Runtime", "RuntimeHolder", "run", "stop", "StoreUnavailable", "TempFail"]
