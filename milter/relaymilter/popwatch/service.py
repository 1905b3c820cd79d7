"""NAME
    relaymilter.popwatch.service - the watcher's main loop

DESCRIPTION
    Watcher ties the parts together: Follower (new lines of the log files)
    or JournalFollower (new journal entries, as lines) -> Matcher (login and
    logout events) -> Tracker (relayers.db writes and expiry). Journal lines
    from senders that popwatch.journal_senders does not accept go through a
    matcher of their own, only so that each login among them is logged as
    refused (with the sender's journal fields) and counted.

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
    Store errors are logged and retried (see recorder.py). JournalError
    (journalctl missing) propagates from start (the CLI prints it, exit 1).
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from relaymilter.decisionlog import printable
from relaymilter.errors import ConfigError, StoreUnavailable
from relaymilter.policy.limits import Limits
from relaymilter.popwatch.follow import Follower
from relaymilter.popwatch.lines import Chunk
from relaymilter.popwatch.journal import JournalFollower, journalctl_missing
from relaymilter.popwatch.logins import LoginGuard
from relaymilter.popwatch.matcher import Matcher
from relaymilter.popwatch.patterns import PatternSet
from relaymilter.popwatch.readback import previous_file, read_file, start_offset
from relaymilter.popwatch.recorder import Network, Tracker
from relaymilter.popwatchconfig import DEFAULT_JOURNAL_SENDERS, JournalSender
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
    source: str = "files"                               # files or journal (auto is resolved by the CLI)
    journal_senders: tuple[JournalSender, ...] = DEFAULT_JOURNAL_SENDERS
    journal_cursor: Optional[str] = None

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
        self.follower = self._new_follower(self.settings)
        self.refused = Matcher(self.patterns)       # journal lines of senders not accepted
        self._cutoff: Optional[float] = None
        self._flushed = 0.0         # monotonic time of the last flush
        # Read by the metrics endpoint's thread (relaymilter.metrics.popwatch).
        self.lines_read = 0
        self.caught_up_at = time.time()     # when every log was last read to its end
        self.config_reloads = {"ok": 0, "failed": 0}

    def _new_follower(self, s: Settings) -> Union[Follower, JournalFollower]:
        if s.source == "journal":
            return JournalFollower(s.journal_senders, s.journal_cursor)
        return Follower(s.logfiles, use_inotify=self._use_inotify)

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
        if isinstance(self.follower, JournalFollower):
            # Journal entries read at start are dated: those older than the read-back window are useless.
            self._cutoff = time.time() - s.readback_window(self.patterns)
            self.follower.start(self._cutoff, s.readback)
            log.info("following the systemd journal; relayers map %s; grace %ds; patterns %s",
                     s.dbfile if s.write else "(nowrite: not touched)", s.grace, ", ".join(self.patterns.names))
            return
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
            self._feed_chunks(chunks, now)
            if final:
                self.tracker.retry_now()
            if final or not self.follower.behind or time.monotonic() - self._flushed >= HOLD_WRITES:
                self.tracker.flush(time.time())
                self._flushed = time.monotonic()
                if isinstance(self.follower, JournalFollower) and not self.tracker.pending:
                    self.follower.checkpoint(final)     # every login read so far is in the map
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

    def _feed_chunks(self, chunks: list[Chunk], now: float) -> None:
        for c in chunks:
            if c.senders is None:
                self._feed(c.data, now, c.backlog)
            else:
                self._refuse(c, now)

    def _refuse(self, chunk: Chunk, now: float) -> None:
        """Log each login among journal lines of senders not accepted; record none."""
        assert chunk.senders is not None
        block = chunk.data
        self.lines_read += len(chunk.senders)
        starts = self.refused.candidate_starts(block)
        for start, sender in chunk.senders:
            if starts is not None and start not in starts:
                continue
            for ev in self.refused.scan(block[start:block.find(b"\n", start) + 1], now):
                if ev.kind != "login":
                    continue
                self.follower.stats["refused_logins"] += 1
                log.warning("refused: a login line from a sender popwatch.journal_senders does not accept (%s): "
                            "%s (%s%s%s); not recorded", sender, printable(ev.ip or "", 60), ev.pattern,
                            ", user " if ev.user else "", printable(ev.user, 256) if ev.user else "")

    def _reload(self) -> None:
        log.info("SIGHUP: reloading configuration and patterns, reopening logs")
        try:
            settings, patterns = self._load()
        except ConfigError as exc:
            log.error("reload failed, keeping the running settings: %s", exc)
            self.config_reloads["failed"] += 1
            return
        if settings.source == "journal" and self.settings.source != "journal" and journalctl_missing():
            log.error("reload failed, keeping the running settings: %s", journalctl_missing())
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
            self.refused = Matcher(patterns)
        if (settings.source, settings.logfiles, settings.journal_cursor) != (
                self.settings.source, self.settings.logfiles, self.settings.journal_cursor):
            self._feed_chunks(self.follower.read(), time.time())
            self.tracker.flush(time.time())
            if isinstance(self.follower, JournalFollower) and not self.tracker.pending:
                self.follower.checkpoint(final=True)
            self.follower.close()
            self.follower = self._new_follower(settings)
            if isinstance(self.follower, JournalFollower):
                self.follower.start(time.time() - settings.readback_window(patterns), False)
            else:
                self.follower.start()
        else:
            if isinstance(self.follower, JournalFollower):
                self.follower.senders = settings.journal_senders
            self.follower.reopen()
        if isinstance(self.store, LoginGuard):
            self.store.limits, self.store.warn = settings.limits, settings.limits_warn
        self.settings, self.patterns = settings, patterns
        self.config_reloads["ok"] += 1

    def summary(self) -> str:
        counts = self.tracker.stats + self.matcher.stats + self.follower.stats
        counts["overlong"] = self.follower.overlong
        return ", ".join("%s=%d" % kv for kv in sorted(counts.items()) if kv[1]) or "nothing seen"
