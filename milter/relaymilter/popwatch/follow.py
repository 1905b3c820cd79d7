"""NAME
    relaymilter.popwatch.follow - follow log files forever, across rotation

DESCRIPTION
    Follower keeps reading one or more log files as they grow, the way
    ``tail -F`` does, and hands over blocks of complete lines (bytes).

    - Start at the end of each file (or at an offset chosen by the caller,
      for --readback); a file that does not exist yet is waited for and read
      from its start when it appears.
    - Rotation by rename (syslog, Dovecot ``log reopen``): the path now names
      another file. The old file is read to its end first, then kept open and
      drained while writers that have not reopened yet still append to it,
      and closed after DRAIN_IDLE quiet seconds; the new file is read from
      its start.
    - Rotation by copy-truncate: the file shrank below the offset read so far.
      It is read again from the start. Lines written after the last read but
      before the truncation are recovered from the copy (``FILE.1`` or the
      newest ``FILE-*``/``FILE.*`` uncompressed sibling) when its bytes just
      before the old offset are the ones last read.
    - A file removed and created again is picked up from its start.
    - Partial lines are buffered until their newline; lines longer than
      max_line are skipped and counted, the buffer never grows past it
      (popwatch.lines.LineBuffer).
    - One read() takes at most BURST_MAX bytes of a file; ``behind`` then
      says that more is waiting (the watcher holds its writes a little
      while it catches up, see service.py).

    Waking up: with inotify (Linux) the follower sleeps in select() on an
    inotify descriptor watching each file and its directory, so new lines are
    read within milliseconds; a poll every SAFETY_POLL seconds covers what
    inotify cannot see (a directory created later, watch limits, NFS).
    Without inotify it polls every poll_interval seconds. Never a busy loop.

DIAGNOSTICS
    OSError other than "no such file" on open or read is logged and the file
    is retried later; nothing here raises for missing or unreadable files.
    Counters in Follower.stats: rotations, truncations, recovered_bytes,
    overlong (lines skipped for length), disappeared.
"""

from __future__ import annotations

import glob
import logging
import os
import stat
import select
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

from relaymilter.popwatch.inotify import DIR_MASK, FILE_MASK, Inotify
from relaymilter.popwatch.lines import BURST_MAX, MAX_LINE, READ_SIZE, Chunk, LineBuffer

log = logging.getLogger("relaymilter.popwatch")

DRAIN_IDLE = 5.0
SAFETY_POLL = 1.0
FALLBACK_POLL = 0.05
SIGNATURE = 256

Positioner = Callable[[str, int, int], int]     # (path, fd, size) -> start offset


@dataclass
class _Open:
    fd: int
    ident: tuple[int, int]
    pos: int
    buf: LineBuffer
    wd: Optional[int] = None
    backlog_end: int = 0
    last_data: float = field(default_factory=time.monotonic)
    tail: bytes = b""            # the last bytes read, to recognise a copy-truncate copy


@dataclass
class _Tracked:
    path: str
    cur: Optional[_Open] = None
    old: list[_Open] = field(default_factory=list)
    dir_wd: Optional[int] = None
    waiting_logged: bool = False


