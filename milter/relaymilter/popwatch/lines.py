"""NAME
    relaymilter.popwatch.lines - log lines as every source hands them over: whole lines, bounded

DESCRIPTION
    A source of log lines (popwatch.follow for files, popwatch.journal for
    the systemd journal, popwatch.readback for a file read once) hands the
    watcher Chunks: blocks of complete lines (bytes, each ending in a
    newline) from one origin. LineBuffer cuts what a source reads into such
    lines:

    - the partial last line is held until its newline comes;
    - a line longer than max_line (MAX_LINE) is skipped and counted in
      ``overlong``, and the buffer never grows past max_line, however long
      the line;
    - NUL bytes a copy-truncate leaves (the writer's old offset, without
      O_APPEND) are dropped at line starts, so the line written after the
      hole counts.

    A source reads READ_SIZE bytes at a time and at most BURST_MAX of one
    origin per round, so one busy log cannot starve the others.

DIAGNOSTICS
    Nothing here raises: overlong lines are counted, not reported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

MAX_LINE = 16384
READ_SIZE = 1 << 20
BURST_MAX = 16 << 20
_NULS_AT_LINE_START = re.compile(rb"\n\0+")


@dataclass
class Chunk:
    """Complete lines from one origin (a file's path, or "journal"); backlog: they were there before we started."""

    path: str
    data: bytes
    backlog: bool = False
    # Journal lines from senders popwatch.journal_senders does not accept: (where a line starts, who sent it).
    senders: Optional[list[tuple[int, str]]] = None


class LineBuffer:
    """Cuts a byte stream into complete lines; holds the partial tail; skips overlong lines."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self.partial = b""
        self.discarding = False
        self.overlong = 0

    def reset(self) -> None:
        self.partial = b""
        self.discarding = False

    def feed(self, data: bytes) -> bytes:
        """The complete lines (each ending in a newline) that *data* finishes."""
        if self.discarding:
            nl = data.find(b"\n")
            if nl < 0:
                return b""
            data = data[nl + 1:]
            self.discarding = False
        if not self.partial and data[:1] == b"\0":
            # The hole a copy-truncate leaves when the writer does not use O_APPEND.
            data = data.lstrip(b"\0")
        if b"\0" in data:
            # Such a hole after a complete line: dropped before lines are measured,
            # so the line written after it counts, however long the hole (the
            # matcher drops leading NULs too; a NUL inside a line still marks it binary).
            data = _NULS_AT_LINE_START.sub(b"\n", data)
        last = data.rfind(b"\n")
        if last < 0:
            self.partial += data
            if len(self.partial) > self.max_line:
                self.partial = b""
                self.discarding = True
                self.overlong += 1
            return b""
        # One copy of the lines, not two (a slice, then the concatenation).
        block = b"".join((self.partial, memoryview(data)[:last + 1])) if self.partial else data[:last + 1]
        tail = data[last + 1:]
        self.partial = b""
        if len(tail) > self.max_line:
            self.discarding = True
            self.overlong += 1
        else:
            self.partial = tail
        if len(block) <= self.max_line:
            return block
        return self._cap(block)

    def _cap(self, block: bytes) -> bytes:
        # Every window of max_line+1 bytes starting at a line start must hold a
        # newline; where one does not, the line there is overlong. Steps are
        # ~max_line bytes, so this costs a few rfind calls per block, not a loop per line.
        limit = self.max_line
        keep: list[bytes] = []
        start = pos = 0
        size = len(block)
        while size - pos > limit:
            nl = block.rfind(b"\n", pos, pos + limit + 1)
            if nl >= 0:
                pos = nl + 1
                continue
            end = block.find(b"\n", pos + limit)
            keep.append(block[start:pos])
            self.overlong += 1
            pos = start = end + 1
        keep.append(block[start:])
        return b"".join(keep)

    def flush(self) -> bytes:
        """The unfinished last line as a line (end of a file read once, as in --test)."""
        tail, self.partial = self.partial, b""
        return tail + b"\n" if tail else b""
