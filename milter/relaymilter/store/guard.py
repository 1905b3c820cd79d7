"""NAME
    relaymilter.store.guard - who logged in from where, relaying counters and suspensions

DESCRIPTION
    What the relaying limits need besides relayers.db, kept beside it:

    users map   client address -> the user who logged in from it, written by
                relaymilter-popwatch with each relayers entry. relayers.db
                itself keeps its classic address -> epoch format (sendmail
                and Postfix read it).
    counters    per identity, recipients and messages relayed in the last
                hour, and per user the addresses seen in the last hour.
    suspended   identity -> until when its relaying is refused.

    On a single host (relayers.db is a file) they are three files named
    after it: relayers-users.db and relayers-suspended.db (Berkeley DB hash,
    makemap style, locked and cached like relayers.db: ``makemap -u hash``
    lists them) and relayers-counters (relaymilter.store.counters, shared by
    every process through one mapped file). With Redis they are keys of the
    same server beside the map's own (relaymilter.store.guardredis).

    GuardStore is the interface both offer. gate() is the milter's one call
    per relayed recipient: work out the identity (when asked), answer its
    suspension, and count - as one operation, one round trip on Redis. A
    store whose ``folds_relay_lookup`` is true (Redis) also takes the
    relayers lookup of a transaction's first relayed recipient into that
    same operation (Ask.listed_since): it counts only if the map lists the
    address, so a listed client's first recipient costs one round trip,
    not two; a later recipient with Ask.wait false costs a send and no wait
    there. On one host a lookup is no round trip, and the file store does
    not fold.

DIAGNOSTICS
    StoreUnavailable when a file or the server cannot be used; the caller
    (policy.limits) then does not apply the limits and says so, while relay
    permission itself still fails closed. ValueError for an address that is
    not an IP.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Iterable, Mapping, NamedTuple, Optional, Protocol

from relaymilter.ipaddr import normalize_ip
from relaymilter.store import is_store_url
from relaymilter.store.bdb import MapReader, read_items, write_map
from relaymilter.store.counters import Charge, CounterFile, Usage

__all__ = ["Ask", "Charge", "GuardStore", "HostGuardStore", "Outcome", "Suspension", "Usage", "guard_paths",
           "open_guard_store"]


@dataclass(frozen=True)
class Suspension:
    identity: str
    until: int              # epoch seconds
    since: int
    reason: str             # which limit (or "admin")


class Ask(NamedTuple):
    """One relayed recipient (or a login) to judge and count.

    identity: known already (the AUTH user, or found at an earlier
    recipient of the transaction), or None to work it out from *address*
    (its POP user, else the address). add: family -> how many to count;
    limits: family -> limit (absent: none). With *see*, the address is
    recorded among a user identity's addresses of the hour. With *held*
    false the suspension is not looked up (the transaction's first
    recipient did that already). With *listed_since* (stores that fold the
    relayers lookup only), *address* must be canonical (a relayers key)
    and nothing is judged or counted unless the relayers map lists it with
    a login time at or after listed_since (0: any); Outcome.stamp carries
    what the map holds. With *wait* false (a transaction's later recipient,
    its identity far from its recipients limit: policy.limits), a store may
    count add["recipients"] without waiting for its server's answer; it then
    answers Charge(None, {}): nothing over, no counts. With *ahead*, a store
    may count that many more recipients (Charge.reserved: the counter file
    does, within half the limit), which the transaction's next recipients
    use without asking and refund() gives back when it ends unused.
    """

    address: str
    identity: Optional[str]
    add: Mapping[str, int]
    limits: Mapping[str, int]
    now: float
    see: bool = False
    force: bool = False
    held: bool = True
    listed_since: Optional[int] = None
    wait: bool = True
    ahead: int = 0


class Outcome(NamedTuple):
    identity: str
    user: bool                          # identity is a user (AUTH or POP), not an address
    suspended: Optional[Suspension]
    charge: Optional[Charge]            # None when suspended or not listed: nothing counted
    stamp: Optional[int] = None         # with Ask.listed_since: the relayers map's value (None: absent)


class GuardStore(Protocol):
    location: str
    folds_relay_lookup: bool            # gate() takes Ask.listed_since

    def gate(self, ask: Ask) -> Outcome:
        """Identity, suspension and counting for one recipient, as one operation."""

    def user_of(self, address: str) -> Optional[str]:
        """The user who last logged in from *address*, if popwatch recorded one."""

    def record_users(self, users: Mapping[str, Optional[str]], ttl: int) -> None:
        """address -> user (None: the login named none, forget any earlier one)."""

    def forget_users(self, addresses: Iterable[str]) -> None:
        """Drop the users recorded for *addresses* (their relayers entries expired)."""

    def suspension(self, identity: str, now: float) -> Optional[Suspension]:
        """The suspension in force for *identity*, or None."""

    def suspend(self, identity: str, until: int, reason: str, now: float) -> list[str]:
        """Refuse *identity*'s relaying until *until*; remove its addresses from the relayers map (returned)."""

    def refund(self, identity: str, n: int, minute: int, generation: int) -> None:
        """Give back *n* recipients counted ahead in epoch *minute* of *generation* (Charge) and not used."""

    def lift(self, identity: str) -> bool:
        """End a suspension and start the identity's counts afresh; whether one was in force."""

    def suspensions(self, now: float) -> list[Suspension]:
        """Every suspension in force."""

    def usage(self, now: float) -> list[Usage]:
        """Every (family, identity) counted in the last hour."""

    def close(self) -> None:
        """Release files and connections."""


