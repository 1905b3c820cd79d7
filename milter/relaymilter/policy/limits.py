"""NAME
    relaymilter.policy.limits - relaying limits per identity, and who is relaying

DESCRIPTION
    A client allowed to relay is not allowed to relay without end: a stolen
    POP password lets a thief into relayers.db (or through SMTP AUTH) and he
    pushes thousands of messages until the server is on every blocklist.

    Identity: every relaying session is named by its SMTP AUTH user, else
    the user who last logged in by POP/IMAP from its address (the users map
    relaymilter-popwatch keeps beside relayers.db), else its address. The
    decision log carries it as ``user=``.

    Limits (``limits:``; absent: none), over a sliding hour in one-minute
    steps: recipients_per_hour and messages_per_hour per identity;
    addresses_per_hour per user (one user seen from more than N addresses -
    a stolen password's signature). A user is seen from an address at each
    POP/IMAP login relaymilter-popwatch records and at each SMTP AUTH
    transaction that relays; a POP user's relaying adds nothing to that
    (the watcher saw the login that listed the address). Over a limit:
    451 4.7.1 Relaying limit exceeded (rule recipients_per_hour, messages_per_hour or
    addresses_per_hour), nothing counted; with suspend_minutes the identity
    is suspended as well: its addresses are removed from the relayers map
    and its relaying is refused (451 4.7.1 Relaying suspended, rule
    suspended; an AUTH session already at MAIL) until the time runs out or
    an admin lifts it (relaymilter-guard lift). Limits apply only to
    recipients relayed because the client authenticated or is listed in
    relayers.db: mail to local and relay-domain recipients is never
    limited, nor is a trusted network's. A message is counted at its first
    relayed recipient.

    Every recipient is counted; a transaction's later recipient need not
    wait for the count's answer when the count answered at the recipient
    just before it is within half the identity's recipients_per_hour
    (Ask.wait: the Redis store then posts the count instead of making a
    round trip), so at most every other recipient goes unanswered. Near the
    limit every recipient is checked as it is counted; far from it, going
    over would take more than half the limit relayed by the same identity
    elsewhere in the instant between two recipients of one transaction.
    The counter file counts ahead instead (Ask.ahead): a recipient counted
    within half the limit counts the next one too (Outcome.charge.reserved),
    which then passes without asking the store; one left unused is refunded
    when the transaction ends (release(): at the next MAIL or at close).
    Counted ahead, a count is never low, only high by what transactions
    open or just ended counted ahead and did not use.

    In warn-only mode (``modes: {limits: warn}``) a refusal is not made but
    returned as ``would`` for the log, what went through is counted all the
    same, and no one is suspended.

    Guard holds the limits and a counter store (relaymilter.store.guard,
    handed in); a Txn per MAIL carries what one transaction has learnt.

DIAGNOSTICS
    A counter store that is down or slow (StoreUnavailable): the limits are
    not applied, the recipient passes with ``limits=unavailable`` in its log
    line, Guard.stats counts it, an error is logged when the outage starts
    (and once a minute while it lasts, with the count), a warning when the
    store answers again, and the store is left alone for BREAKER seconds
    after each failure so no decision waits on it meanwhile.
    Relay permission itself is decided before and still fails closed.

Stdlib only: part of the policy core (the store is handed in).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Mapping, NamedTuple, Optional, Protocol

from relaymilter import replies
from relaymilter.errors import StoreUnavailable
from relaymilter.policy.decision import Decision, TempFail

log = logging.getLogger("relaymilter.limits")

BREAKER = 1.0               # seconds the counters are left alone after they failed
RULES = {"recipients": "recipients_per_hour", "messages": "messages_per_hour", "addresses": "addresses_per_hour"}
OVER = {family: TempFail(replies.RELAY_LIMIT_EXCEEDED, rule) for family, rule in RULES.items()}
SUSPENDED = TempFail(replies.RELAY_SUSPENDED, "suspended")
LIMIT_RULES = frozenset(RULES.values()) | {"suspended"}


@dataclass(frozen=True)
class Limits:
    """The ``limits:`` section; None = no such limit."""

    recipients_per_hour: Optional[int] = None
    messages_per_hour: Optional[int] = None
    addresses_per_hour: Optional[int] = None
    suspend_minutes: Optional[int] = None

    def table(self) -> dict[str, int]:
        """family -> limit, for the families that have one."""
        found = {"recipients": self.recipients_per_hour, "messages": self.messages_per_hour,
                 "addresses": self.addresses_per_hour}
        return {k: v for k, v in found.items() if v is not None}


class Ask(Protocol):
    """What Guard hands the store (relaymilter.store.guard.Ask)."""


class Outcome(Protocol):
    identity: str
    suspended: Optional[object]
    charge: Optional["ChargeLike"]
    stamp: Optional[int]


class ChargeLike(Protocol):
    over: Optional[str]
    counts: Mapping[str, int]
    reserved: int                       # recipients counted ahead, in epoch minute *minute*
    minute: int
    generation: int                     # of the counts they are in (store.counters: refunded only to those)


class Store(Protocol):
    """The part of relaymilter.store.guard.GuardStore the milter uses."""

    folds_relay_lookup: bool

    def gate(self, ask: object) -> Outcome: ...

    def user_of(self, address: str) -> Optional[str]: ...

    def suspension(self, identity: str, now: float) -> Optional[object]: ...

    def suspend(self, identity: str, until: int, reason: str, now: float) -> list[str]: ...

    def refund(self, identity: str, n: int, minute: int, generation: int) -> None: ...


class Step(NamedTuple):
    """One answer of the guard: a refusal to make (or None), what to log, a refusal only warned of."""

    refusal: Optional[Decision]
    note: str                           # "user=alice " and friends, for the decision line
    would: Optional[Decision] = None    # warn-only mode: the refusal that was not made


PASS = Step(None, "")
_FIRST = {"recipients": 1, "messages": 1}      # a transaction's first relayed recipient
_NEXT = {"recipients": 1}


class Txn:
    """What one transaction (MAIL to MAIL) has learnt: the identity, whether its message is counted."""

    __slots__ = ("identity", "counted", "seen", "recipients", "reserved", "minute", "generation")

    def __init__(self) -> None:
        self.identity: Optional[str] = None
        self.counted = False            # the message is counted (at its first relayed recipient)
        self.seen = False               # the client address is recorded for the AUTH user this transaction
        self.recipients: Optional[int] = None   # the identity's recipients count, answered at the last recipient
        self.reserved = 0               # recipients counted ahead (store.counters), in epoch minute *minute*
        self.minute = self.generation = 0


def _note(identity: Optional[str]) -> str:
    return "user=%s " % identity if identity else ""


class Guard:
    """Limits and identities for one configuration (see the module notes)."""

    def __init__(self, limits: Optional[Limits], store: Optional[Store], make_ask: Callable[..., object],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.table = limits.table() if limits is not None else {}
        self.store = store
        self.make_ask = make_ask
        self.clock = clock
        self.stats: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._closed_until = 0.0        # breaker: the store is not asked before this (monotonic)
        self._down_since: Optional[float] = None     # the counters have failed since then (monotonic)
        self._down_count = 0            # stats["unavailable"] when they did
        self._next_log = 0.0
        # Fixed for the Guard's life (a reload makes a new one), and asked at every transaction.
        self.active = limits is not None and bool(self.table) and store is not None
        # Whether at_listed_rcpt() can answer the relayers lookup too (a Redis store).
        self.folds_relay_lookup = self.active and bool(getattr(store, "folds_relay_lookup", False))

    # -- the store, guarded ------------------------------------------------------------------

    def _available(self) -> bool:
        if self.clock() < self._closed_until:
            self.stats["unavailable"] += 1
            return False
        return True

    def _failed(self, exc: StoreUnavailable, count: bool = True) -> None:
        """Count a decision made without the limits (unless the caller's next step will); log the
        outage's start, then once a minute."""
        with self._lock:
            if count:
                self.stats["unavailable"] += 1
            now = self.clock()
            if self._down_since is None:
                self._down_since, self._next_log = now, now + 60
                self._down_count = self.stats["unavailable"] - (1 if count else 0)
                log.error("relaying limits not applied: counters unavailable: %s (not asked again for %gs)",
                          exc, BREAKER)
            elif now >= self._next_log:
                self._next_log = now + 60
                log.error("relaying limits still not applied: counters unavailable for %.0fs, %d decisions "
                          "without them: %s", now - self._down_since, self.stats["unavailable"] - self._down_count,
                          exc)
            self._closed_until = now + BREAKER

    def _recovered(self) -> None:
        """After an answer from the store: say so if it is the first since an outage."""
        with self._lock:
            if self._down_since is not None:
                log.warning("relaying limits applied again: counters available after %.0fs; %d decisions went "
                            "without them", self.clock() - self._down_since,
                            self.stats["unavailable"] - self._down_count)
                self._down_since = None

    # -- MAIL ------------------------------------------------------------------------------------

    def at_mail(self, auth: Optional[str], now: float, warn: bool = False) -> Step:
        """An AUTH session's MAIL: refused while its user is suspended."""
        if not auth or not self.active or not self._available():
            return PASS
        assert self.store is not None
        try:
            held = self.store.suspension(auth, now)
        except StoreUnavailable as exc:
            self._failed(exc)
            return Step(None, "limits=unavailable ")
        if self._down_since is not None:
            self._recovered()
        if held is None:
            return PASS
        return self._refuse(SUSPENDED, "user=%s " % auth, warn)

    # -- RCPT ------------------------------------------------------------------------------------

    def name(self, txn: Txn, address: str, auth: Optional[str]) -> str:
        """The identity of a session relaying from *address* without limits: AUTH user, POP user, address."""
        if txn.identity is None:
            identity = auth
            if not identity and self.store is not None and self._available():
                try:
                    identity = self.store.user_of(address)
                except StoreUnavailable as exc:
                    self._failed(exc)
            txn.identity = identity or address
        return txn.identity

    def at_rcpt(self, txn: Txn, address: str, auth: Optional[str], now: float, warn: bool = False) -> Step:
        """A recipient relayed because the client authenticated or is listed in relayers.db."""
        if not self.active or not (address or auth):
            return Step(None, _note(self.name(txn, address, auth) if address else auth))
        if txn.reserved:
            txn.reserved -= 1           # counted ahead by the recipient before
            return Step(None, _note(txn.identity))
        if not self._available():
            return Step(None, _note(txn.identity or auth) + "limits=unavailable ")
        assert self.store is not None and self.limits is not None
        add = _NEXT if txn.counted else _FIRST
        wait = True
        if txn.counted:
            # No recipients limit: nothing to check. Else only a count answered at the recipient just
            # before (txn.recipients) can let this one go unanswered.
            limit = self.table.get("recipients")
            wait = limit is not None and (txn.recipients is None or 2 * (txn.recipients + 1) > limit)
        # The suspension is looked up at the transaction's first relayed recipient only.
        ask = self.make_ask(address=address, identity=txn.identity or auth or None, add=add, limits=self.table,
                            now=now, see=bool(auth) and "addresses" in self.table and not txn.seen and bool(address),
                            force=warn, held=txn.identity is None, wait=wait, ahead=1)
        try:
            outcome = self.store.gate(ask)
        except StoreUnavailable as exc:
            self._failed(exc)
            return Step(None, _note(txn.identity or auth) + "limits=unavailable ")
        if self._down_since is not None:
            self._recovered()
        return self._judged(txn, outcome, now, warn)

    def at_listed_rcpt(self, txn: Txn, address: str, since: int, now: float,
                       warn: bool = False) -> Optional[tuple[Optional[int], Optional[Step]]]:
        """A transaction's first relay attempt from *address* (canonical), no AUTH: the relayers lookup and
        at_rcpt() in one call to the store (folds_relay_lookup).

        Returns (the relayers map's value for *address* or None, the Step
        when it is listed with a login at or after *since*, else None: then
        nothing was counted); None when the store could not be asked (the
        caller looks the address up itself, and at_rcpt() then says
        limits=unavailable).
        """
        if self.clock() < self._closed_until:
            return None             # counted as unavailable by the caller's at_rcpt()
        assert self.store is not None
        ask = self.make_ask(address=address, identity=None, add=_FIRST, limits=self.table, now=now,
                            see=False, force=warn, held=True, listed_since=since)
        try:
            outcome = self.store.gate(ask)
        except StoreUnavailable as exc:
            self._failed(exc, count=False)
            return None
        if self._down_since is not None:
            self._recovered()
        stamp = outcome.stamp
        if stamp is None or stamp < since:
            return stamp, None
        return stamp, self._judged(txn, outcome, now, warn)

    def _judged(self, txn: Txn, outcome: Outcome, now: float, warn: bool) -> Step:
        """at_rcpt()'s answer from what the store said."""
        assert self.limits is not None
        identity = txn.identity = outcome.identity
        note = _note(identity)
        if outcome.suspended is not None:
            return self._refuse(SUSPENDED, note, warn)
        charge = outcome.charge
        assert charge is not None
        over = charge.over
        # Only a count answered just now lets the next recipient go unanswered: one posted after
        # another would go by a count that others' transactions may have long overtaken.
        txn.recipients = charge.counts.get("recipients")
        txn.reserved, txn.minute, txn.generation = charge.reserved, charge.minute, charge.generation
        # Over addresses_per_hour: the address is asked about again at the next recipient, which is
        # refused the same way (otherwise the rest of the transaction would pass unasked).
        txn.seen = over != "addresses"
        if over is None or warn:
            txn.counted = True
        if over is None:
            return Step(None, note)
        refusal = OVER[over]
        if self.limits.suspend_minutes and not warn:
            self._suspend(identity, refusal.rule, now)
        return self._refuse(refusal, note + "count=%d " % charge.counts.get(over, 0), warn)

    def release(self, txn: Txn) -> None:
        """The transaction has ended (the next MAIL, or the connection closed): refund what it counted ahead."""
        n = txn.reserved
        if n and txn.identity is not None and self.store is not None:
            txn.reserved = 0
            try:
                self.store.refund(txn.identity, n, txn.minute, txn.generation)
            except StoreUnavailable as exc:
                log.warning("%d recipients counted ahead for %s not refunded: %s", n, txn.identity, exc)

    def _suspend(self, identity: str, rule: str, now: float) -> None:
        assert self.store is not None and self.limits is not None and self.limits.suspend_minutes
        until = int(now) + 60 * self.limits.suspend_minutes
        try:
            removed = self.store.suspend(identity, until, rule, now)
        except StoreUnavailable as exc:
            log.error("cannot suspend %s (%s): %s", identity, rule, exc)
            return
        self.stats["suspended"] += 1
        log.warning("suspended %s for %d minutes (%s); removed from the relayers map: %s", identity,
                    self.limits.suspend_minutes, rule, " ".join(removed) or "none")

    def _refuse(self, refusal: Decision, note: str, warn: bool) -> Step:
        if warn:
            self.stats["would_refuse"] += 1
            return Step(None, note, refusal)
        self.stats[refusal.rule] += 1
        return Step(refusal, note)
