#!/usr/bin/env python3
"""Milter throughput with relaying limits on against off, Berkeley DB and Redis, in one run.

    python3 benchmarks/limits.py [--concurrency 8] [--seconds 12] [--entries 10000]
                                 [--clients 10000] [--procs 2] [--rounds 12] [--pinned]
                                 [--remote 2]

Method: one map of --entries addresses, in a relayers.db file and in a real
redis-server on loopback (tests/integration/redisproc.py, no persistence), each
listed address with a POP user of its own in the users map beside it (as
relaymilter-popwatch records them: relayers-users.db, or the Redis guard keys).
Four relaymilter processes (the installed command, default workers), identical
but for the store and for
``limits: {recipients_per_hour: 1000000, messages_per_hour: 1000000,
addresses_per_hour: 29}`` - limits that count everything and refuse nothing,
so both variants must give the same answers and the difference is the cost of
naming the identity, checking its suspension and counting: one counter-file
update per relayed recipient (Berkeley DB) or one Lua call (Redis). The "off"
variants still name every relaying session (user=, one users-map lookup per
transaction), as the milter always does. The load is the generator of
benchmarks/milter_loadgen.py, run by benchmarks/_common.py: --clients distinct
clients cycling (more than any cache holds), half of them listed (their two
remote recipients relay: both counted), half not (their remote recipients get
550 5.7.1); with --remote 1 a listed client's second remote recipient is a
local one instead (one relayed recipient per message: on Berkeley DB its
count ahead is then refunded every time). Every answer is checked byte for
byte. Rounds alternate on/off
within each store (A B, B A, ...) so that other load on the machine hits both
alike; the per-round ratios are printed. Besides the milter's CPU per session,
the redis-server's is shown for the Redis variants (a count is a Lua script
there), and "others" is the CPU the rest of the machine used meanwhile, in
cores. Target: limits on >= 0.9x limits off, for each store. Exit 1 if any
answer was wrong or missing; a missed target is reported, exit 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import _common as load  # the shared measuring side (benchmarks/_common.py)
from milter_loadgen import CONTINUE, LOCAL, Kind, build_script, db_address, session_kinds
from milterproc import MilterProcess  # test helpers (tests/integration/), on sys.path through _common
from redisproc import RedisServer

from relaymilter.store.guard import open_guard_store
from relaymilter.store.relayers import open_relay_store

TARGET = 0.9
LIMITS = {"recipients_per_hour": 1_000_000, "messages_per_hour": 1_000_000, "addresses_per_hour": 29}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="limits", description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, default=8, help="concurrent milter sessions (default 8)")
    p.add_argument("--seconds", type=float, default=12.0, help="measured seconds per variant (default 12)")
    p.add_argument("--entries", type=int, default=10_000, help="map entries (default 10000)")
    p.add_argument("--clients", type=int, default=10_000, help="distinct clients, half listed (default 10000)")
    p.add_argument("--procs", type=int, default=2, help="generator processes (default 2)")
    p.add_argument("--rounds", type=int, default=12, help="alternating rounds per variant (default 12)")
    p.add_argument("--pinned", action="store_true", help="every milter with cpu_affinity: auto")
    p.add_argument("--remote", type=int, choices=(1, 2), default=2,
                   help="remote (relayed) recipients of a listed client's session (default 2)")
    return p


def fill(location: str, entries: int) -> None:
    now = int(time.time())
    data = {db_address(i): now for i in range(entries)}
    store = open_relay_store(location)
    guard = open_guard_store(location)
    try:
        store.add(data)
        guard.record_users({ip: "user%d" % i for i, ip in enumerate(data)}, 86400)
    finally:
        guard.close()
        store.close()


def one_relayed(kind: Kind) -> Kind:
    """A listed client's session with its last remote recipient (<friendN@...>) made local (<userN@...>)."""
    last, answer = kind.rcpts[-1]
    if answer != CONTINUE or not last.startswith("<friend"):
        return kind
    return Kind(kind.client, kind.rcpts[:-1] + ((LOCAL % int(last[len("<friend"):last.index("@")]), CONTINUE),))


