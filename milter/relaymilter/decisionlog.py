"""NAME
    relaymilter.decisionlog - the one-line-per-decision log, cheap enough for the hot path

DESCRIPTION
    Every MAIL and RCPT decision is logged in one greppable line. Through the
    logging module a line costs about 10-20 microseconds of the callback's
    time (a LogRecord, a formatter, a locked handler, a write), which is more
    than the decision itself; under load that is most of the milter's CPU.

    The callback formats its line (one % on a constant format) and appends
    it to a deque (DecisionLog.append, the deque's own append: no Python
    frame). A background thread wakes every INTERVAL seconds and hands the
    finished lines to the sink CHUNK at a time: one write() per chunk for a
    stream, one datagram per line for syslog. Between chunks it sleeps PAUSE
    seconds, so the milter's callbacks never wait for the GIL behind a whole
    batch. Formatting in the callback is the cheaper way in all: the writer
    thread would take the same GIL for the same formatting plus its own loop
    over queued entries. Lines keep their order. close() flushes what is
    queued.

    Like syslogd, the stream sink stamps lines when it writes them (one
    stamp per chunk): at most INTERVAL, about 20 ms, after the decision.
    Reading the clock for every line would cost the callbacks more than
    formatting the line does.

    The sinks write the same shapes as relaymilter's logging setup:
      stderr: "2026-11-21 18:56:51,614 relaymilter[812]: <message>"
      syslog: "<22>relaymilter[812]: <message>" to /dev/log (facility mail, info;
              syslogd stamps it)

DIAGNOSTICS
    A sink that fails (stderr closed, syslog socket gone) loses that batch;
    the failure is reported once through the logging module and the milter
    goes on deciding: logging must never stop mail.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import threading
import time
from typing import Callable, Optional, Sequence

log = logging.getLogger("relaymilter")

INTERVAL = 0.02        # seconds between flushes
CHUNK = 256            # lines handed to the sink per GIL hold (well under a microsecond each)
PAUSE = 0.0001         # seconds the writer lets callbacks run between chunks

Sink = Callable[[Sequence[str]], None]


def stream_sink(fd: int, name: str = "relaymilter") -> Sink:
    """Write lines to a file descriptor (stderr) in the logging module's stderr format."""
    last = [(-1, "")]           # (the second last stamped, its text), replaced whole

    def write(lines: Sequence[str]) -> None:
        t = time.time()
        sec = int(t)
        day = last[0]
        if day[0] != sec:
            day = last[0] = (sec, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sec)))
        # The pid is asked each time: the milter forks after the log is set up.
        head = "%s,%03d %s[%d]: " % (day[1], int((t - sec) * 1000), name, os.getpid())
        text = head + ("\n" + head).join(lines) + "\n"
        view = memoryview(text.encode("utf-8", "backslashreplace"))
        while view:
            done = os.write(fd, view)
            view = view[done:]

    return write


def syslog_sink(address: str = "/dev/log", name: str = "relaymilter") -> Sink:
    """Send lines to the local syslog daemon, facility mail, severity info."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.connect(address)

    def write(lines: Sequence[str]) -> None:
        prefix = "<22>%s[%d]: " % (name, os.getpid())
        for msg in lines:
            sock.send((prefix + msg).encode("utf-8", "backslashreplace"))

    return write


def logging_sink(logger: logging.Logger) -> Sink:
    """Through the logging module (slow; for tools and tests that embed the adapter)."""

    def write(lines: Sequence[str]) -> None:
        for msg in lines:
            logger.info("%s", msg)

    return write


def printable(text: str, limit: int) -> str:
    """*text* for a log line: control and undecodable characters escaped, at most *limit* characters kept.

    What an SMTP client sends (an 8-bit AUTH name, a 64 KB recipient) must
    not forge log lines or flood them; the length cut is said in the line.
    """
    if len(text) <= limit and text.isprintable():
        return text
    shown = text[:limit]
    if not shown.isprintable():
        shown = "".join(ch if ch.isprintable() else _escape(ch) for ch in shown)
    if len(text) > limit:
        shown += "...(%d chars)" % len(text)
    return shown


def _escape(ch: str) -> str:
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:        # a byte that was not UTF-8 (surrogateescape)
        return "\\x%02x" % (code - 0xDC00)
    return ch.encode("unicode_escape").decode("ascii")


def _render(fmt: str, args: tuple) -> str:
    try:
        return fmt % args
    except (TypeError, ValueError) as exc:
        return "unformattable log line %r %% %r: %s" % (fmt, args, exc)


class DecisionLog:
    """Queue finished decision lines; a background thread writes them in batches."""

    def __init__(self, sink: Optional[Sink], interval: float = INTERVAL) -> None:
        self.enabled = sink is not None
        self._sink = sink
        self._queue: collections.deque[str] = collections.deque()
        # The hot path's entry: append(line), or None when decisions are not logged.
        self.append: Optional[Callable[[str], None]] = self._queue.append if sink is not None else None
        self._wake = threading.Event()
        self._stopping = False
        self._failed = False
        self._interval = interval
        self._thread: Optional[threading.Thread] = None
        if sink is not None:
            self._thread = threading.Thread(target=self._run, name="decision-log", daemon=True)
            self._thread.start()

    def log(self, fmt: str, *args: object) -> None:
        """Queue the line ``fmt % args`` (an argument that does not fit is shown, not raised)."""
        if self.enabled:
            self._queue.append(_render(fmt, args))

    def flush(self, pause: float = 0.0) -> None:
        """Write everything queued, CHUNK lines at a time.

        With *pause*, the writer sleeps that long between chunks, so a
        milter callback waiting for the GIL waits for one chunk at most.
        """
        queue = self._queue
        popleft = queue.popleft
        while queue:
            batch = [popleft() for _ in range(min(CHUNK, len(queue)))]
            if self._sink is not None:
                try:
                    self._sink(batch)
                    self._failed = False
                except OSError as exc:
                    if not self._failed:
                        log.error("decision log: cannot write %d lines: %s", len(batch), exc)
                        self._failed = True
            if pause and queue:
                time.sleep(pause)

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(self._interval)
            self._wake.clear()
            self.flush(PAUSE)

    def close(self) -> None:
        """Stop the writer after writing everything queued."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)
        self.flush()
