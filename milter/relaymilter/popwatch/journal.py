"""NAME
    relaymilter.popwatch.journal - follow the systemd journal; only the POP/IMAP server's lines count

DESCRIPTION
    A line in a log file proves nothing about who wrote it: any local user
    can hand syslog a line that looks like Dovecot's. journald records with
    each entry fields the sender cannot set (_EXE, _UID, _PID, _COMM,
    _SYSTEMD_UNIT, _TRANSPORT: from the kernel's credentials of the sending
    socket, /proc and the sender's cgroup). JournalFollower reads the journal
    with ``journalctl --output=json --follow`` (a child process; no Python
    binding needed) and hands the watcher each entry as a syslog-style line

        2026-12-03T06:55:00.123456Z HOSTNAME IDENTIFIER[_PID]: MESSAGE

    so that the same patterns, matcher and tracker as for log files apply.
    The time is the journal's own (__REALTIME_TIMESTAMP, microseconds), the
    host is _HOSTNAME and the process id is _PID (journald's, not the
    sender's word); newlines inside MESSAGE become spaces, so one entry is
    one line, and a timestamp at the start of MESSAGE is dropped (Dovecot
    with log_path = /dev/stderr writes its log_timestamp there).

    Entries whose trusted fields match popwatch.journal_senders come as
    ordinary chunks. The others come as chunks with ``senders`` set (where
    each line starts and who sent it): the watcher looks for logins in them
    only to log each one as refused, naming the sender's fields.

    Resuming: the cursor of the last entry handed over is saved in
    popwatch.journal_cursor (written to a new file and renamed over the old,
    at most once per CURSOR_EVERY seconds while lines arrive, and at stop),
    and only when the watcher has written every login read so far. At start
    journalctl continues after that cursor, so a restart neither reads a
    login twice (after a crash, at most the last CURSOR_EVERY seconds are
    read again, which rewrites the same entries) nor loses one logged while
    the watcher was down. A cursor older than the read-back window, or none,
    starts at that window (readback) or at the present.

    If journalctl ends (killed, journal vacuumed under it), it is started
    again after RESTART_DELAY seconds from the last cursor (from where the
    first one started when it handed over nothing, the cursor it was given
    may be the reason).

DIAGNOSTICS
    JournalError when journalctl cannot be started at all (not installed:
    Debian package systemd) or cannot read the system journal (a user not
    in the group adm or systemd-journal: a quick ``journalctl --lines=0``
    at start says so); the CLI prints it in one line, exit 1.
    journalctl's own messages (e.g. "not seeing messages from other users",
    a missing group) are logged as warnings. Counters in stats: entries,
    accepted, refused_logins (counted by the watcher), bad_entries,
    restarts.
"""

from __future__ import annotations

import json
import logging
import os
import re
import select
import shutil
import signal
import subprocess
import time
from collections import Counter
from typing import Iterable, Optional

from relaymilter.decisionlog import printable
from relaymilter.popwatch.cursor import cursor_time, read_cursor, write_cursor
from relaymilter.popwatch.lines import BURST_MAX, READ_SIZE, Chunk, LineBuffer
from relaymilter.popwatch.timestamps import TimestampParser
from relaymilter.popwatchconfig import JournalSender

log = logging.getLogger("relaymilter.popwatch")

JOURNALCTL = "journalctl"
MAX_ENTRY = 1 << 20             # a longer JSON line (entry) is skipped and counted
CURSOR_EVERY = 1.0
RESTART_DELAY = 5.0
SAFETY_POLL = 1.0
STOP_WAIT = 5.0
PROBE_WAIT = 30.0
# What journalctl prints per entry (plus __CURSOR and __REALTIME_TIMESTAMP, always there).
OUTPUT_FIELDS = ("MESSAGE", "SYSLOG_IDENTIFIER", "SYSLOG_PID", "_PID", "_UID", "_GID", "_COMM", "_EXE",
                 "_SYSTEMD_UNIT", "_TRANSPORT", "_HOSTNAME")