def main(argv: Optional[Sequence[str]] = None) -> int:
    opts = build_parser().parse_args(argv)
    if min(opts.concurrency, opts.procs, opts.rounds, opts.entries, opts.clients) < 1 or opts.seconds <= 0:
        sys.stderr.write("limits: error: every number must be positive\n")
        return 2
    opts.procs = min(opts.procs, opts.concurrency)
    work = Path(tempfile.mkdtemp(prefix="rm-limits-bench-"))
    running: list = []
    errors: List[str] = []
    figures: Dict[str, load.Figures] = {}
    per_round: Dict[str, List[float]] = {}
    server_cpu: Dict[str, float] = {}
    try:
        server = RedisServer(work / "redis").start()
        running.append(server)
        t0 = time.perf_counter()
        fill(str(work / "relayers.db"), opts.entries)
        fill(server.url(), opts.entries)
        print("map of %d entries with their users: file and Redis filled in %.1f s"
              % (opts.entries, time.perf_counter() - t0))
        kinds = session_kinds(opts.clients, opts.entries, minimal=False)
        if opts.remote == 1:
            kinds = [one_relayed(k) for k in kinds]
        milters = {}
        for store, relayers in (("bdb", {"path": str(work / "relayers.db")}), ("redis", {"url": server.url()})):
            for variant, extra in (("off", {}), ("on", {"limits": LIMITS})):
                name = "%s-%s" % (store, variant)
                pinning = {"cpu_affinity": "auto"} if opts.pinned else {}
                mp = MilterProcess(work / name, {"relayers": relayers, **extra, **pinning})
                running.append(mp)
                spec = mp.start().socket
                neg = load.check_with_harness(spec, kinds[:2])
                milters[name] = (spec[len("unix:"):], mp.pid, [build_script(k, neg, i)
                                                               for i, k in enumerate(kinds)])
        figures = {name: load.Figures() for name in milters}
        per_round = {name: [] for name in milters}
        server_cpu = {name: 0.0 for name in milters}
        print("load: %d concurrent sessions from %d generator processes, %d clients (half listed), %g s per "
              "variant in %d rounds, %d CPUs, load average %.2f before"
              % (opts.concurrency, opts.procs, opts.clients, opts.seconds, opts.rounds, os.cpu_count() or 0,
                 os.getloadavg()[0]))
        for name in milters:           # warm-up, unmeasured: every variant meets its clients once
            load.run_round(*milters[name], opts, 2.0, load.Figures(), errors)
        for r in range(opts.rounds):
            for store in ("bdb", "redis"):
                pair = ["%s-off" % store, "%s-on" % store]
                for name in (pair if r % 2 == 0 else pair[::-1]):
                    one = load.Figures()
                    s0 = load.tree_cpu(server.pid)
                    load.run_round(*milters[name], opts, opts.seconds / opts.rounds, one, errors)
                    server_cpu[name] += load.tree_cpu(server.pid) - s0
                    figures[name].add(one)
                    per_round[name].append(one.sessions / one.seconds)
    finally:
        for proc in reversed(running):
            proc.stop()
    print("%-10s %8s %10s %7s %9s %9s %6s %13s %11s %11s %7s" % (
        "variant", "sessions", "sessions/s", "RCPT/s", "p50 RCPT", "p99 RCPT", "errors", "milter CPU", "CPU/session",
        "redis/sess", "others"))
    for name, f in figures.items():
        lat = sorted(f.latencies)
        redis_cpu = ("%9.0fus" % (server_cpu[name] / max(1, f.sessions) * 1e6)) if name.startswith("redis") else "-"
        print("%-10s %8d %10.0f %7.0f %7.3fms %7.3fms %6d %6.1f (%.2f) %9.0fus %11s %7.2f" % (
            name, f.sessions, f.sessions / f.seconds, f.rcpts / f.seconds, load.percentile(lat, 0.50),
            load.percentile(lat, 0.99), f.errors, f.milter_cpu, f.milter_cpu / f.seconds,
            f.milter_cpu / max(1, f.sessions) * 1e6, redis_cpu,
            max(0.0, f.other_cpu - server_cpu[name]) / max(f.seconds, 1e-9)))
    for store in ("bdb", "redis"):
        on, off = figures["%s-on" % store], figures["%s-off" % store]
        ratio = (on.sessions / on.seconds) / (off.sessions / off.seconds) if off.sessions else float("nan")
        rounds = [a / b for a, b in zip(per_round["%s-on" % store], per_round["%s-off" % store])]
        print("%s: limits on / off sessions/s %.2f (target >= %.2f: %s); per round %s, median %.2f" % (
            store, ratio, TARGET, "met" if ratio >= TARGET else "MISSED", " ".join("%.2f" % x for x in rounds),
            load.median_round(rounds)))
    print("load average after: %.2f" % os.getloadavg()[0])
    return load.finish(sum(f.errors for f in figures.values()), errors, work)


if __name__ == "__main__":
    sys.exit(main())
