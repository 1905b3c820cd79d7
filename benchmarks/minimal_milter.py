#!/usr/bin/env python3
"""The smallest useful pymilter milter: the baseline for benchmarks/milter_load.py.

    python3 benchmarks/minimal_milter.py --socket unix:/tmp/minimal.sock

It overrides exactly the callbacks relaymilter overrides (connect, envfrom,
envrcpt) and answers CONTINUE to each, so pymilter negotiates the same
protocol steps as relaymilter and the difference between the two in the
load benchmark is relaymilter's own work: address resolution, the
relayers.db lookup, the spammers check and the decision log line. It logs
nothing and keeps no state. It runs in the foreground until killed (the
benchmark stops it by PID); a socket it cannot bind exits 1 with one line
on stderr.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Optional, Sequence

import Milter

PROG = "minimal_milter"


class ContinueMilter(Milter.Base):
    """Continue at connect, MAIL and RCPT; every other step is declined in negotiation."""

    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        return Milter.CONTINUE

    def envfrom(self, mailfrom: str, *esmtp: str) -> int:
        return Milter.CONTINUE

    def envrcpt(self, to: str, *esmtp: str) -> int:
        return Milter.CONTINUE


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="A pymilter milter that continues on everything.")
    p.add_argument("--socket", required=True, metavar="SPEC", help="unix:/path or inet:PORT@127.0.0.1")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    opts = build_parser().parse_args(argv)
    Milter.factory = ContinueMilter
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
