#!/usr/bin/env python3
"""local_recipients benchmark: RCPT rate with a 100,000-entry user list and a 100,000-entry map, against none.

    python3 benchmarks/local_recipients.py [--concurrency 8] [--seconds 12] [--entries 100000]
                                           [--rounds 10] [--warmup 2] [--procs 1]

Method: three relaymilter processes (tests/integration/milterproc.py, decision log to a
file), started from one configuration that differs only in local_recipients:
  none   no local_recipients (every user of a local domain is accepted)
  list   lists: a text file of --entries users (user0 ... userN-1)
  map    maps: a hash map of --entries user@local.test keys built by makemap
Generator processes (benchmarks/milter_loadgen.py, as in milter_load.py) keep --concurrency
milter sessions busy, each what sendmail sends for one short SMTP connection: connect,
mail, three RCPTs: a known user userK@local.test, a remote recipient (relayed for a client
in relayers.db, 550 5.7.1 for a stranger; half the clients each), and an unknown user
ghostK@local.test (550 5.1.1 User unknown for list and map, continue for none). Every
answer is compared byte for byte with the one expected of that variant.
The workload is bigger than any cache of the milter: each round uses fresh users (K is
drawn from a stretch of the --entries users no earlier round or warm-up used), so every
known-user lookup is the map's first for that key since start (its answer cache holds
65,536 answers) and the memo of resolved recipients (4,096) keeps missing too. The files
themselves are in the page cache, as a busy server's would be.
One milter is loaded at a time, in rounds whose order alternates (none list map, map list
none, ...), so that load from other processes hits all alike; the per-round ratios are
printed, their spread shows that noise. Target: list and map each >= 0.95x the
sessions/s of none, measured in the same run. Before the rounds it prints what one
whole read of the list and of the map costs (seconds, and the memory it keeps,
traced in this process): what a milter process pays at start and after every change.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from _common import Figures, check_with_harness, finish, interleaved, median_round, percentile, run_round
from milter_loadgen import CONTINUE, DENIED, Kind, Script, build_script, db_address
from milterproc import MilterProcess  # a test helper (tests/integration/), on sys.path through _common

from relaymilter.harness.reply import OptNeg
from relaymilter.store.localfiles import read_list
from relaymilter.store.recipients import read_map
from relaymilter.store.relayers import BDBRelayStore

UNKNOWN = "550 5.1.1 User unknown"      # relaymilter.replies.USER_UNKNOWN, checked byte for byte
VARIANTS = ("none", "list", "map")
CLIENTS = 10_000                        # relayers.db entries; half the sessions come from one of them
RATE_MAX = 6000                         # sessions/s a round is built for (2 cores: about 4,000 seen)


def kinds(variant: str, first: int, count: int, entries: int) -> List[Kind]:
    """Sessions using users first .. first+count-1 (mod entries)."""
    out = []
    for n in range(first, first + count):
        user = n % entries
        if n % 2 == 0:
            client, remote = db_address(n * 7919 % CLIENTS), CONTINUE
        else:
            client, remote = "172.20.%d.%d" % (n >> 8 & 255, n & 255), DENIED
        ghost = CONTINUE if variant == "none" else UNKNOWN
        out.append(Kind(client, (("<user%d@local.test>" % user, CONTINUE),
                                 ("<friend%d@remote.example>" % n, remote),
                                 ("<ghost%d@local.test>" % user, ghost))))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="local_recipients", description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, default=8, help="concurrent milter sessions (default 8)")
    p.add_argument("--seconds", type=float, default=12.0, help="measured seconds per variant (default 12)")
    p.add_argument("--entries", type=int, default=100_000, help="users in the list and in the map (default 100000)")
    p.add_argument("--rounds", type=int, default=10, help="alternating rounds per variant (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per variant first (default 2)")
    p.add_argument("--procs", type=int, default=1, help="generator processes (default 1)")
    return p


def reading_cost(read: Callable[[str], object], path: str) -> tuple[float, int]:
    """Seconds of one whole read of a source, as the milter reads it, and the bytes its result
    keeps allocated (tracemalloc, on a second read: tracing slows the reading down)."""
    t0 = time.perf_counter()
    read(path)
    seconds = time.perf_counter() - t0
    tracemalloc.start()
    try:
        table = read(path)
        size = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    del table
    return seconds, size


def setup(work: Path, entries: int) -> Dict[str, MilterProcess]:
    t0 = time.perf_counter()
    BDBRelayStore(str(work / "relayers.db")).add({db_address(i): int(time.time()) for i in range(CLIENTS)})
    (work / "users").write_text("".join("user%d\n" % i for i in range(entries)))
    subprocess.run(["makemap", "hash", str(work / "virt")], check=True, timeout=600,
                   input="".join("user%d@local.test user%d\n" % (i, i) for i in range(entries)), text=True)
    print("built relayers.db (%d entries), the list and the map (%d users each) in %.1f s"
          % (CLIENTS, entries, time.perf_counter() - t0))
    for name, read, path in (("list", read_list, work / "users"), ("map", read_map, work / "virt.db")):
        seconds, size = reading_cost(read, str(path))
        print("%s: read whole in %.3f s, %.1f MB of Python objects (what each milter process does at start "
              "and after every change)" % (name, seconds, size / 1e6))
    base = {"relayers": {"path": str(work / "relayers.db")}}
    sections = {"none": {}, "list": {"lists": [str(work / "users")]}, "map": {"maps": [str(work / "virt.db")]}}
    milters = {}
    for name in VARIANTS:
        settings = dict(base)
        if sections[name]:
            settings["local_recipients"] = sections[name]
        milters[name] = MilterProcess(work / name, settings).start()
    return milters


def main(argv: Optional[Sequence[str]] = None) -> int:
    opts = build_parser().parse_args(argv)
    if min(opts.concurrency, opts.procs, opts.rounds, opts.entries) < 1 or opts.seconds <= 0 or opts.warmup < 0:
        sys.stderr.write("local_recipients: error: counts and --seconds must be positive, --warmup not negative\n")
        return 2
    work = Path(tempfile.mkdtemp(prefix="rm-lrbench-"))
    milters: Dict[str, MilterProcess] = {}
    errors: List[str] = []
    figures = {name: Figures() for name in VARIANTS}
    per_round: Dict[str, List[float]] = {name: [] for name in VARIANTS}
    try:
        milters = setup(work, opts.entries)
        negs: Dict[str, OptNeg] = {}
        for name, mp in milters.items():
            negs[name] = check_with_harness("unix:%s" % mp.sock_path, kinds(name, 0, 2, opts.entries))
        # Sessions per round: more than a round uses at up to RATE_MAX sessions/s, so no user repeats
        # within it (a note below says when a round used more).
        per = max(2000, int(RATE_MAX * opts.seconds / opts.rounds))
        stretches = opts.rounds + (1 if opts.warmup else 0)
        if per * stretches > opts.entries:
            print("note: %d rounds of %d sessions reuse users (only %d): later rounds may hit the map's answer cache"
                  % (stretches, per, opts.entries))

        def scripts(name: str, stretch: int) -> List[Script]:
            first = stretch * per
            return [build_script(k, negs[name], first + i) for i, k in enumerate(kinds(name, first, per, opts.entries))]

        print("load: %d concurrent sessions, %g s per variant in %d rounds, %d sessions built per round, %d CPUs"
              % (opts.concurrency, opts.seconds, opts.rounds, per, os.cpu_count() or 0))
        if opts.warmup:
            for name, mp in milters.items():
                run_round(str(mp.sock_path), mp.pid, scripts(name, opts.rounds), opts, opts.warmup, Figures(), errors)
        for r, name in interleaved(VARIANTS, opts.rounds):
            mp = milters[name]
            one = Figures()
            run_round(str(mp.sock_path), mp.pid, scripts(name, r), opts, opts.seconds / opts.rounds, one, errors)
            figures[name].add(one)
            per_round[name].append(one.sessions / one.seconds)
            if one.sessions > per:
                print("note: round %d, %s: %d sessions > %d built: users repeated within the round"
                      % (r, name, one.sessions, per))
    finally:
        for mp in milters.values():
            mp.stop()
    report(figures, per_round)
    return finish(sum(f.errors for f in figures.values()), errors, work)


def report(figures: Dict[str, Figures], per_round: Dict[str, List[float]]) -> None:
    print("%-6s %8s %10s %8s %9s %9s %6s %12s %10s" % ("", "sessions", "sessions/s", "RCPT/s", "p50 RCPT",
                                                      "p99 RCPT", "errors", "milter CPU", "other CPU"))
    print("%-6s %8s %10s %8s %9s %9s %6s %12s %10s" % ("", "", "", "", "", "", "", "per session", "cores"))
    for name, f in figures.items():
        lat = sorted(f.latencies)
        print("%-6s %8d %10.0f %8.0f %7.3fms %7.3fms %6d %10.0fus %10.2f" % (
            name, f.sessions, f.sessions / f.seconds, f.rcpts / f.seconds, percentile(lat, 0.5),
            percentile(lat, 0.99), f.errors, f.milter_cpu / max(1, f.sessions) * 1e6, f.other_cpu / f.seconds))
    base = figures["none"]
    for name in ("list", "map"):
        f = figures[name]
        overall = (f.sessions / f.seconds) / (base.sessions / base.seconds) if base.sessions else float("nan")
        rounds = [a / b for a, b in zip(per_round[name], per_round["none"])]
        median = median_round(rounds)
        cpu = (base.milter_cpu / max(1, base.sessions)) / (f.milter_cpu / max(1, f.sessions)) if f.sessions else 0.0
        print("%s/none sessions/s: median of the rounds %.2f (target >= 0.95: %s); per round, in order: %s; "
              "whole run %.2f; by milter CPU per session %.2f" % (
                  name, median, "met" if median >= 0.95 else "MISSED", " ".join("%.2f" % x for x in rounds),
                  overall, cpu))
    print("(other CPU: the rest of the machine, in cores busy over the window: other people's work)")


if __name__ == "__main__":
    sys.exit(main())