ABSENT_RECHECK = 1.0        # seconds a missing suspended map is taken as missing


def guard_paths(relayers_path: str) -> tuple[str, str, str]:
    """(users map, suspended map, counters) beside relayers.db."""
    path = os.path.expanduser(relayers_path)
    base = path[:-3] if path.endswith(".db") else path
    return base + "-users.db", base + "-suspended.db", base + "-counters"


def _text(raw: Optional[bytes]) -> Optional[str]:
    return None if raw is None else raw.decode("utf-8", "surrogateescape")


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def parse_suspension(identity: str, raw: Optional[bytes]) -> Optional[Suspension]:
    """A suspended map value ``UNTIL SINCE REASON``; None when absent or unreadable."""
    if raw is None:
        return None
    parts = raw.decode("ascii", "replace").split(None, 2)
    try:
        until, since = int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None
    return Suspension(identity, until, since, parts[2] if len(parts) > 2 else "")


def is_address(identity: str) -> bool:
    try:
        normalize_ip(identity)
    except ValueError:
        return False
    return True


class HostGuardStore:
    """The three files beside a relayers.db (see the module header)."""

    def __init__(self, relayers_path: str, create: bool = True) -> None:
        self.relayers_path = os.path.expanduser(relayers_path)
        self.users_path, self.suspended_path, self.counters_path = guard_paths(relayers_path)
        self.location = self.counters_path
        self._users = MapReader(self.users_path, "users map")
        self._suspended = MapReader(self.suspended_path, "suspended map")
        self.counters = CounterFile(self.counters_path, create=create)
        self._absent_until = 0.0        # the suspended map is known missing until then (monotonic)

    folds_relay_lookup = False          # a relayers.db lookup is no round trip: nothing to fold

    # -- the milter's call ------------------------------------------------------------

    def gate(self, ask: Ask) -> Outcome:
        identity = ask.identity
        if identity is None:
            identity = self.user_of(ask.address) or ask.address
        user = identity != ask.address
        if ask.held:
            held = self.suspension(identity, ask.now)
            if held is not None:
                return Outcome(identity, user, held, None)
        charge = self.counters.charge(identity, ask.now, ask.add, ask.limits,
                                      address=ask.address if ask.see and user else None, force=ask.force,
                                      ahead=ask.ahead)
        return Outcome(identity, user, None, charge)

    def refund(self, identity: str, n: int, minute: int, generation: int) -> None:
        self.counters.refund(identity, n, minute, generation)

    # -- users map ----------------------------------------------------------------------

    def user_of(self, address: str) -> Optional[str]:
        return self._users.get_as(address, lambda a: normalize_ip(a).encode("ascii"), _text)

    def record_users(self, users: Mapping[str, Optional[str]], ttl: int) -> None:
        items = [(normalize_ip(a).encode("ascii"), None if u is None else _utf8(u)) for a, u in users.items()]
        if not items:
            return
        with write_map(self.users_path) as txn:
            for key, value in items:
                if value is None:
                    txn.delete(key)
                else:
                    txn.put(key, value)

    def forget_users(self, addresses: Iterable[str]) -> None:
        keys = [normalize_ip(a).encode("ascii") for a in addresses]
        if not keys or not os.path.exists(self.users_path):
            return
        with write_map(self.users_path, create=False) as txn:
            for key in keys:
                txn.delete(key)

    def addresses_of(self, user: str) -> list[str]:
        want = _utf8(user)
        return sorted(k.decode("ascii", "replace") for k, v in read_items(self.users_path) if v == want)

    # -- suspensions ----------------------------------------------------------------------

    def suspension(self, identity: str, now: float) -> Optional[Suspension]:
        # No one was ever suspended here (the usual case): the file is looked for once a
        # second, not at every transaction. A suspension made meanwhile counts from then;
        # the limit that caused it refuses the identity all the same.
        if time.monotonic() < self._absent_until:
            return None
        if not os.path.exists(self.suspended_path):
            self._absent_until = time.monotonic() + ABSENT_RECHECK
            return None
        held = self._suspended.get_as(identity, _utf8, lambda raw: parse_suspension(identity, raw))
        return held if held is not None and held.until > now else None

    def suspend(self, identity: str, until: int, reason: str, now: float) -> list[str]:
        self._absent_until = 0.0
        with write_map(self.suspended_path) as txn:
            txn.put(_utf8(identity), b"%d %d %s" % (until, int(now), reason.encode("ascii", "replace")))
        doomed = [identity] if is_address(identity) else self.addresses_of(identity)
        if not doomed or not os.path.exists(self.relayers_path):
            return []
        from relaymilter.store.relayers import BDBRelayStore   # relayers imports nothing of ours

        store = BDBRelayStore(self.relayers_path)
        try:
            missing = set(store.delete(doomed))
        finally:
            store.close()
        return [a for a in doomed if normalize_ip(a) not in missing]

    def lift(self, identity: str) -> bool:
        found = False
        if os.path.exists(self.suspended_path):
            with write_map(self.suspended_path, create=False) as txn:
                found = txn.delete(_utf8(identity))
        self.counters.forget(identity)
        return found

    def suspensions(self, now: float) -> list[Suspension]:
        held = [parse_suspension(k.decode("utf-8", "surrogateescape"), v) for k, v in read_items(self.suspended_path)]
        return sorted((s for s in held if s is not None and s.until > now), key=lambda s: (s.until, s.identity))

    def prune(self, now: float) -> int:
        """Remove suspensions that have run out (the listing and suspend() leave them); how many."""
        if not os.path.exists(self.suspended_path):
            return 0
        with write_map(self.suspended_path, create=False) as txn:
            return txn.remove_where(lambda v: (parse_suspension("", v) or Suspension("", 0, 0, "")).until <= now)

    def usage(self, now: float) -> list[Usage]:
        return self.counters.usage(now)

    def close(self) -> None:
        self._users.close()
        self._suspended.close()
        self.counters.close()


def open_guard_store(relayers_location: str, create: bool = True, relay: Optional[object] = None) -> GuardStore:
    """The guard store that goes with a relayers map (a path, or a Redis URL).

    *relay*: the open relayers store of that URL, whose connections a Redis
    guard store then shares.
    """
    if is_store_url(relayers_location):
        from relaymilter.store.guardredis import RedisGuardStore  # optional dependency
        from relaymilter.store.redis import RedisRelayStore

        return RedisGuardStore(relayers_location, relay if isinstance(relay, RedisRelayStore) else None)
    return HostGuardStore(relayers_location, create=create)

