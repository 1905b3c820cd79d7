"""NAME
    relaymilter.popwatch.logins - who logged in from where, beside relayers.db

DESCRIPTION
    LoginGuard wraps the watcher's relayers store. The watcher hands it the
    login events it reads (note()); when the tracker writes addresses
    (add()), LoginGuard also records each login's user in the users map
    (relaymilter.store.guard: relayers-users.db, or a key per address on
    Redis, with the entry's expiry), so the milter can name the user behind
    a relaying address. relayers.db itself keeps its classic format.

    With ``limits: {addresses_per_hour: N}`` each login also counts the
    user's distinct addresses of the hour; a user seen from more than N (a
    stolen password's signature) is, with suspend_minutes, suspended at
    once: his addresses are removed from the relayers map and this login's
    is not written. A suspended user's (or address's) logins are not
    written while the suspension lasts; after it runs out or is lifted, the
    next login writes the address again. In warn-only mode
    (``modes: {limits: warn}``) this is only logged.

    Expired addresses (delete_if_unchanged) leave the users map too.

DIAGNOSTICS
    A users map or counter store that cannot be used is logged; the login is
    written to the relayers map all the same (relay permission comes from
    the login; the limits are then not applied). StoreUnavailable from the
    relayers map itself propagates to the tracker, which retries.
"""

from __future__ import annotations

import logging
from typing import Iterable, Mapping, Optional

from relaymilter.errors import StoreUnavailable
from relaymilter.ipaddr import normalize_ip
from relaymilter.policy.limits import Limits
from relaymilter.popwatch.matcher import Event
from relaymilter.store.guard import Ask, GuardStore
from relaymilter.store.relayers import RelayStore

log = logging.getLogger("relaymilter.popwatch")

USERS_MAX = 65536           # logins noted but not written yet (a bound, not a working size)


class LoginGuard:
    """A RelayStore that records users and applies addresses_per_hour (see the module notes)."""

    def __init__(self, inner: RelayStore, guard: GuardStore, limits: Optional[Limits] = None,
                 warn: bool = False) -> None:
        self.inner = inner
        self.guard = guard
        self.limits = limits
        self.warn = warn
        self.location = inner.location
        self._users: dict[str, Optional[str]] = {}     # address -> user of its latest login not yet written

    def note(self, events: Iterable[Event]) -> None:
        """The login events of a block, before the tracker sees them."""
        users = self._users
        for ev in events:
            if ev.kind == "login" and ev.ip:
                try:
                    key = normalize_ip(ev.ip)
                except ValueError:
                    continue            # the tracker counts and logs it
                if len(users) >= USERS_MAX:
                    users.clear()
                users[key] = ev.user or None

    # -- RelayStore -------------------------------------------------------------------

    def lookup(self, ip: str) -> Optional[int]:
        return self.inner.lookup(ip)

    def add(self, entries: Mapping[str, int], ttl: Optional[int] = None) -> None:
        users = {ip: self._users[ip] for ip in entries if ip in self._users}
        keep = dict(entries)
        for ip in list(keep):
            if not self._allowed(ip, users, keep[ip]):
                del keep[ip]
        # The user first: a milter that sees the address sees who it is.
        written = {ip: user for ip, user in users.items() if ip in keep}
        if written:
            try:
                self.guard.record_users(written, ttl or 86400)
            except StoreUnavailable as exc:
                log.error("cannot record login users: %s", exc)
        self.inner.add(keep, ttl=ttl)
        for ip in entries:
            self._users.pop(ip, None)

    def _allowed(self, ip: str, users: Mapping[str, Optional[str]], stamp: int) -> bool:
        """Whether the address may be written: its user (or itself) not suspended, nor over its limit."""
        if ip in users:
            user = users[ip]
        else:
            try:
                user = self.guard.user_of(ip)       # a logout rewriting an address written before
            except StoreUnavailable:
                user = None
        identity = user or ip
        table = self.limits.table() if self.limits is not None else {}
        try:
            if user and "addresses" in table and ip in users:
                outcome = self.guard.gate(Ask(address=ip, identity=user, add={}, limits=table, now=float(stamp),
                                              see=True, force=self.warn))
                held = outcome.suspended
                over = outcome.charge.over if outcome.charge is not None else None
            else:
                held = self.guard.suspension(identity, float(stamp)) if self.limits is not None else None
                over = None
        except StoreUnavailable as exc:
            log.error("relaying limits not applied to the login from %s: %s", ip, exc)
            return True
        if held is not None:
            log.warning("login of %s from %s not recorded: suspended until %d (%s)", identity, ip,
                        getattr(held, "until", 0), getattr(held, "reason", ""))
            return self.warn
        if over is None:
            return True
        assert self.limits is not None
        if self.warn or not self.limits.suspend_minutes:
            log.warning("%s%s seen from more than %d addresses within an hour (login from %s)",
                        "would suspend: " if self.warn and self.limits.suspend_minutes else "", user,
                        table["addresses"], ip)
            return True
        until = int(stamp) + 60 * self.limits.suspend_minutes
        try:
            removed = self.guard.suspend(identity, until, "addresses_per_hour", float(stamp))
        except StoreUnavailable as exc:
            log.error("cannot suspend %s: %s", identity, exc)
            return True
        log.warning("suspended %s for %d minutes (addresses_per_hour: seen from more than %d addresses within an "
                    "hour); removed from the relayers map: %s; login from %s not recorded", identity,
                    self.limits.suspend_minutes, table["addresses"], " ".join(removed) or "none", ip)
        return False

    def delete(self, ips: Iterable[str]) -> list[str]:
        return self.inner.delete(ips)

    def delete_if_unchanged(self, entries: Mapping[str, int]) -> list[str]:
        gone = self.inner.delete_if_unchanged(entries)
        if gone:
            try:
                self.guard.forget_users(gone)
            except StoreUnavailable as exc:
                log.error("cannot forget the users of expired addresses: %s", exc)
        return gone

    def expire(self, before: int) -> int:
        return self.inner.expire(before)

    def entries(self) -> list[tuple[str, int]]:
        return self.inner.entries()

    def close(self) -> None:
        self.guard.close()
        self.inner.close()
