"""NAME
    relaymilter.popwatch.recorder - turn login events into relayers.db entries, and expire them

DESCRIPTION
    Tracker receives the events the matcher finds and keeps, per client
    address, the time of its last login/logout and its open sessions.

    Writing: logins are collected and written by flush() in ONE store.add()
    (one locked read-modify-write) per burst of log lines, so a flood of
    logins costs one write, many logins of one address in a burst one entry,
    and a single login is written as soon as the watcher has read it. The
    stored value is the login time: the line's own time when it is within
    LIVE_SKEW of the clock (syslog has whole seconds), else the clock; for
    read-back lines, always the line's time.

    Before writing, flush() reads what the map holds for the burst's
    addresses (see below): by point lookups for a small burst, by one bulk
    read of the map (store.entries()) when the burst is large next to the
    map, which is several times cheaper than as many lookups.

    A timestamp is never moved backwards: an entry whose stored time is
    later than the login (``vsmtprelay add IP <future ticks>``, or another
    watcher's newer login) is left as it is and is not ours.

    Expiry runs on the clock (the watcher calls expire() when next_due()
    says), not on log traffic: an address expires ``grace`` seconds after its
    last login, or after its last logout while a pattern tracks sessions.
    An open session keeps it, for at most ``max_session`` seconds after the
    login (a lost logout line must not keep an address forever). Removal is
    store.delete_if_unchanged({ip: the time we wrote}): an entry someone else
    changed since (vsmtprelay, another watcher) is never touched.

    Addresses are canonicalised by addresses.ClientAddresses (cached per
    address text); invalid ones are counted and skipped, and addresses in
    skip_networks (default: trusted_networks) are never recorded. The expiry
    schedule is updated once per address per burst, not per login.

DIAGNOSTICS
    StoreUnavailable from the store is logged; the writes are kept and
    retried after RETRY seconds, expiry likewise. Counters in Tracker.stats:
    logins, logouts, invalid_ip, skipped_local, undated, too_old,
    unmatched_logouts, written, expired, kept_changed, abandoned_sessions,
    store_errors.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections import Counter
from typing import Iterable, Optional, Sequence

from relaymilter.decisionlog import printable
from relaymilter.errors import StoreUnavailable
from relaymilter.popwatch.addresses import ClientAddresses, Network
from relaymilter.popwatch.matcher import Event
from relaymilter.store.relayers import RelayStore

log = logging.getLogger("relaymilter.popwatch")

LIVE_SKEW = 300.0
RETRY = 2.0
DEFAULT_MAX_SESSION = 8 * 3600
BULK_MIN = 256              # a burst of fewer addresses is checked by point lookups
# A point lookup costs about as much as bulk-reading this many entries. On Berkeley DB one
# entry of entries() is ~2.5 us; a lookup ~2-4 us on a quiet file but ~35 us within 100 ms
# of a write (the reader reopens the file then); 4 sits between the two.
LOOKUP_COST = 4


class Tracker:
    """Per-address login state, batched writes and clock-driven expiry."""

    def __init__(self, store: Optional[RelayStore], grace: int, max_session: int = DEFAULT_MAX_SESSION,
                 skip_networks: Sequence[Network] = (), write: bool = True) -> None:
        self.store = store
        self.write = write and store is not None
        self.configure(grace, max_session, skip_networks)
        self._ours: dict[str, int] = {}
        self._last: dict[str, float] = {}
        self._open: dict[str, dict[tuple, float]] = {}
        self._by_session: dict[tuple[str, str], str] = {}
        self._writes: dict[str, tuple[int, str]] = {}
        self._heap: list[tuple[float, str]] = []
        self._dirty: set[str] = set()
        self._map_size: Optional[int] = None            # entries in the map, as last seen (None: unknown)
        self._seq = itertools.count()
        self._retry_at = 0.0
        self.stats: Counter[str] = Counter()

    def configure(self, grace: int, max_session: int, skip_networks: Sequence[Network]) -> None:
        self.grace = int(grace)
        self.max_session = int(max_session)
        self.skip_networks = tuple(skip_networks)
        self._addresses = ClientAddresses(self.skip_networks)
        heap = getattr(self, "_heap", None)
        if heap:
            for ip in list(self._last):
                self._schedule(ip)

    # -- events -------------------------------------------------------------

    def canonical(self, raw: Optional[str]) -> Optional[str]:
        """The relayers.db key for *raw*, or None (counted) when invalid or local."""
        key, problem = self._addresses.classify(raw or "")
        if problem is None:
            return key
        self.stats[problem] += 1
        if key is None:
            log.warning("not an IP address in a login line: %r (skipped)", (raw or "")[:60])
        else:
            log.debug("%s is in a local network: not recorded", key)
        return None

    def handle(self, ev: Event, now: float, backlog: bool = False, since: Optional[float] = None) -> Optional[str]:
        """Record one event; for a login, the canonical address recorded (else None)."""
        logins = self.stats["logins"]
        self.handle_all((ev,), now, backlog, since)
        if self.stats["logins"] == logins:
            return None
        return self._addresses.classify(ev.ip or "")[0]

    def handle_all(self, events: Iterable[Event], now: float, backlog: bool = False,
                   since: Optional[float] = None) -> None:
        """handle() each of *events* (what the watcher does with a block's events)."""
        say = log.isEnabledFor(logging.INFO)
        when, logout, canonical = self._when, self._logout, self.canonical
        live = not backlog and since is None
        # Locals for the tables, no call per login of a known address: a POP server's
        # clients log in again and again.
        cache = self._addresses.cache
        last, opened, by_session, writes = self._last, self._open, self._by_session, self._writes
        dirty = self._dirty.add
        seq = self._seq
        # Counted here and added once: a Counter costs several times a local int per update.
        logins = unmatched = 0
        outcomes: dict[str, int] = {}
        for ev in events:
            ts = ev.ts
            if live:
                # _when() for a live line, spelled out: the line's time unless the clock disagrees.
                if ts is None or not -LIVE_SKEW <= ts - now <= LIVE_SKEW:
                    ts = now
            else:
                ts = when(ev, now, backlog, since)
                if ts is None:
                    continue
            if ev.kind != "login":
                if ev.ip is None and ev.session and (ev.pattern, ev.session) not in by_session:
                    unmatched += 1          # what _logout() says for a session it never saw open
                    continue
                outcome = logout(ev, ts)
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
                continue
            known = cache.get(ev.ip) if ev.ip else None
            # An address not seen yet, or not to be recorded: checked (cached) and counted there.
            ip = known[0] if known is not None and known[1] is None else canonical(ev.ip)
            if ip is None:
                continue
            before = last.get(ip)
            if before is None or before < ts:
                last[ip] = ts
            if ev.tracks_sessions:
                session = ev.session
                key: tuple = (ev.pattern, session) if session else (ev.pattern, None, next(seq))
                sessions = opened.get(ip)
                if sessions is None:
                    sessions = opened[ip] = {}
                sessions[key] = ts
                if session:
                    by_session[key] = ip
            stamp = int(ts)
            prev = writes.get(ip)
            if prev is None or prev[0] < stamp:
                writes[ip] = (stamp, "login")
            dirty(ip)
            logins += 1
            if say:
                log.info("login from %s (%s%s%s)", ip, ev.pattern, ", user " if ev.user else "",
                         printable(ev.user, 256) if ev.user else "")
        if logins:
            self.stats["logins"] += logins
        if unmatched:
            self.stats["unmatched_logouts"] += unmatched
        self.stats.update(outcomes)

    def _when(self, ev: Event, now: float, backlog: bool, since: Optional[float]) -> Optional[float]:
        """The time an event counts for; None (counted) when it is not to be recorded."""
        if backlog:
            ts = ev.ts
            if ts is None:
                self.stats["undated"] += 1
                return None
        else:
            ts = ev.ts
            if ts is None or not -LIVE_SKEW <= ts - now <= LIVE_SKEW:
                ts = now
        if since is not None and ts < since:
            self.stats["too_old"] += 1
            return None
        return ts

    def _logout(self, ev: Event, ts: float) -> str:
        """Close a session; the counter saying how it went (logouts, unmatched_logouts, invalid_ip)."""
        ip: Optional[str] = None
        key: Optional[tuple] = None
        if ev.session:
            key = (ev.pattern, ev.session)
            ip = self._by_session.pop(key, None)
        if ip is None and ev.ip is not None:
            ip = self._addresses.classify(ev.ip)[0]
            if ip is None:
                return "invalid_ip"
        sessions = self._open.get(ip or "")
        if ip is None or not sessions:
            return "unmatched_logouts"
        if key is None or key not in sessions:
            mine = [k for k in sessions if k[0] == ev.pattern]
            if not mine:
                return "unmatched_logouts"
            key = min(mine, key=sessions.__getitem__)
        del sessions[key]
        if not sessions:
            del self._open[ip]
        self._last[ip] = max(self._last.get(ip, 0.0), ts)
        if ip not in self._open:
            # The stored time becomes the logout: the grace period counts from there.
            self._queue(ip, int(ts), "logout")
        self._dirty.add(ip)
        log.debug("logout of %s (%s)", ip, ev.pattern)
        return "logouts"

    def _queue(self, ip: str, stamp: int, kind: str) -> None:
        prev = self._writes.get(ip)
        if prev is None:
            self._writes[ip] = (stamp, kind)
        elif prev[0] < stamp:
            # A pending login stays a login (it must be written even if a logout follows).
            self._writes[ip] = (stamp, "login" if prev[1] == "login" else kind)

    # -- writing ------------------------------------------------------------

    @property
    def pending(self) -> bool:
        """Whether logins or logouts wait to be written (a store error, or not flushed yet)."""
        return bool(self._writes)

    def retry_now(self) -> None:
        """Forget the back-off after a store error (the final flush before exit tries once more)."""
        self._retry_at = 0.0

    def flush(self, now: float) -> list[tuple[str, int]]:
        """Write the queued logins in one locked update; what was written."""
        if not self._writes or now < self._retry_at:
            return []
        writes, self._writes = self._writes, {}
        if not self.write:
            done = []
            for ip, (stamp, kind) in sorted(writes.items()):
                if self._due(ip) > now:
                    log.info("nowrite: would record %s %d (%s)", ip, stamp, kind)
                    self._ours[ip] = stamp
                    done.append((ip, stamp))
            return done
        assert self.store is not None
        try:
            stored = self._stored(list(writes))
            todo: dict[str, int] = {}
            for ip, (stamp, kind) in writes.items():
                cur = stored.get(ip)
                mine = self._ours.get(ip)
                if cur == stamp:
                    self._ours[ip] = stamp                  # already there (a restart's read-back)
                elif cur is not None and cur > stamp:
                    if mine != cur:
                        self._ours.pop(ip, None)            # someone else's newer or future entry
                elif kind == "logout" and (cur is None or cur != mine):
                    self._ours.pop(ip, None)                # deleted or changed by someone else
                elif self._last.get(ip, 0.0) + self.grace <= now and self._due(ip) <= now:
                    self.stats["too_old"] += 1              # read back, but its grace is over already
                else:
                    todo[ip] = stamp
            if todo:
                self.store.add(todo, ttl=self.grace)
                if self._map_size is not None:
                    self._map_size += sum(1 for ip in todo if stored.get(ip) is None)
        except StoreUnavailable as exc:
            log.error("cannot write relayers map: %s (retrying in %gs)", exc, RETRY)
            self.stats["store_errors"] += 1
            for ip, (stamp, kind) in writes.items():
                self._queue(ip, stamp, kind)
            self._retry_at = now + RETRY
            return []
        self._ours.update(todo)
        self.stats["written"] += len(todo)
        log.debug("wrote %d entr%s to %s", len(todo), "y" if len(todo) == 1 else "ies", self.store.location)
        return sorted(todo.items())

    def _stored(self, ips: list[str]) -> dict[str, Optional[int]]:
        """What the map holds for *ips*: point lookups, or one bulk read when that is cheaper."""
        # A few addresses are looked up; a burst that is large next to the map reads it once.
        assert self.store is not None
        size = self._map_size
        if len(ips) >= BULK_MIN and (size is None or len(ips) * LOOKUP_COST >= size):
            entries = self.store.entries()
            self._map_size = len(entries)
            held = dict(entries)
            return {ip: held.get(ip) for ip in ips}
        return {ip: self.store.lookup(ip) for ip in ips}

    # -- expiry -------------------------------------------------------------

    def _due(self, ip: str) -> float:
        due = self._last.get(ip, 0.0) + self.grace
        sessions = self._open.get(ip)
        if sessions:
            due = max(due, max(sessions.values()) + self.max_session)
        return due

    def _schedule(self, ip: str) -> None:
        heapq.heappush(self._heap, (self._due(ip), ip))

    def _settle(self) -> None:
        # Addresses seen since the last call get one heap entry each, not one per login;
        # the due time as _due() computes it, with locals (a flood dirties thousands).
        last, opened, grace, max_session = self._last, self._open, self.grace, self.max_session
        heap, push = self._heap, heapq.heappush
        for ip in self._dirty:
            when = last.get(ip)
            if when is None:
                continue
            due = when + grace
            sessions = opened.get(ip)
            if sessions:
                due = max(due, max(sessions.values()) + max_session)
            push(heap, (due, ip))
        self._dirty.clear()

    def next_due(self) -> Optional[float]:
        """When expire() next has work (or a failed write should be retried); None when idle."""
        self._settle()
        heap = self._heap
        while heap:
            due, ip = heap[0]
            if ip in self._last and self._due(ip) == due:
                break
            heapq.heappop(heap)
        nxt = heap[0][0] if heap else None
        if self._writes:
            nxt = self._retry_at if nxt is None else min(nxt, self._retry_at)
        return nxt

    def expire(self, now: float) -> list[str]:
        """Remove the entries whose time is up (and still hold what we wrote); the removed addresses."""
        self._settle()
        due: list[str] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            when, ip = heapq.heappop(heap)
            if ip in self._last and self._due(ip) == when and ip not in self._writes and ip not in due:
                due.append(ip)
        if not due:
            return []
        if now < self._retry_at:
            for ip in due:
                heapq.heappush(heap, (self._retry_at, ip))
            return []
        theirs = {ip: self._ours[ip] for ip in due if ip in self._ours}
        removed: list[str] = []
        if theirs and self.write:
            assert self.store is not None
            try:
                removed = self.store.delete_if_unchanged(theirs)
            except StoreUnavailable as exc:
                log.error("cannot expire entries in relayers map: %s (retrying in %gs)", exc, RETRY)
                self.stats["store_errors"] += 1
                self._retry_at = now + RETRY
                for ip in due:
                    heapq.heappush(heap, (self._retry_at, ip))
                return []
        elif theirs:
            removed = sorted(theirs)
            for ip in removed:
                log.info("nowrite: would expire %s", ip)
        gone = set(removed)
        if self._map_size is not None:
            self._map_size = max(0, self._map_size - len(gone))
        for ip in due:
            if ip in self._open:
                self.stats["abandoned_sessions"] += len(self._open[ip])
                log.warning("%s: no logout seen within max_session (%ds): treating its sessions as closed",
                            ip, self.max_session)
                for key in self._open.pop(ip):
                    if key[1] is not None:
                        self._by_session.pop((key[0], key[1]), None)
            if ip in gone:
                log.info("expired %s (grace of %ds over)", ip, self.grace)
            elif ip in theirs:
                self.stats["kept_changed"] += 1
                log.info("left %s alone: its entry changed since popwatch wrote it", ip)
            self._ours.pop(ip, None)
            self._last.pop(ip, None)
        self.stats["expired"] += len(gone)
        return sorted(gone)

    @property
    def addresses(self) -> int:
        """How many addresses are being tracked (seen within their grace period)."""
        return len(self._last)

    @property
    def tracked(self) -> dict[str, int]:
        """Address -> the time popwatch wrote for it (entries it will expire)."""
        return dict(self._ours)
