#!/usr/bin/env python3
"""Benchmark relayers.db: add, lookup and expire rates on a 100,000-entry map, and
`vsmtprelay expire` of 100,000 old entries against `makemap hash` building the same
100,000 lines, as a ratio from one run (target: expire <= 1.5x makemap).

    python3 benchmarks/relayers.py [--entries N]

Prints figures; asserts nothing. Needs makemap (sendmail-bin) and vsmtprelay on PATH.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

from relaymilter.store.relayers import BDBRelayStore


def address(i: int) -> str:
    return "10.%d.%d.%d" % (i >> 16, (i >> 8) & 255, i & 255)


def best_of(runs: int, fn) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=100_000)
    n = ap.parse_args().entries
    work = tempfile.mkdtemp(prefix="rm-bench-")
    try:
        path = os.path.join(work, "relayers.db")
        store = BDBRelayStore(path)
        old = int(time.time()) - 86400

        # add: one locked transaction per call, as popwatch batches and vsmtprelay adds
        start = time.perf_counter()
        store.add({address(i): old for i in range(n)})
        bulk = time.perf_counter() - start
        single = 2000
        start = time.perf_counter()
        for i in range(single):
            store.add({"172.16.%d.%d" % (i >> 8, i & 255): old})
        one_by_one = time.perf_counter() - start
        print("add (one transaction of %d):      %10.0f entries/s" % (n, n / bulk))
        print("add (%d separate locked writes): %10.0f adds/s" % (single, single / one_by_one))

        # lookup through the milter's long-lived reader: hits and misses
        reader = BDBRelayStore(path)
        probes = [address(i * 7 % n) for i in range(50_000)] + ["192.0.2.%d" % (i % 250) for i in range(50_000)]
        reader.lookup(probes[0])
        start = time.perf_counter()
        for ip in probes:
            reader.lookup(ip)
        lk = time.perf_counter() - start
        print("lookup (50%% hits, %d probes):   %10.0f lookups/s  (%.1f us each)" % (len(probes), len(probes) / lk, lk / len(probes) * 1e6))

        # expire in-process
        start = time.perf_counter()
        removed = store.expire(int(time.time()))
        ex = time.perf_counter() - start
        print("expire (store, %d entries):       %10.0f entries/s" % (removed, removed / ex))

        # vsmtprelay expire vs makemap hash, same 100,000 lines, one run each
        lines = "".join("%s %d\n" % (address(i), old) for i in range(n)).encode()
        mm_base = os.path.join(work, "mm")

        def run_makemap() -> None:
            if os.path.exists(mm_base + ".db"):
                os.unlink(mm_base + ".db")
            subprocess.run(["makemap", "hash", mm_base], input=lines, check=True)

        src = os.path.join(work, "src.db")
        subprocess.run(["makemap", "hash", os.path.join(work, "src")], input=lines, check=True)
        target = os.path.join(work, "exp.db")

        def run_expire() -> None:
            subprocess.run(["vsmtprelay", "-f", target, "expire"], check=True)

        makemap_t = expire_t = float("inf")
        for _ in range(3):
            makemap_t = min(makemap_t, best_of(1, run_makemap))
            shutil.copyfile(src, target)
            expire_t = min(expire_t, best_of(1, run_expire))
            assert BDBRelayStore(target).entries() == [], "expire left entries"
        print("makemap hash, %d lines:          %8.3f s" % (n, makemap_t))
        print("vsmtprelay expire, %d old:       %8.3f s  (whole command, Python start-up included)" % (n, expire_t))
        print("ratio expire/makemap:                %8.2f   (target <= 1.50)" % (expire_t / makemap_t))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
