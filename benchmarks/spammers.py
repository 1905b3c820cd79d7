#!/usr/bin/env python3
"""Benchmark spammers.db: rebuilding a 100,000-entry list, and sender lookups per second.

    python3 benchmarks/spammers.py [--entries N] [--senders N]

Prints the time of `rebuild()` (read + parse + write + fsync + rename; the
parse is the same normalize_entry the sender check uses), its write part
alone, `makemap hash` building the same keys for comparison, the time a
running SpammersMap takes to pick up a new list, and sender checks per
second through sender_keys + SpammersMap (half listed, half not).
Asserts nothing; runs in well under a minute.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from relaymilter.address.keys import sender_keys
from relaymilter.policy.mail import SENDER_OK, SPAMMER, SenderKeys, mail_plan
from relaymilter.store.spammers import SpammersMap, read_source, rebuild, write_db


def entry(i: int) -> str:
    # two thirds whole addresses, one third domains, as lists tend to be
    return "user%d@host%d.spam%d.example" % (i, i % 977, i % 13) if i % 3 else "host%d.bulk%d.example" % (i, i % 7)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--senders", type=int, default=200_000)
    opts = ap.parse_args()
    n = opts.entries
    with tempfile.TemporaryDirectory(prefix="spammers-bench-") as work:
        src, db = Path(work) / "spammers", Path(work) / "spammers.db"
        src.write_text("".join(entry(i) + "\n" for i in range(n)))

        start = time.perf_counter()
        count = rebuild(str(src), str(db))
        full = time.perf_counter() - start
        keys = read_source(str(src))
        start = time.perf_counter()
        write_db(str(db), keys)
        write = time.perf_counter() - start
        print("rebuild, %d entries:                %8.3f s  (parse %.3f s + write %.3f s)"
              % (count, full, full - write, write))

        if shutil.which("makemap"):
            start = time.perf_counter()
            subprocess.run(["makemap", "hash", str(Path(work) / "mm")], input="".join(k + " REJECT\n" for k in keys),
                           text=True, check=True, stderr=subprocess.DEVNULL)
            print("makemap hash, same %d keys:         %8.3f s  (for comparison; writes in place)"
                  % (n, time.perf_counter() - start))

        smap = SpammersMap(str(db))
        start = time.perf_counter()
        smap.contains("warm.example")
        print("SpammersMap first read:               %8.3f s" % (time.perf_counter() - start))
        write_db(str(db), keys[::-1])      # the same list, a new file
        start = time.perf_counter()
        smap.contains("warm.example")
        print("SpammersMap reload after a rebuild:   %8.3f s" % (time.perf_counter() - start))

        senders = []
        for i in range(opts.senders):
            j = (i * 7919) % n
            if i % 2:
                senders.append("<nobody%d@clean%d.example.org>" % (i, i % 1000))   # a miss: 4 keys
            elif j % 3:
                senders.append("<User%d@Host%d.spam%d.example>" % (j, j % 977, j % 13))   # a listed address
            else:
                senders.append("<someone@mx.host%d.bulk%d.example>" % (j, j % 7))   # a listed parent domain
        start = time.perf_counter()
        hits = sum(smap.lookup(sender_keys(s)) for s in senders)
        elapsed = time.perf_counter() - start
        print("sender lookups (keys + map), %d:  %10.0f /s  (%.1f us each, %d listed)"
              % (len(senders), len(senders) / elapsed, elapsed / len(senders) * 1e6, hits))
        sample = senders[: len(senders) // 4]
        start = time.perf_counter()
        for s in sample:
            plan = mail_plan(s)     # what a MAIL FROM does, without the runtime's memo
            if isinstance(plan, SenderKeys):
                _ = SENDER_OK if smap.members().isdisjoint(plan.keys) else SPAMMER
        elapsed = time.perf_counter() - start
        print("sender check (plan + members), %d: %10.0f /s  (%.1f us each)"
              % (len(sample), len(sample) / elapsed, elapsed / len(sample) * 1e6))
        start = time.perf_counter()
        for _ in range(100_000):
            smap.contains("host3.bulk3.example")
        elapsed = time.perf_counter() - start
        print("SpammersMap.contains alone:         %10.0f /s  (%.2f us each, one stat included)"
              % (100_000 / elapsed, elapsed / 100_000 * 1e6))
        smap.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
