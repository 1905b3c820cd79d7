#!/usr/bin/env python3
"""The smallest useful pymilter milter: the baseline for benchmarks/milter_load.py.

    python3 benchmarks/minimal_milter.py --socket unix:/tmp/minimal.sock
    python3 benchmarks/minimal_milter.py --socket unix:/tmp/p.sock --relayers relayers.db --local local.test

It overrides exactly the callbacks relaymilter overrides (connect, envfrom,
envrcpt) and answers CONTINUE to each, so pymilter negotiates the same
protocol steps as relaymilter and the difference between the two in the
load benchmark is relaymilter's own work: address resolution, the
relayers.db lookup, the spammers check and the decision log line. It logs
nothing and keeps no state. It runs in the foreground until killed (the
benchmark stops it by PID); a socket it cannot bind exits 1 with one line
on stderr.

With --relayers and --local it is the minimal *policy* milter of
benchmarks/milter_ceiling.py, the same policy as the C reference milter
(benchmarks/ref_milter.c): a recipient at the local domain continues, any
other only for a client whose address is a key of relayers.db (read once per
transaction under flock(LOCK_SH), reopened when the file changed), else 550
5.7.1 Relaying denied.

With --workers N it forks N processes after opening the socket, all of
them accepting on it (what relaymilter's `workers:` does), each dying with
the first: the same minimal milter across cores.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import os
import sys
import threading
from typing import Any, Optional, Sequence

import Milter
from berkeleydb import db

PROG = "minimal_milter"


class ContinueMilter(Milter.Base):
    """Continue at connect, MAIL and RCPT; every other step is declined in negotiation."""

    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        return Milter.CONTINUE

    def envfrom(self, mailfrom: str, *esmtp: str) -> int:
        return Milter.CONTINUE

    def envrcpt(self, to: str, *esmtp: str) -> int:
        return Milter.CONTINUE


class RelayersMap:
    """relayers.db, one read-only handle, reopened when the file changes (inode, size, mtime)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.handle: Any = None
        self.fd = -1
        self.seen: tuple = ()

    def listed(self, addr: str) -> bool:
        with self.lock:
            st = os.stat(self.path)
            now = (st.st_ino, st.st_size, st.st_mtime_ns)
            if self.handle is None or now != self.seen:
                if self.handle is not None:
                    self.handle.close()
                    os.close(self.fd)
                self.fd = os.open(self.path, os.O_RDONLY)
                self.handle = db.DB()
                self.handle.open(self.path, dbtype=db.DB_HASH, flags=db.DB_RDONLY)
                self.seen = now
            fcntl.flock(self.fd, fcntl.LOCK_SH)
            try:
                return self.handle.get(addr.encode("ascii")) is not None
            finally:
                fcntl.flock(self.fd, fcntl.LOCK_UN)


class PolicyMilter(Milter.Base):
    """Local domain, or a client listed in relayers.db, else 550 (see the module notes)."""

    relayers: RelayersMap
    local = ""

    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        self.addr = hostaddr[0] if hostaddr else ""
        self.listed: Optional[bool] = None
        return Milter.CONTINUE

    def envfrom(self, mailfrom: str, *esmtp: str) -> int:
        self.listed = None
        return Milter.CONTINUE

    def envrcpt(self, to: str, *esmtp: str) -> int:
        domain = to.strip("<>").rpartition("@")[2].rstrip(".").lower()
        if domain == self.local:
            return Milter.CONTINUE
        if self.listed is None:
            self.listed = bool(self.addr) and self.relayers.listed(self.addr)
        if self.listed:
            return Milter.CONTINUE
        self.setreply("550", "5.7.1", "Relaying denied")
        return Milter.REJECT


def fork_after_opensocket(workers: int) -> None:
    """Make runmilter fork *workers* - 1 more processes once the socket is open (children die with the first)."""
    import milter  # pymilter's C module: runmilter calls milter.main() after milter.opensocket()

    serve = milter.main

    def forked_main() -> None:
        for _ in range(workers - 1):
            if os.fork() == 0:
                ctypes.CDLL(None, use_errno=True).prctl(1, 9)    # PR_SET_PDEATHSIG, SIGKILL
                break
        serve()

    milter.main = forked_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="A pymilter milter that continues on everything.")
    p.add_argument("--socket", required=True, metavar="SPEC", help="unix:/path or inet:PORT@127.0.0.1")
    p.add_argument("--relayers", metavar="DB", help="the policy milter: relayers.db to look clients up in")
    p.add_argument("--local", metavar="DOMAIN", help="the policy milter: the local domain")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="processes sharing the socket (default 1)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    opts = build_parser().parse_args(argv)
    Milter.factory = ContinueMilter
    if opts.relayers:
        PolicyMilter.relayers = RelayersMap(opts.relayers)
        PolicyMilter.local = (opts.local or "").lower()
        Milter.factory = PolicyMilter
    if opts.workers > 1:
        fork_after_opensocket(opts.workers)
    # Same exception policy as relaymilter, so neither side gets a cheaper error path.
    Milter.set_exception_policy(Milter.TEMPFAIL)
    try:
        Milter.runmilter(PROG, opts.socket, timeout=600)
    except Exception as exc:  # pymilter raises milter.error, which is not importable by name
        sys.stderr.write("%s: error: cannot serve on %s: %s\n" % (PROG, opts.socket, exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
