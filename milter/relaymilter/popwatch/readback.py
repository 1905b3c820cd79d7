"""NAME
    relaymilter.popwatch.readback - where in a log the last N minutes begin

DESCRIPTION
    On start with --readback the watcher re-reads the part of each log that
    is younger than the grace period (plus max_session when logouts are
    tracked), using each line's own timestamp, so that a restart forgets no
    one who logged in shortly before it. Logs are append-only and roughly in
    time order, so the starting offset is found by bisection on the lines'
    timestamps (a few preads, not a read of the whole file). When the log was
    rotated inside that window, the same part of the previous file
    (``FILE.1``, uncompressed) is read first.

    read_file() reads a whole file once, in blocks of complete lines: used
    for --test and for the previous file.

DIAGNOSTICS
    OSError from the files propagates to the caller (the follower logs it
    and starts at the end).
"""

from __future__ import annotations

import os
from typing import Iterator, Optional

from relaymilter.popwatch.lines import MAX_LINE, LineBuffer
from relaymilter.popwatch.timestamps import TimestampParser

PROBE = 65536
PROBE_LINES = 50


def _first_ts(fd: int, off: int, now: float, parser: TimestampParser) -> tuple[Optional[float], int]:
    """Timestamp and offset of the first dated line starting at or after *off*."""
    buf = os.pread(fd, PROBE, off)
    p = 0
    if off > 0:
        nl = buf.find(b"\n")
        if nl < 0:
            return None, off + len(buf)
        p = nl + 1
    for _ in range(PROBE_LINES):
        if p >= len(buf):
            break
        ts, _pos = parser.leading(buf[p:p + 80], now)
        if ts is not None:
            return ts, off + p
        nl = buf.find(b"\n", p)
        if nl < 0:
            break
        p = nl + 1
    return None, off + p


def start_offset(fd: int, size: int, cutoff: float, now: float) -> int:
    """A line-start offset at or before the first line dated >= *cutoff* (0 when unsure)."""
    parser = TimestampParser()
    lo, hi = 0, size
    while hi - lo > PROBE:
        mid = (lo + hi) // 2
        ts, at = _first_ts(fd, mid, now, parser)
        if ts is None or at >= hi:
            break
        if ts < cutoff:
            lo = at
        else:
            hi = mid
    return lo


def first_line_time(path: str, now: float) -> Optional[float]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return _first_ts(fd, 0, now, TimestampParser())[0]
    finally:
        os.close(fd)


def read_file(path: str, start: int = 0, max_line: int = MAX_LINE, block: int = 1 << 20) -> Iterator[bytes]:
    """Blocks of complete lines of *path* from *start* to its end (a last unfinished line included)."""
    buf = LineBuffer(max_line)
    with open(path, "rb") as fh:
        fh.seek(start)          # start_offset() gives line starts
        while True:
            data = fh.read(block)
            if not data:
                break
            lines = buf.feed(data)
            if lines:
                yield lines
    tail = buf.flush()
    if tail:
        yield tail


def previous_file(path: str, cutoff: float, now: float) -> Optional[tuple[str, int]]:
    """(FILE.1, offset) to read first when *path* starts after *cutoff*; None otherwise."""
    first = first_line_time(path, now)
    if first is not None and first <= cutoff:
        return None
    prev = path + ".1"
    try:
        fd = os.open(prev, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        return prev, start_offset(fd, size, cutoff, now)
    finally:
        os.close(fd)
