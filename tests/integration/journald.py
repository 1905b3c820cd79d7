"""A real systemd-journald for integration tests.

journald's paths (/run/systemd/journal/{socket,stdout,dev-log}, the runtime
journal under /run/log/journal, /dev/log) belong to the whole machine, so
tests that use them take an exclusive flock on LOCK first (several
checkouts may run the suite at once), and the fixture leaves the machine as
it found it:

- a journald that already answers on /run/systemd/journal/socket (a CI
  host booted with systemd) is used as it is, never stopped;
- otherwise /lib/systemd/systemd-journald is started standalone as a child
  of the test, waited for (bounded), and stopped by its PID afterwards; its
  sockets and runtime journal (/run/systemd/journal, /run/log/journal) are
  removed, so nothing later sees a journald that is gone;
- /dev/log is linked to journald's dev-log socket only when it does not
  exist, and the link is removed afterwards. When /dev/log is someone
  else's (a syslog daemon), ``syslog_ok`` says so and tests that need
  syslog(3) lines in the journal skip with that reason.

Use::

    with Journald() as jd:
        ...   # journalctl reads what was logged meanwhile
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import time
from typing import Optional

from mta import terminate

LOCK = "/run/lock/relaymilter-journald-test.lock"
JOURNALD = "/lib/systemd/systemd-journald"
RUN = "/run/systemd/journal"
SOCKET = RUN + "/socket"
STDOUT = RUN + "/stdout"
DEV_LOG = RUN + "/dev-log"
RUNTIME_JOURNAL = "/run/log/journal"
LOCK_WAIT = 900.0
START_WAIT = 15.0


def answers(path: str) -> bool:
    """Whether a datagram socket at *path* has a listener (a stale socket file refuses)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


class Journald:
    """The machine's journald, or one started for the test; see the module text."""

    def __init__(self) -> None:
        self.proc: Optional[subprocess.Popen] = None
        self._lock = None
        self._dev_log = False
        self.syslog_ok = False
        self.syslog_why = ""

    def __enter__(self) -> "Journald":
        self._lock = open(LOCK, "a")
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    self._lock.close()
                    raise RuntimeError("%s: another journald test held it for %gs" % (LOCK, LOCK_WAIT))
                time.sleep(0.5)
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start(self) -> None:
        if not answers(SOCKET):
            self.proc = subprocess.Popen([JOURNALD], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + START_WAIT
            while not (answers(SOCKET) and os.path.exists(STDOUT) and os.path.exists(DEV_LOG)):
                if self.proc.poll() is not None:
                    raise RuntimeError("systemd-journald exited with %s" % self.proc.returncode)
                if time.monotonic() > deadline:
                    raise RuntimeError("systemd-journald did not create its sockets within %gs" % START_WAIT)
                time.sleep(0.01)
        if not os.path.lexists("/dev/log"):
            os.symlink(DEV_LOG, "/dev/log")
            self._dev_log = True
        if os.path.realpath("/dev/log") == os.path.realpath(DEV_LOG):
            self.syslog_ok = True
        else:
            self.syslog_why = "/dev/log belongs to another syslog daemon here, not to journald"

    def __exit__(self, *exc: object) -> None:
        if self._dev_log:
            try:
                os.unlink("/dev/log")
            except FileNotFoundError:
                pass
            self._dev_log = False
        proc = self.proc
        if proc is not None:
            terminate(proc, signal.SIGTERM, 10)
            self.proc = None
            # What our journald made (or a stopped one left behind: nothing answered before we started).
            for d in (RUN, RUNTIME_JOURNAL):
                shutil.rmtree(d, ignore_errors=True)
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None


def stream_to_journal(identifier: str, unit: str = "") -> int:
    """A connected journald stdout stream (what systemd hands a service as stdout/stderr); its fd.

    journald takes the sender's credentials when the stream connects: call
    this in the process that will write (e.g. a preexec_fn before exec).
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(STDOUT)
    # identifier, unit, priority, level prefix, forward to syslog, kmsg, console (journald-stream.c)
    s.sendall(("%s\n%s\n6\n0\n0\n0\n0\n" % (identifier, unit)).encode())
    s.shutdown(socket.SHUT_RD)
    return s.detach()
