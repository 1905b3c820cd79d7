"""NAME
    relaymilter.popwatch.service - the watcher's main loop

DESCRIPTION
    Watcher ties the parts together: Follower (new lines) -> Matcher (login
    and logout events) -> Tracker (relayers.db writes and expiry).

    One loop iteration reads every file to its current end, matches the
    lines, writes all the logins of that burst in one locked update, expires
    what is due, then sleeps until a file changes (inotify), the next expiry
    is due, or a signal arrives. So a login reaches relayers.db a few
    milliseconds after its line is written, a flood costs one write per
    burst, and expiry happens on time even when the log is quiet.

    Catching up (a flood, or --readback of a busy log): while the follower
    says more is waiting, writes are held for up to HOLD_WRITES seconds and
    made together, so an address seen in many bursts is written once per
    hold instead of once per burst, and the map is synced far less often.
    The garbage collector is held off during a step (a flood makes many
    short-lived objects and no cycles) and runs after it.

    Signals (when run() installs them, i.e. in the main thread): SIGHUP
    reloads the configuration and patterns (a bad new file is logged and the
    old settings kept) and reopens the logs; SIGTERM and SIGINT flush the
    pending writes and end run() with 0. A self-pipe registered with
    signal.set_wakeup_fd wakes the select() at once.

DIAGNOSTICS
    ConfigError from the first load propagates (the CLI prints it, exit 2).
    Store errors are logged and retried (see recorder.py).
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from relaymilter.errors import ConfigError, StoreUnavailable
from relaymilter.policy.limits import Limits
from relaymilter.popwatch.follow import Follower
from relaymilter.popwatch.logins import LoginGuard
from relaymilter.popwatch.matcher import Matcher
from relaymilter.popwatch.patterns import PatternSet
from relaymilter.popwatch.readback import previous_file, read_file, start_offset
from relaymilter.popwatch.recorder import Network, Tracker
from relaymilter.store.guard import open_guard_store
from relaymilter.store.relayers import RelayStore, open_relay_store

log = logging.getLogger("relaymilter.popwatch")

IDLE_WAKE = 1.0
HOLD_WRITES = 0.5           # longest a write waits while the watcher catches up with a flood


@dataclass(frozen=True)
class Settings:
    """The effective watcher settings (configuration file + command line)."""

    logfiles: tuple[str, ...]
    dbfile: str
    grace: int
    max_session: int
    skip_networks: tuple[Network, ...]
    readback: bool
    write: bool
    pattern_file: str
    patterns: tuple[str, ...]
    config: str = ""
    limits: Optional[Limits] = None         # relaying limits (addresses_per_hour is applied at login)
    limits_warn: bool = False
    metrics_listen: Optional[tuple[str, int]] = None    # (host, port) of the metrics endpoint; None = off

    def readback_window(self, patterns: PatternSet) -> int:
        sessions = any(p.tracks_sessions for p in patterns.patterns)
        return self.grace + (self.max_session if sessions else 0)


Loader = Callable[[], tuple[Settings, PatternSet]]


class Watcher:
    """Follow the logs and keep relayers.db in step with POP/IMAP logins until stopped."""

    def __init__(self, load: Loader, store_factory: Callable[[str], RelayStore] = open_relay_store,
                 use_inotify: bool = True) -> None:
        self._load = load
        self._store_factory = store_factory
        self._use_inotify = use_inotify
        self._stop = threading.Event()
        self.started = threading.Event()    # set once the logs are open and being followed
        self._hup = False
        self._rfd, self._wfd = os.pipe()
        for fd in (self._rfd, self._wfd):
            os.set_blocking(fd, False)
        self.settings, self.patterns = load()
        self.store: Optional[RelayStore] = self._open_store(self.settings)
        self.matcher = Matcher(self.patterns)
        self.tracker = Tracker(self.store, self.settings.grace, self.settings.max_session,
                               self.settings.skip_networks, self.settings.write)
        self.follower = Follower(self.settings.logfiles, use_inotify=use_inotify)
        self._cutoff: Optional[float] = None
        self._flushed = 0.0         # monotonic time of the last flush
        # Read by the metrics endpoint's thread (relaymilter.metrics.popwatch).
        self.lines_read = 0
        self.caught_up_at = time.time()     # when every log was last read to its end
        self.config_reloads = {"ok": 0, "failed": 0}

    def _open_store(self, settings: Settings) -> Optional[RelayStore]:
        if not settings.write:
            return None
        store = self._store_factory(settings.dbfile)
        # Each login's user goes in the users map beside relayers.db (popwatch.logins).
        return LoginGuard(store, open_guard_store(settings.dbfile), settings.limits, settings.limits_warn)

    # -- control ------------------------------------------------------------

    def stop(self) -> None:
        """Ask run() to finish (thread-safe; also what SIGTERM/SIGINT do)."""
        self._stop.set()
        self._poke()

    def reload(self) -> None:
        """Ask run() to reload configuration and patterns (what SIGHUP does)."""
        self._hup = True
        self._poke()

    def _poke(self) -> None:
        try:
            os.write(self._wfd, b"x")
        except (BlockingIOError, OSError):
            pass

    def _install_signals(self) -> dict[signal.Signals | str, Any]:
        old: dict[signal.Signals | str, Any] = {}
        for sig, handler in ((signal.SIGTERM, lambda *_: self._stop.set()),
                             (signal.SIGINT, lambda *_: self._stop.set()),
                             (signal.SIGHUP, lambda *_: setattr(self, "_hup", True))):
            old[sig] = signal.signal(sig, handler)
        old["wakeup"] = signal.set_wakeup_fd(self._wfd)
        return old

    @staticmethod
    def _restore_signals(old: dict[signal.Signals | str, Any]) -> None:
        signal.set_wakeup_fd(old.pop("wakeup"))
        for sig, handler in old.items():
            assert isinstance(sig, signal.Signals)
            signal.signal(sig, handler)

    # -- the loop -------------------------------------------------------------

    def run(self, install_signals: Optional[bool] = None) -> int:
        """Follow until stopped; 0 on a clean stop."""
        if install_signals is None:
            install_signals = threading.current_thread() is threading.main_thread()
        old = self._install_signals() if install_signals else None
        try:
            self._start()
            self.started.set()
            while not self._stop.is_set():
                if self._hup:
                    self._hup = False
                    self._reload()
                self._step()
            self._step(read=True, final=True)
            log.info("stopping: %s", self.summary())
            return 0
        finally:
            self.follower.close()
            if self.store is not None:
                self.store.close()
            if old is not None:
                self._restore_signals(old)
            for fd in (self._rfd, self._wfd):
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _start(self) -> None:
        s = self.settings
        position = None
        if s.readback:
            now = time.time()
            self._cutoff = now - s.readback_window(self.patterns)
            cutoff = self._cutoff
            for path in self.follower.paths:
                prev = previous_file(path, cutoff, now)
                if prev is not None:
                    log.info("reading back %s from offset %d", prev[0], prev[1])
                    for block in read_file(prev[0], prev[1]):
                        self._feed(block, now, backlog=True)

            def position(path: str, fd: int, size: int) -> int:
                return start_offset(fd, size, cutoff, time.time())
        self.follower.start(position)
        log.info("following %s; relayers map %s; grace %ds; patterns %s%s", ", ".join(s.logfiles),
                 s.dbfile if s.write else "(nowrite: not touched)", s.grace, ", ".join(self.patterns.names),
                 "; reading back %ds" % s.readback_window(self.patterns) if s.readback else "")

    def _feed(self, block: bytes, now: float, backlog: bool) -> None:
        since = self._cutoff if backlog else None
        self.lines_read += block.count(b"\n")
        events = self.matcher.scan(block, now)
        if events and isinstance(self.store, LoginGuard):
            self.store.note(events)
        self.tracker.handle_all(events, now, backlog, since)

    def _step(self, read: bool = True, final: bool = False) -> None:
        started = time.time()
        chunks = self.follower.read() if read else []
        # A burst makes hundreds of thousands of short-lived objects (matches, events, heap
        # entries) and no cycles; the collector would otherwise run hundreds of times over the
        # tracker's long-lived tables (8% of a flood's time). It runs once the step is done.
        collecting = gc.isenabled()
        if chunks and collecting:
            gc.disable()
        try:
            now = time.time()
            for c in chunks:
                self._feed(c.data, now, c.backlog)
            if final:
                self.tracker.retry_now()
            if final or not self.follower.behind or time.monotonic() - self._flushed >= HOLD_WRITES:
                self.tracker.flush(time.time())
                self._flushed = time.monotonic()
            self.tracker.expire(time.time())
        finally:
            if collecting:
                gc.enable()
        if read and not self.follower.behind:
            self.caught_up_at = started
        if chunks or final or self._stop.is_set():
            return
        nxt = self.tracker.next_due()
        timeout = IDLE_WAKE if nxt is None else min(IDLE_WAKE, max(0.0, nxt - time.time()))
        self.follower.wait(timeout, [self._rfd])
        try:
            while os.read(self._rfd, 512):
                pass
        except (BlockingIOError, OSError):
            pass

    def _reload(self) -> None:
        log.info("SIGHUP: reloading configuration and patterns, reopening logs")
        try:
            settings, patterns = self._load()
        except ConfigError as exc:
            log.error("reload failed, keeping the running settings: %s", exc)
            self.config_reloads["failed"] += 1
            return
        if settings.dbfile != self.settings.dbfile or settings.write != self.settings.write:
            self.tracker.flush(time.time())
            try:
                store = self._open_store(settings)
            except (StoreUnavailable, ValueError) as exc:
                log.error("reload: cannot open %s: %s; keeping the running settings", settings.dbfile, exc)
                self.config_reloads["failed"] += 1
                return
            if self.store is not None:
                self.store.close()
            self.store = store
            stats = self.tracker.stats          # the counts go on (the metrics are counters)
            self.tracker = Tracker(store, settings.grace, settings.max_session, settings.skip_networks,
                                   settings.write)
            self.tracker.stats = stats
        else:
            self.tracker.configure(settings.grace, settings.max_session, settings.skip_networks)
        if patterns.patterns != self.patterns.patterns:
            self.matcher = Matcher(patterns)
        if settings.logfiles != self.settings.logfiles:
            for c in self.follower.read():
                self._feed(c.data, time.time(), c.backlog)
            self.follower.close()
            self.follower = Follower(settings.logfiles, use_inotify=self._use_inotify)
            self.follower.start()
        else:
            self.follower.reopen()
        if isinstance(self.store, LoginGuard):
            self.store.limits, self.store.warn = settings.limits, settings.limits_warn
        self.settings, self.patterns = settings, patterns
        self.config_reloads["ok"] += 1

    def summary(self) -> str:
        counts = self.tracker.stats + self.matcher.stats + self.follower.stats
        counts["overlong"] = self.follower.overlong
        return ", ".join("%s=%d" % kv for kv in sorted(counts.items()) if kv[1]) or "nothing seen"
