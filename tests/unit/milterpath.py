"""Drive relaymilter's one decision path from tests.

Conn runs a connection through the functions adapter.callbacks() registers
with pymilter's C module (what production runs); the libmilter context is
the one stand-in: it serves macros and records setreply(), as libmilter's
context would for the MTA's packets.  MapSources holds the maps of a policy
Session in memory, for the table-driven policy tests that need no files.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Set as AbstractSet
from typing import Any, Callable, Optional

import Milter

from relaymilter import adapter
from relaymilter.errors import StoreUnavailable
from relaymilter.policy.decision import Decision
from relaymilter.policy.mail import SenderKeys, mail_plan
from relaymilter.policy.rcpt import UNKNOWN_CLIENT, Destination, RcptPolicy, destination
from relaymilter.policy.session import Session
from relaymilter.policy.verdict import RcptVerdict
from relaymilter.runtime import RuntimeHolder

NOW = 1_700_000_000.0
OFFER = 0x1FFFFF        # every protocol flag an MTA may offer


class Context:
    """What the adapter uses of libmilter's context: macros in, replies out, the private object."""

    def __init__(self, macros: Optional[dict[str, Any]] = None) -> None:
        self.macros = dict(macros or {})
        self.replies: list[tuple[str, ...]] = []
        self.priv: Any = None

    def getsymval(self, name: str) -> Any:
        value = self.macros.get(name)
        if isinstance(value, bytes):    # as pymilter's C module does with a macro that is not UTF-8
            return value.decode("utf-8")
        return value

    def setreply(self, *reply: str) -> None:
        self.replies.append(reply)

    def getpriv(self) -> Any:
        return self.priv

    def setpriv(self, priv: Any) -> None:
        self.priv = priv


class Conn:
    """One milter connection through the registered callbacks."""

    def __init__(self, holder: RuntimeHolder, ip: Optional[str] = "192.0.2.7", *, hostname: Optional[str] = None,
                 macros: Optional[dict[str, Any]] = None, family: Optional[int] = None,
                 negotiate: bool = True) -> None:
        self.funcs = adapter.callbacks(holder)
        self.ctx = Context(macros)
        self.opts = [Milter.CURR_ACTS, OFFER, 0, 0]
        if negotiate:
            assert self.funcs["negotiate"](self.ctx, self.opts) == Milter.CONTINUE
        if ip is not None:
            self.connect(ip, hostname=hostname, family=family)

    def connect(self, ip: Optional[str], *, hostname: Optional[str] = None, family: Optional[int] = None,
                hostaddr: Any = None) -> int:
        if family is None:
            family = socket.AF_INET6 if ip and ":" in ip else socket.AF_INET
        if hostaddr is None and ip is not None:
            hostaddr = (ip, 4321) if family == socket.AF_INET else (ip, 4321, 0, 0)
        return self.funcs["connect"](self.ctx, hostname or "[%s]" % ip, family, hostaddr)

    def mail(self, sender: str | bytes, auth: Any = None) -> int:
        if auth is not None:
            self.ctx.macros["{auth_authen}"] = auth
        raw = sender if isinstance(sender, bytes) else sender.encode("utf-8", "surrogateescape")
        return self.funcs["envfrom"](self.ctx, raw)

    def rcpt(self, rcpt: str | bytes) -> int:
        raw = rcpt if isinstance(rcpt, bytes) else rcpt.encode("utf-8", "surrogateescape")
        return self.funcs["envrcpt"](self.ctx, raw)

    def close(self) -> int:
        return self.funcs["close"](self.ctx)

    @property
    def connection(self) -> adapter.Connection:
        return self.ctx.priv

    @property
    def replies(self) -> list[tuple[str, ...]]:
        return self.ctx.replies


class MapSources:
    """policy.verdict.Sources over in-memory maps; counts the relayers questions asked."""

    blocklists: Any = None      # no DNS blocklist unless a test sets one

    def __init__(self, policy: RcptPolicy, relayers: Optional[dict[str, int]] = None,
                 spammers: AbstractSet[str] = frozenset(), error: Optional[Exception] = None,
                 spammers_error: Optional[Exception] = None,
                 listed: Optional[Callable[[], AbstractSet[str]]] = None,
                 known_recipient: Optional[Callable[[tuple[str, ...], Optional[str]], Optional[str]]] = None,
                 recipient_delimiter: str = "") -> None:
        self.policy = policy
        # local_recipients: the lookup every transaction gets (None: not configured); asked counts them.
        self.transactions = 0

        def per_transaction() -> Callable[[tuple[str, ...], Optional[str]], Optional[str]]:
            self.transactions += 1
            assert known_recipient is not None
            return known_recipient

        self.local_recipients = per_transaction if known_recipient is not None else None
        self.recipient_delimiter = recipient_delimiter
        self.listed = listed                # a spammers store's members(), when given
        self.entries = dict(relayers or {})
        self.spammers = frozenset(spammers)
        self.error = error
        self.spammers_error = spammers_error
        self.asked: list[str] = []
        self.spam_asked = 0

    def destination(self, rcpt: str) -> Destination:
        return destination(self.policy, rcpt)

    def mail_plan(self, sender: str) -> SenderKeys | Decision:
        return mail_plan(sender)

    def relayers_stamp(self, key: str) -> Optional[int]:
        self.asked.append(key)
        if self.error is not None:
            raise self.error
        return self.entries.get(key)

    def spammers_listed(self) -> AbstractSet[str]:
        self.spam_asked += 1
        if self.spammers_error is not None:
            raise self.spammers_error
        return self.listed() if self.listed is not None else self.spammers


def session(sources: MapSources, addr: Optional[str] = "198.51.100.7", auth: Optional[str] = None,
            now: float = NOW, sender: str = "<a@example.net>") -> Session:
    """A policy Session after CONNECT from *addr* (None: no CONNECT) and MAIL FROM."""
    s = Session(sources, clock=lambda: now)
    if addr is not None:
        s.connect(sources.policy.client(addr))
    else:
        s.connect(UNKNOWN_CLIENT)
    s.mail(sender, auth)
    return s


def decide(rcpt: str, sources: MapSources, addr: Optional[str] = "198.51.100.7", auth: Optional[str] = None,
           now: float = NOW) -> RcptVerdict:
    return session(sources, addr, auth, now).rcpt(rcpt)


def mail(sender: str, spammers: AbstractSet[str] = frozenset(),
         listed: Optional[Callable[[], AbstractSet[str]]] = None) -> Decision:
    """MAIL FROM from a stranger through a policy Session whose spammers map holds *spammers* (or is *listed*)."""
    s = Session(MapSources(policy(set(), set()), spammers=spammers, listed=listed), clock=lambda: NOW)
    s.connect(s.sources.policy.client("198.51.100.7"))
    return s.mail(sender, None)


def policy(local: set[str], relay: set[str], trusted: tuple[str, ...] = ("127.0.0.0/8", "::1/128"),
           **kw: Any) -> RcptPolicy:
    return RcptPolicy(frozenset(local), frozenset(relay), tuple(ipaddress.ip_network(n) for n in trusted),
                      kw.pop("permit_authenticated", True), kw.pop("window", None), **kw)


__all__ = ["Conn", "Context", "MapSources", "StoreUnavailable", "decide", "mail", "policy", "session"]