SHOWN = ("_COMM", "_EXE", "_PID", "_UID", "_SYSTEMD_UNIT", "_TRANSPORT")     # named when a login is refused
_UNSAFE = re.compile(rb"[\x00-\x20\x7f]")
_TIMESTAMPS = TimestampParser()


class JournalError(Exception):
    """The journal cannot be read at all (journalctl missing)."""


def journalctl_missing(journalctl: str = JOURNALCTL) -> str:
    """Why the journal cannot be read ("" when journalctl is there)."""
    if shutil.which(journalctl) is None:
        return "popwatch.source journal: %s not found (Debian package systemd)" % journalctl
    return ""


def _value(entry: dict, name: str) -> Optional[bytes]:
    """A field as bytes; None when absent or given several times (journalctl's list form)."""
    v = entry.get(name)
    if isinstance(v, str):
        return v.encode("utf-8", "surrogateescape")
    if isinstance(v, list) and all(isinstance(b, int) for b in v):
        try:
            return bytes(v)         # a binary field: an array of byte values
        except ValueError:
            return None
    return None


def accepts(senders: Iterable[JournalSender], entry: dict) -> bool:
    """Whether some match of *senders* holds for every one of its fields."""
    for sender in senders:
        for name, values in sender.fields:
            v = entry.get(name)
            if not isinstance(v, str) or v not in values:
                break
        else:
            return True
    return False


def describe(entry: dict) -> str:
    """The sender's trusted fields, for a log line (escaped)."""
    return " ".join("%s=%s" % (k, printable(str(entry[k]), 120)) for k in SHOWN if k in entry)


def as_line(entry: dict) -> Optional[bytes]:
    """The entry as one syslog-style line (with its newline), or None without a usable time or message."""
    message = _value(entry, "MESSAGE")
    try:
        usec = int(entry["__REALTIME_TIMESTAMP"])
    except (KeyError, TypeError, ValueError):
        return None
    if message is None:
        return None
    sec, frac = divmod(usec, 1000000)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)).encode() + b".%06dZ" % frac
    host = _UNSAFE.sub(b"_", _value(entry, "_HOSTNAME") or b"localhost")
    ident = _UNSAFE.sub(b"_", _value(entry, "SYSLOG_IDENTIFIER") or _value(entry, "_COMM") or b"-")
    pid = _value(entry, "_PID") or b""
    head = b"%s %s %s[%s]: " % (stamp, host, ident, pid) if pid.isdigit() else b"%s %s %s: " % (stamp, host, ident)
    message = message.rstrip(b"\n").replace(b"\r", b" ").replace(b"\n", b" ")
    return head + message[_TIMESTAMPS.skip(message)[1]:] + b"\n"