def _ident(path: str) -> Optional[tuple[int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


class Follower:
    """Follows a set of log files; read() returns new complete lines, wait() sleeps until there may be more."""

    def __init__(self, paths: Iterable[str], max_line: int = MAX_LINE, use_inotify: bool = True,
                 poll_interval: float = FALLBACK_POLL, drain_idle: float = DRAIN_IDLE) -> None:
        self.files = [_Tracked(os.path.abspath(p)) for p in dict.fromkeys(paths)]
        self.max_line = max_line
        self.poll_interval = poll_interval
        self.drain_idle = drain_idle
        self.inotify = Inotify.create() if use_inotify else None
        self.stats: Counter[str] = Counter()
        self.behind = False          # the last read() stopped at BURST_MAX, not at a file's end
        self._closed_overlong = 0

    @property
    def paths(self) -> list[str]:
        return [t.path for t in self.files]

    def start(self, position: Optional[Positioner] = None) -> None:
        """Open every file at its end, or where *position(path, fd, size)* says."""
        for t in self.files:
            self._watch_dir(t)
            self._open(t, position or (lambda path, fd, size: size), backlog=position is not None)

    def _watch_dir(self, t: _Tracked) -> None:
        if self.inotify is not None and t.dir_wd is None:
            t.dir_wd = self.inotify.add(os.path.dirname(t.path) or ".", DIR_MASK)

    def _open(self, t: _Tracked, position: Positioner, backlog: bool = False) -> None:
        try:
            fd = os.open(t.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            if not t.waiting_logged:
                log.info("%s does not exist (yet): waiting for it", t.path)
                t.waiting_logged = True
            return
        except OSError as exc:
            if not t.waiting_logged:
                log.error("cannot open %s: %s (retrying)", t.path, exc.strerror or exc)
                t.waiting_logged = True
            return
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            # Said once, like a missing file: read() retries every poll, and an
            # error per poll (and per inotify event) would flood the log.
            os.close(fd)
            if not t.waiting_logged:
                log.error("%s is a directory, not a log file: waiting for a file there", t.path)
                t.waiting_logged = True
            return
        size = st.st_size
        try:
            pos = max(0, min(size, position(t.path, fd, size)))
        except OSError as exc:
            log.warning("%s: cannot find the read-back start (%s): starting at its end", t.path, exc)
            pos = size
        os.lseek(fd, pos, os.SEEK_SET)
        o = _Open(fd, (st.st_dev, st.st_ino), pos, LineBuffer(self.max_line), backlog_end=size if backlog else 0)
        if self.inotify is not None:
            o.wd = self.inotify.add(t.path, FILE_MASK)
        t.cur = o
        if t.waiting_logged:
            log.info("%s appeared: following it", t.path)
        t.waiting_logged = False

    def read(self) -> list[Chunk]:
        """Every complete line written since the last call, as one or more chunks per file."""
        out: list[Chunk] = []
        now = time.monotonic()
        self.behind = False
        for t in self.files:
            for o in list(t.old):
                if not self._read_open(t, o, out, now) and now - o.last_data > self.drain_idle:
                    self._close(o)
                    t.old.remove(o)
            if t.cur is None:
                self._watch_dir(t)
                self._open(t, lambda path, fd, size: 0)
            if t.cur is None:
                continue
            self._read_open(t, t.cur, out, now)
            ident = _ident(t.path)
            if ident != t.cur.ident:
                if ident is None:
                    log.info("%s disappeared: draining what is left and waiting for it to come back", t.path)
                    self.stats["disappeared"] += 1
                else:
                    log.info("%s was rotated (renamed): following the new file", t.path)
                    self.stats["rotations"] += 1
                t.cur.last_data = now
                t.old.append(t.cur)
                t.cur = None
                if ident is not None:
                    self._open(t, lambda path, fd, size: 0)
                    if t.cur is not None:
                        self._read_open(t, t.cur, out, now)
        return out

    def reopen(self) -> None:
        """Reopen every file (SIGHUP); the same file continues at its offset, a replaced one counts as rotated."""
        for t in self.files:
            o = t.cur
            if o is None or _ident(t.path) != o.ident:
                continue            # read() picks it up as a new or rotated file
            try:
                fd = os.open(t.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError:
                continue
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != o.ident:
                os.close(fd)
                continue
            os.lseek(fd, o.pos, os.SEEK_SET)
            os.close(o.fd)
            o.fd = fd

    def _read_open(self, t: _Tracked, o: _Open, out: list[Chunk], now: float) -> bool:
        try:
            size = os.fstat(o.fd).st_size
        except OSError as exc:
            log.error("%s: cannot stat: %s", t.path, exc.strerror or exc)
            return False
        if size < o.pos:
            log.info("%s was truncated (copy-truncate rotation): reading it again from the start", t.path)
            self.stats["truncations"] += 1
            self._recover_copy(t, o, out)
            o.pos = 0
            o.backlog_end = 0
            o.buf.reset()
            os.lseek(o.fd, 0, os.SEEK_SET)
        got = 0
        while got < BURST_MAX:
            backlog = o.pos < o.backlog_end
            want = min(READ_SIZE, o.backlog_end - o.pos) if backlog else READ_SIZE
            try:
                data = os.read(o.fd, want)
            except BlockingIOError:
                break
            except OSError as exc:
                log.error("%s: read error: %s", t.path, exc.strerror or exc)
                break
            if not data:
                break
            o.pos += len(data)
            got += len(data)
            o.tail = (o.tail + data[-SIGNATURE:])[-SIGNATURE:]
            lines = o.buf.feed(data)
            if lines:
                out.append(Chunk(t.path, lines, backlog))
        if got:
            o.last_data = now
        if got >= BURST_MAX:
            self.behind = True
        return got > 0

    def _recover_copy(self, t: _Tracked, o: _Open, out: list[Chunk]) -> None:
        """Read what the copy of a copy-truncate holds past our offset (written, not yet read, then truncated)."""
        sig = o.tail
        if not sig:
            return
        names = [t.path + ".1"] + sorted(glob.glob(glob.escape(t.path) + "[.-]*"), key=_mtime, reverse=True)
        for name in names[:4]:
            if name.endswith((".gz", ".bz2", ".xz", ".zst", ".Z")) or not os.path.isfile(name):
                continue
            try:
                with open(name, "rb") as fh:
                    fh.seek(max(0, o.pos - len(sig)))
                    if fh.read(len(sig)) != sig:
                        continue
                    rest = fh.read(BURST_MAX)
            except OSError:
                continue
            if rest:
                self.stats["recovered_bytes"] += len(rest)
                lines = o.buf.feed(rest) + o.buf.flush()
                if lines:
                    out.append(Chunk(t.path, lines, False))
            return

    def wait(self, timeout: float, extra_fds: Iterable[int] = ()) -> None:
        """Sleep until a followed file may have changed, an extra fd is readable, or *timeout*."""
        extra = list(extra_fds)
        timeout = max(0.0, timeout)
        if self.inotify is not None:
            fds = [self.inotify.fd] + extra
            try:
                ready, _, _ = select.select(fds, [], [], min(timeout, SAFETY_POLL))
            except InterruptedError:
                return
            if self.inotify.fd in ready:
                self.inotify.drain()
            return
        try:
            select.select(extra, [], [], min(timeout, self.poll_interval))
        except InterruptedError:
            return

    @property
    def overlong(self) -> int:
        return sum(o.buf.overlong for t in self.files for o in ([t.cur] if t.cur else []) + t.old) + self._closed_overlong

    def _close(self, o: _Open) -> None:
        self._closed_overlong += o.buf.overlong
        if self.inotify is not None and o.wd is not None and not any(
                x.wd == o.wd for t in self.files for x in ([t.cur] if t.cur else []) + t.old if x is not o):
            self.inotify.remove(o.wd)
        try:
            os.close(o.fd)
        except OSError:
            pass

    def close(self) -> None:
        for t in self.files:
            for o in t.old + ([t.cur] if t.cur else []):
                self._close(o)
            t.old = []
            t.cur = None
        if self.inotify is not None:
            self.inotify.close()
            self.inotify = None


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0
