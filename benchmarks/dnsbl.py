#!/usr/bin/env python3
"""DNS blocklist benchmark: relaymilter with a dnsbl section against relaymilter without one.

    python3 benchmarks/dnsbl.py [--concurrency 8] [--seconds 12] [--rounds 6] [--warmup 4] [--procs 1]
                                [--workers 1]

Two workloads, each measured in alternating rounds (A B, B A, ...) in ONE run, so
that load from other processes hits both variants alike; the per-round ratios show
that noise. Both relaymilters are real processes (tests/integration/milterproc.py);
the DNS server is tests/dnsserver.py on 127.0.0.1 (dnslib, in this process: it is idle
while the forked generator processes of benchmarks/milter_loadgen.py send the load).
The dnsbl variant asks two lists (bl.test, second.test), timeout 2 s. Both run
--workers libmilter worker processes (default 1).

1. cached: 2,000 stranger clients (172.21.0.0/16, listed nowhere), each session
   connect, MAIL, three local RCPTs (all must continue). Before the rounds every
   client has been looked up once (--warmup), so the dnsbl variant answers from its
   cache (negative answers kept for the zone's SOA minimum, set to an hour here);
   the DNS queries made during the rounds are counted and printed (should be 0).
   Figure: dnsbl sessions/s / no-dnsbl sessions/s; target >= 0.9.
2. uncached: every session a client never seen before (10.128.0.0/9), one local
   RCPT, so each dnsbl session asks both lists (A queries; nobody is listed).
   Figure: the RCPT round trip p50/p99 of each variant and the difference, the
   latency a stranger's first recipient gains; DNS queries per session printed.

Every answer is compared byte for byte (a wrong one is an error, exit 1). Timings
on a shared machine are noisy: read the ratio and the added latency, and the CPU
columns (milter, generator, the rest of the machine).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from _common import Figures, check_with_harness, finish, interleaved, median_round, percentile, run_round
from dnsserver import DnsServer, standard_zones  # test helpers (tests/, tests/integration/), on sys.path
from milter_loadgen import CONTINUE, LOCAL, Kind, build_script  # through _common
from milterproc import MilterProcess

SITES = ["bl.test", "second.test"]


def cached_kinds() -> List[Kind]:
    return [Kind("172.21.%d.%d" % (i >> 8, i & 255), tuple((LOCAL % (3 * i + j), CONTINUE) for j in range(3)))
            for i in range(2000)]


def fresh_kinds(start: int, count: int) -> List[Kind]:
    out = []
    for i in range(start, start + count):
        out.append(Kind("10.%d.%d.%d" % (128 + (i >> 16 & 127), i >> 8 & 255, i & 255), ((LOCAL % i, CONTINUE),)))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dnsbl", description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, default=8, help="concurrent milter sessions (default 8)")
    p.add_argument("--seconds", type=float, default=12.0, help="measured seconds per variant and workload (default 12)")
    p.add_argument("--rounds", type=int, default=6, help="alternating rounds per variant (default 6)")
    p.add_argument("--warmup", type=float, default=4.0, help="unmeasured seconds per variant first (default 4)")
    p.add_argument("--procs", type=int, default=1, help="generator processes (default 1)")
    p.add_argument("--workers", type=int, default=1,
                   help="milter worker processes, both variants (default 1: each worker keeps its own answers, "
                        "so with more the warm-up would have to reach every one)")
    p.add_argument("--fresh", type=int, default=40000,
                   help="new clients prepared per uncached round (default 40000; must exceed its sessions)")
    return p


def line(name: str, f: Figures) -> str:
    lat = sorted(f.latencies)
    return "%-16s %8d %10.0f %9.3fms %9.3fms %6d %6.2f cores %6.2f cores %6.2f cores" % (
        name, f.sessions, f.sessions / f.seconds, percentile(lat, 0.5), percentile(lat, 0.99), f.errors,
        f.milter_cpu / f.seconds, f.gen_cpu / f.seconds, f.other_cpu / f.seconds)


HEAD = "%-16s %8s %10s %11s %11s %6s %12s %12s %12s" % ("variant", "sessions", "sessions/s", "p50 RCPT", "p99 RCPT",
                                                         "errors", "milter CPU", "generator", "rest of box")


def main(argv: Optional[Sequence[str]] = None) -> int:
    opts = build_parser().parse_args(argv)
    opts.procs = min(opts.procs, opts.concurrency)
    work = Path(tempfile.mkdtemp(prefix="rm-dnsbl-bench-"))
    zones = standard_zones()
    for z in zones:
        z.negative_ttl = 3600
    dns = DnsServer(zones).start()
    base = {"local_domains": ["local.test"], "trusted_networks": ["127.0.0.1/32"], "workers": opts.workers}
    with_lists = {**base, "dnsbl": {"sites": SITES, "nameservers": [dns.nameserver], "timeout": 2.0}}
    milters: Dict[str, MilterProcess] = {}
    errors: List[str] = []
    cached: Dict[str, Figures] = {}
    uncached: Dict[str, Figures] = {}
    try:
        for name, settings in (("no-dnsbl", base), ("dnsbl", with_lists)):
            milters[name] = MilterProcess(work / name, settings).start()
        neg = {name: check_with_harness("unix:%s" % m.sock_path, cached_kinds()[:1]) for name, m in milters.items()}
        print("load: %d concurrent sessions, %d generator process(es), %d CPUs; %g s per variant and workload in "
              "%d rounds; DNS server tests/dnsserver.py on %s" % (opts.concurrency, opts.procs, os.cpu_count() or 0,
                                                                 opts.seconds, opts.rounds, dns.nameserver))

        # 1. cached
        kinds = cached_kinds()
        scripts = {name: [build_script(k, neg[name], i) for i, k in enumerate(kinds)] for name in milters}
        for name, m in milters.items():
            run_round(str(m.sock_path), m.pid, scripts[name], opts, opts.warmup, Figures(), errors)
        m = milters["dnsbl"]
        for _ in range(30):         # until every client has been looked up (bounded)
            if len({n for n, _ in dns.queries() if n.endswith(".21.172.bl.test")}) >= len(kinds):
                break
            run_round(str(m.sock_path), m.pid, scripts["dnsbl"], opts, 2.0, Figures(), errors)
        asked_before = len(dns.queries())
        cached = {name: Figures() for name in milters}
        per_round: Dict[str, List[float]] = {name: [] for name in milters}
        order = list(milters)
        for _, name in interleaved(order, opts.rounds):
            one = Figures()
            m = milters[name]
            run_round(str(m.sock_path), m.pid, scripts[name], opts, opts.seconds / opts.rounds, one, errors)
            cached[name].add(one)
            per_round[name].append(one.sessions / one.seconds)
        queries_cached = len(dns.queries()) - asked_before
        print("\n1. cached: 2,000 strangers, 3 local RCPTs a session, every client looked up before the rounds")
        print(HEAD)
        for name, f in cached.items():
            print(line(name, f))
        a, b = cached["no-dnsbl"], cached["dnsbl"]
        ratio = (b.sessions / b.seconds) / (a.sessions / a.seconds)
        ratios = sorted(x / y for x, y in zip(per_round["dnsbl"], per_round["no-dnsbl"]))
        print("dnsbl/no-dnsbl sessions/s: %.2f (target >= 0.90: %s); per round: %s (median %.2f); DNS queries "
              "during the rounds: %d" % (ratio, "met" if ratio >= 0.9 else "MISSED",
                                         " ".join("%.2f" % x for x in ratios), median_round(ratios),
                                         queries_cached))

        # 2. uncached
        uncached = {name: Figures() for name in milters}
        offset = 0
        fresh_queries = 0
        for _, name in interleaved(order, opts.rounds):
            batch = fresh_kinds(offset, opts.fresh)
            offset += opts.fresh
            m = milters[name]
            before = len(dns.queries())
            one = Figures()
            run_round(str(m.sock_path), m.pid, [build_script(k, neg[name], i) for i, k in enumerate(batch)],
                      opts, opts.seconds / opts.rounds, one, errors)
            if one.sessions >= opts.fresh:
                print("note: an uncached round ran %d sessions, more than its %d new clients: raise --fresh"
                      % (one.sessions, opts.fresh))
            if name == "dnsbl":
                fresh_queries += len(dns.queries()) - before
            uncached[name].add(one)
        print("\n2. uncached: every session a new stranger, 1 local RCPT, %d lists asked at once" % len(SITES))
        print(HEAD)
        for name, f in uncached.items():
            print(line(name, f))
        a, b = uncached["no-dnsbl"], uncached["dnsbl"]
        la, lb = sorted(a.latencies), sorted(b.latencies)
        print("added RCPT latency (dnsbl - no-dnsbl): p50 %.3f ms, p99 %.3f ms; DNS queries per dnsbl session: %.2f"
              % (percentile(lb, 0.5) - percentile(la, 0.5), percentile(lb, 0.99) - percentile(la, 0.99),
                 fresh_queries / max(1, b.sessions)))
    finally:
        for m in milters.values():
            m.stop()
        dns.stop()
    return finish(sum(f.errors for f in cached.values()) + sum(f.errors for f in uncached.values()), errors, work)


if __name__ == "__main__":
    sys.exit(main())