class JournalFollower:
    """Follows the journal through journalctl; read() returns new lines, wait() sleeps until there may be more."""

    files: list = []            # no log files (what the metrics measure the lag of)

    def __init__(self, senders: Iterable[JournalSender], cursor_file: Optional[str],
                 journalctl: str = JOURNALCTL) -> None:
        self.senders = tuple(senders)
        self.cursor_file = os.path.expanduser(cursor_file) if cursor_file else None
        self.journalctl = journalctl
        self.paths = ["the systemd journal"]
        self.stats: Counter[str] = Counter()
        self.behind = False
        self.cursor: Optional[str] = None       # of the last entry handed over
        self._saved: Optional[str] = None
        self._saved_at = 0.0
        self._proc: Optional[subprocess.Popen] = None
        self._buf = LineBuffer(MAX_ENTRY)
        self._err = b""
        self._started = 0.0
        self._since = 0.0               # where to start without a cursor
        self._restart_at: Optional[float] = None
        self._cursor_error = ""
        self._spawned_at_cursor: Optional[str] = None

    @property
    def overlong(self) -> int:
        return self._buf.overlong

    # -- starting journalctl --------------------------------------------------

    def start(self, oldest: float, readback: bool) -> None:
        """Start after the saved cursor; without one, at *oldest* (readback) or now. JournalError if journalctl is missing."""
        missing = journalctl_missing(self.journalctl)
        if missing:
            raise JournalError(missing)
        self._probe()
        self._started = time.time()
        self._since = oldest if readback else self._started
        saved = read_cursor(self.cursor_file) if self.cursor_file else None
        self._saved = saved
        if saved is not None and cursor_time(saved) < oldest:
            log.info("the saved journal cursor is older than the read-back window: reading from %s",
                     time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(oldest)))
            saved = None
        self.cursor = saved
        self._spawn(self._since)

    def _probe(self) -> None:
        """JournalError when journalctl cannot read the system journal (a missing group): said at start, once."""
        try:
            probe = subprocess.run([self.journalctl, "--output=json", "--no-pager", "--lines=0"], capture_output=True,
                                   stdin=subprocess.DEVNULL, timeout=PROBE_WAIT)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise JournalError("cannot run %s: %s" % (self.journalctl, exc)) from None
        said = probe.stderr.decode("utf-8", "replace").strip()
        if probe.returncode != 0 or "not seeing messages from other users" in said:
            raise JournalError("%s cannot read the system journal: %s (run relaymilter-popwatch as root or in the "
                               "group adm or systemd-journal)" % (self.journalctl, printable(said.splitlines()[0] if said
                                                                                            else "exit status %d" % probe.returncode, 200)))

    def _spawn(self, since: float) -> None:
        args = [self.journalctl, "--output=json", "--follow", "--no-tail", "--no-pager",
                "--output-fields=" + ",".join(OUTPUT_FIELDS)]
        if self.cursor is not None:
            args.append("--after-cursor=" + self.cursor)
            where = "after cursor %s" % self.cursor
        else:
            args.append("--since=@%.6f" % since)
            where = "from %s" % time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
        try:
            self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, close_fds=True, start_new_session=True)
        except OSError as exc:
            raise JournalError("cannot run %s: %s" % (self.journalctl, exc.strerror or exc)) from None
        assert self._proc.stdout is not None and self._proc.stderr is not None
        for fh in (self._proc.stdout, self._proc.stderr):
            os.set_blocking(fh.fileno(), False)
        self._buf.reset()
        self._restart_at = None
        self._spawned_at_cursor = self.cursor
        log.info("reading the systemd journal %s (journalctl pid %d); accepting logins from %s", where,
                 self._proc.pid, "; or ".join(s.describe() for s in self.senders))

    # -- reading ----------------------------------------------------------------

    def read(self) -> list[Chunk]:
        """Every complete entry journalctl printed since the last call, as chunks of lines."""
        self.behind = False
        proc = self._proc
        if proc is None:
            if self._restart_at is not None and time.monotonic() >= self._restart_at:
                self.stats["restarts"] += 1
                try:
                    self._spawn(self._since)
                except JournalError as exc:
                    log.error("%s (retrying in %gs)", exc, RESTART_DELAY)
                    self._restart_at = time.monotonic() + RESTART_DELAY
            return []
        assert proc.stdout is not None
        self._drain_stderr()
        got = 0
        blocks = []
        ended = False
        while got < BURST_MAX:
            try:
                data = os.read(proc.stdout.fileno(), READ_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                log.error("reading from journalctl: %s", exc.strerror or exc)
                ended = True
                break
            if not data:
                ended = True
                break
            got += len(data)
            lines = self._buf.feed(data)
            if lines:
                blocks.append(lines)
        if got >= BURST_MAX:
            self.behind = True
        out = self._chunks(b"".join(blocks)) if blocks else []
        if ended:
            self._ended()
        return out

    def _chunks(self, data: bytes) -> list[Chunk]:
        ok: list[bytes] = []
        old: list[bytes] = []
        refused: list[bytes] = []
        senders: list[tuple[int, str]] = []
        at = 0
        started = self._started * 1e6
        for raw in data.splitlines():
            self.stats["entries"] += 1
            try:
                entry = json.loads(raw)
                cursor = entry["__CURSOR"]
            except (ValueError, KeyError, TypeError):
                self.stats["bad_entries"] += 1
                continue
            if isinstance(cursor, str):
                self.cursor = cursor
            line = as_line(entry)
            if line is None:
                continue
            if accepts(self.senders, entry):
                self.stats["accepted"] += 1
                try:
                    backlog = int(entry["__REALTIME_TIMESTAMP"]) < started
                except ValueError:
                    backlog = False
                (old if backlog else ok).append(line)
            else:
                senders.append((at, describe(entry)))
                refused.append(line)
                at += len(line)
        out = []
        if old:
            out.append(Chunk("journal", b"".join(old), backlog=True))
        if ok:
            out.append(Chunk("journal", b"".join(ok)))
        if refused:
            out.append(Chunk("journal", b"".join(refused), senders=senders))
        return out

    def _drain_stderr(self) -> None:
        proc = self._proc
        if proc is None or proc.stderr is None:
            return
        try:
            while True:
                data = os.read(proc.stderr.fileno(), 65536)
                if not data:
                    break
                self._err += data
        except (BlockingIOError, OSError):
            pass
        *lines, self._err = self._err.split(b"\n")
        self._err = self._err[-4096:]
        for line in lines:
            if line.strip():
                log.warning("journalctl: %s", printable(line.decode("utf-8", "replace"), 300))

    def _ended(self) -> None:
        proc = self._proc
        self._drain_stderr()
        self._stop_child()
        if self._err.strip():
            log.warning("journalctl: %s", printable(self._err.decode("utf-8", "replace"), 300))
            self._err = b""
        code = proc.returncode if proc is not None else None
        log.error("journalctl ended (exit status %s): starting it again in %gs", code, RESTART_DELAY)
        if self.cursor is not None and self._spawned_at_cursor == self.cursor:
            # It may be the cursor journalctl refused (a journal made anew): start without it.
            self.cursor = None
        self._restart_at = time.monotonic() + RESTART_DELAY

    # -- waiting, saving, stopping -----------------------------------------------

    def wait(self, timeout: float, extra_fds: Iterable[int] = ()) -> None:
        """Sleep until journalctl printed something, an extra fd is readable, or *timeout*."""
        fds = list(extra_fds)
        proc = self._proc
        if proc is not None and proc.stdout is not None and proc.stderr is not None:
            fds += [proc.stdout.fileno(), proc.stderr.fileno()]
        try:
            select.select(fds, [], [], min(max(0.0, timeout), SAFETY_POLL))
        except InterruptedError:
            return

    def checkpoint(self, final: bool = False) -> None:
        """Save the cursor of the last entry handed over (the caller has recorded everything up to it)."""
        if self.cursor_file is None or self.cursor is None or self.cursor == self._saved:
            return
        now = time.monotonic()
        if not final and now - self._saved_at < CURSOR_EVERY:
            return
        self._saved_at = now
        try:
            write_cursor(self.cursor_file, self.cursor)
        except OSError as exc:
            problem = "%s: %s" % (self.cursor_file, exc.strerror or exc)
            if problem != self._cursor_error:
                log.error("cannot save the journal cursor in %s (a restart will read some entries again)", problem)
                self._cursor_error = problem
            return
        self._cursor_error = ""
        self._saved = self.cursor

    def reopen(self) -> None:
        """Nothing to reopen (SIGHUP): journalctl follows journal rotation itself."""

    def _stop_child(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(STOP_WAIT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_WAIT)
        for fh in (proc.stdout, proc.stderr):
            if fh is not None:
                fh.close()

    def close(self) -> None:
        self._stop_child()
