#!/usr/bin/env python3
"""Milter throughput with the Redis relayers store against the Berkeley DB store, in one run.

    python3 benchmarks/redis_store.py [--concurrency 8] [--seconds 8] [--entries 100000]
                                      [--procs 2] [--rounds 2]

Method: the same map (--entries addresses) is loaded into a relayers.db file and
into a real redis-server on loopback (tests/integration/redisproc.py, no
persistence); two relaymilter processes run, identical but for
``relayers: {path: ...}`` and ``relayers: {url: redis://...}``. The load is
the generator of benchmarks/milter_loadgen.py, run by benchmarks/_common.py:
forked processes keep --concurrency milter sessions busy, each a full MTA
session (connect, helo, mail, three RCPTs, abort, quit) whose every answer is
checked byte for byte; half the clients are in the map, half are not (their
remote recipients get 550 5.7.1). One session per kind first goes through the
harness's MilterSession as an independent check. The milters take turns in --rounds alternating rounds (A B B A ...) so that
other load on the machine hits both alike. Figures: sessions/s and RCPT/s over the
measured window, p50/p99 of the time from sending RCPT to having its reply, CPU
seconds (and average cores) of the milter's process tree, of redis-server and of
the generators. Target: the Redis store >= 0.8x the Berkeley DB store's
sessions/s. Exit 1 if any answer was wrong or missing; a missed target is
reported, exit 0. Takes about --seconds x 2 plus ten seconds of setup.
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
from milter_loadgen import build_script, db_address, session_kinds
from milterproc import MilterProcess  # test helpers (tests/integration/), on sys.path through _common
from redisproc import RedisServer

from relaymilter.store.relayers import BDBRelayStore, open_relay_store

TARGET = 0.8


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="redis_store", description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, default=8, help="concurrent milter sessions (default 8)")
    p.add_argument("--seconds", type=float, default=8.0, help="measured seconds per store (default 8)")
    p.add_argument("--entries", type=int, default=100_000, help="map entries (default 100000)")
    p.add_argument("--procs", type=int, default=2, help="generator processes (default 2)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per store (default 2)")
    return p


def fill_maps(work: Path, url: str, entries: int) -> None:
    now = int(time.time())
    data = {db_address(i): now for i in range(entries)}
    t0 = time.perf_counter()
    BDBRelayStore(str(work / "relayers.db")).add(data)
    t1 = time.perf_counter()
    store = open_relay_store(url)
    try:
        store.add(data)
    finally:
        store.close()
    t2 = time.perf_counter()
    print("map of %d entries: relayers.db built in %.1f s, Redis loaded in %.1f s" % (entries, t1 - t0, t2 - t1))


def report(figures: Dict[str, "load.Figures"], redis_cpu: float) -> None:
    print("%-12s %8s %10s %7s %9s %9s %6s %13s %13s" % (
        "store", "sessions", "sessions/s", "RCPT/s", "p50 RCPT", "p99 RCPT", "errors", "milter CPU", "generator CPU"))
    for name, f in figures.items():
        lat = sorted(f.latencies)
        print("%-12s %8d %10.0f %7.0f %7.3fms %7.3fms %6d %6.1f (%.2f) %6.1f (%.2f)" % (
            name, f.sessions, f.sessions / f.seconds, f.rcpts / f.seconds, load.percentile(lat, 0.50),
            load.percentile(lat, 0.99), f.errors, f.milter_cpu, f.milter_cpu / f.seconds, f.gen_cpu,
            f.gen_cpu / f.seconds))
    rd = figures["redis"]
    print("redis-server CPU during the Redis rounds: %.1f s (%.2f cores)" % (redis_cpu, redis_cpu / rd.seconds))
    bdb = figures["berkeley-db"]
    ratio = (rd.sessions / rd.seconds) / (bdb.sessions / bdb.seconds) if bdb.sessions else float("nan")
    print("redis/berkeley-db sessions/s: %.2f (target >= %.2f: %s); p99 RCPT %.3f ms vs %.3f ms" % (
        ratio, TARGET, "met" if ratio >= TARGET else "MISSED", load.percentile(sorted(rd.latencies), 0.99),
        load.percentile(sorted(bdb.latencies), 0.99)))


def main(argv: Optional[Sequence[str]] = None) -> int:
    opts = build_parser().parse_args(argv)
    if min(opts.concurrency, opts.procs, opts.rounds, opts.entries) < 1 or opts.seconds <= 0:
        sys.stderr.write("redis_store: error: --concurrency, --procs, --rounds, --entries and --seconds "
                         "must be positive\n")
        return 2
    opts.procs = min(opts.procs, opts.concurrency)
    work = Path(tempfile.mkdtemp(prefix="rm-redis-bench-"))
    running: list = []
    errors: List[str] = []
    redis_cpu = 0.0
    try:
        server = RedisServer(work / "redis").start()
        running.append(server)
        fill_maps(work, server.url(), opts.entries)
        milters = {}
        kinds = session_kinds(2000, opts.entries, minimal=False)
        for name, relayers in (("berkeley-db", {"path": str(work / "relayers.db")}),
                               ("redis", {"url": server.url()})):
            mp = MilterProcess(work / name, {"relayers": relayers, "log_level": "info"})
            running.append(mp)
            spec = mp.start().socket
            neg = load.check_with_harness(spec, kinds[:2])
            milters[name] = (spec[len("unix:"):], mp.pid, [build_script(k, neg, i) for i, k in enumerate(kinds)])
        figures = {name: load.Figures() for name in milters}
        order = list(milters)
        print("load: %d concurrent sessions from %d generator processes, %g s per store in %d rounds, %d CPUs"
              % (opts.concurrency, opts.procs, opts.seconds, opts.rounds, os.cpu_count() or 0))
        for _, name in load.interleaved(order, opts.rounds):
            path, pid, scripts = milters[name]
            before = load.tree_cpu(server.pid)
            load.run_round(path, pid, scripts, opts, opts.seconds / opts.rounds, figures[name], errors)
            if name == "redis":
                redis_cpu += load.tree_cpu(server.pid) - before
    finally:
        for proc in reversed(running):
            proc.stop()
    report(figures, redis_cpu)
    return load.finish(sum(f.errors for f in figures.values()), errors, work)


if __name__ == "__main__":
    sys.exit(main())
