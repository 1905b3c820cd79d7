#!/usr/bin/env python3
"""Milter load benchmark: relaymilter on a 100,000-entry relayers.db against a minimal pymilter milter.

    python3 benchmarks/milter_load.py [--concurrency 8] [--seconds 10] [--entries 100000]
                                      [--procs 1] [--rounds 6] [--warmup 3] [--quiet-variant]
                                      [--metrics-variant]
                                      [--writes N]

Method: both milters run as real processes on unix sockets: relaymilter through
tests/integration/milterproc.py (decision log to a file), the baseline
benchmarks/minimal_milter.py (continues on everything; overrides the same callbacks, so
both negotiate the same steps). Generator processes (milter_loadgen.py) keep
--concurrency milter connections busy, each an MTA's short session sent as sendmail
sends it: optneg, macros + connect, mail, three RCPTs, abort + quit, wait for the milter
to close, next session on a new connection. Packets are encoded once
(relaymilter.harness.codec) and every answer is compared byte for byte with the expected
packet: half the clients are in relayers.db (all recipients continue), half are not
(remote recipients get 550 5.7.1 Relaying denied, local ones continue); the minimal
milter must continue on all. One session of each kind first goes through the harness's
MilterSession, an independent check of those expectations. One milter is loaded at a
time, in alternating rounds (A B, B A, A B ...), so that load from other processes hits both
alike. Reading the figures: sessions/s and RCPT/s are completed work over the window;
p50/p99 RCPT is the time from sending SMFIC_RCPT to having its whole reply, as the
generator sees it (so it includes the generator's own delay). CPU columns are user+sys
seconds over the window and, in brackets, average cores busy: the milter's process tree
(/proc/PID/stat), the generator processes (getrusage), and the rest of the machine
(/proc/stat), i.e. other people's work; "per session" is milter CPU / sessions, the
figure least disturbed by others. A note is printed when the generator was near its
limit or the whole machine was CPU-bound; then the rate is the machine's, and the ratio
compares the milters under equal starvation. Targets at 8 concurrent
sessions: relaymilter >= 0.9x the minimal milter's sessions/s, p99 RCPT <= 1 ms. Exit 1
if any answer was wrong or missing (the first ones are printed, the milter logs kept);
missed targets are reported, exit 0. Steady state is what is measured: before the
rounds, each milter gets --warmup seconds of the same traffic, unmeasured, so that
both have met every client and recipient once (relaymilter's per-file-version answer
cache and memo tables are filled; in the minimal milter, which has none, it warms the
interpreter alike). That warm-up is reported on its own line as the cold figures, the
first contact with 2,000 new clients, senders and recipients. The rounds are short
and many (--rounds, default 6) so that load from other tenants of a shared machine
hits both milters alike; the per-round ratios are printed, their spread shows that
noise. --writes N adds relaymilter+writes: the same relaymilter process, in rounds of
its own, while relayers.db is written N times a second (one listed address refreshed
per write, as relaymilter-popwatch does for a login); every write starts the answer
cache afresh, so this is the figure for a busy POP server. After each such round
every relaymilter gets REWARM seconds of unmeasured traffic. Takes about 2 x --warmup +
2.5 x --seconds (add 1 x --seconds for each variant).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from _common import (Figures, Writer, check_with_harness, finish, interleaved, median_round, percentile,
                     run_round)
from milter_loadgen import Script, build_script, db_address, session_kinds
from milterproc import MilterProcess  # a test helper (tests/integration), on sys.path through _common

from relaymilter.store import spammers
from relaymilter.store.relayers import BDBRelayStore

HERE = Path(__file__).resolve().parent
REWARM = 1.0        # unmeasured seconds that bring each relaymilter back to steady state after a --writes round

# ------------------------------------------------------------------ setting up the milters


def wait_listening(sock_path: Path, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("milter_load: error: minimal milter exited with %s" % proc.returncode)
        lines = Path("/proc/net/unix").read_text().splitlines()[1:]
        if any(line.split()[3] == "00010000" and line.endswith(" %s" % sock_path) for line in lines):
            return
        time.sleep(0.01)
    raise SystemExit("milter_load: error: minimal milter did not listen within %gs" % timeout)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="milter_load", description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, default=8, help="concurrent milter sessions (default 8)")
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per milter (default 10)")
    p.add_argument("--entries", type=int, default=100_000, help="relayers.db entries (default 100000)")
    p.add_argument("--procs", type=int, default=1, help="generator processes (default 1; see the notes printed)")
    p.add_argument("--rounds", type=int, default=6, help="alternating rounds per milter (default 6)")
    p.add_argument("--warmup", type=float, default=3.0,
                   help="unmeasured seconds of load per milter before the rounds (default 3; see the notes)")
    p.add_argument("--metrics-variant", action="store_true",
                   help="also run relaymilter with Prometheus metrics on (a free loopback port), to show "
                        "their cost; its endpoint is scraped at the end as a check that it counted")
    p.add_argument("--quiet-variant", action="store_true",
                   help="also run relaymilter with log_level: warning, to show the cost of the decision log")
    p.add_argument("--writes", type=float, default=0.0, metavar="N",
                   help="also run relaymilter while relayers.db is written N times a second, as by a busy "
                        "POP server's relaymilter-popwatch (default 0: not run)")
    return p


def start_milters(work: Path, opts: argparse.Namespace, running: list) -> Dict[str, Tuple[str, int, List[Script]]]:
    """Build the maps, start every milter, check it with the harness; name -> (socket path, pid, scripts)."""
    relayers = str(work / "relayers.db")
    t0 = time.perf_counter()
    BDBRelayStore(relayers).add({db_address(i): int(time.time()) for i in range(opts.entries)})
    (work / "spammers").write_text("".join("spam%d.example\n" % i for i in range(1000)))
    spammers.rebuild(str(work / "spammers"), str(work / "spammers.db"))
    print("relayers.db: %d entries built in %.1f s; spammers.db: 1000 entries" % (opts.entries, time.perf_counter() - t0))
    settings = {"relayers": {"path": relayers},
                "spammers": {"source": str(work / "spammers"), "path": str(work / "spammers.db")}}
    variants: List[Tuple[str, dict]] = [("relaymilter", {})]
    if opts.quiet_variant:
        variants.append(("relaymilter-quiet", {"log_level": "warning"}))
    if opts.metrics_variant:
        variants.append(("relaymilter-metrics", {"metrics": {"listen": "127.0.0.1:0"}}))
    sock = work / "minimal.sock"
    minimal = subprocess.Popen([sys.executable, str(HERE / "minimal_milter.py"), "--socket", "unix:%s" % sock],
                               stdin=subprocess.DEVNULL)
    running.append(minimal)
    wait_listening(sock, minimal)
    targets = [("minimal", str(sock), minimal.pid)]
    for name, extra in variants:
        mp = MilterProcess(work / name, {**settings, **extra})
        running.append(mp)
        mp.start()
        targets.append((name, str(mp.sock_path), mp.pid))
    milters = {}
    for name, path, pid in targets:
        kinds = session_kinds(2000, opts.entries, minimal=name == "minimal")
        neg = check_with_harness("unix:%s" % path, kinds[:2])
        milters[name] = (path, pid, [build_script(k, neg, i) for i, k in enumerate(kinds)])
    if opts.writes > 0:
        # The same relaymilter process, measured in rounds of its own while relayers.db is written.
        milters["relaymilter+writes"] = milters["relaymilter"]
    return milters


def scraped_decisions(log: Path) -> int:
    """relaymilter_decisions_total summed, from the endpoint the milter's log names."""
    from prometheus_client.parser import text_string_to_metric_families

    url = log.read_text().split("metrics on ", 1)[1].split()[0]
    time.sleep(1.5)             # the workers hand their counts over once a second
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    return int(sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                   if s.name == "relaymilter_decisions_total"))


def report(figures: Dict[str, Figures], procs: int) -> None:
    print("%-18s %8s %10s %7s %9s %9s %6s %13s %13s %13s %11s" % (
        "milter", "sessions", "sessions/s", "RCPT/s", "p50 RCPT", "p99 RCPT", "errors",
        "milter CPU", "generator CPU", "other CPU", "milter CPU"))
    print("%-18s %8s %10s %7s %9s %9s %6s %13s %13s %13s %11s" % ("", "", "", "", "", "", "", "s (cores)",
                                                                 "s (cores)", "s (cores)", "per session"))
    for name, f in figures.items():
        lat = sorted(f.latencies)
        def cores(cpu: float, f: Figures = f) -> str:
            return "%5.1f (%.2f)" % (cpu, cpu / f.seconds)

        print("%-18s %8d %10.0f %7.0f %7.3fms %7.3fms %6d %13s %13s %13s %9.0fus" % (
            name, f.sessions, f.sessions / f.seconds, f.rcpts / f.seconds, percentile(lat, 0.50),
            percentile(lat, 0.99), f.errors, cores(f.milter_cpu), cores(f.gen_cpu), cores(f.other_cpu),
            f.milter_cpu / max(1, f.sessions) * 1e6))
    base, rm = figures["minimal"], figures["relaymilter"]
    ratio = (rm.sessions / rm.seconds) / (base.sessions / base.seconds) if base.sessions else float("nan")
    p99 = percentile(sorted(rm.latencies), 0.99)
    ncpu = os.cpu_count() or 1
    for name, f in figures.items():
        busy = f.gen_cpu / (f.seconds * procs)
        if busy > 0.8:
            print("note: %s: the generator processes were busy %.0f%% of the time and may have been the limit; "
                  "try --procs %d" % (name, 100 * busy, procs + 1))
        if f.machine_cpu / f.seconds > 0.9 * ncpu:
            print("note: %s: the machine was CPU-bound (%.2f of %d cores busy): its rate is the machine's limit"
                  % (name, f.machine_cpu / f.seconds, ncpu))
    print("relaymilter/minimal sessions/s: %.2f (target >= 0.90: %s); relaymilter p99 RCPT %.3f ms "
          "(target <= 1 ms: %s)" % (ratio, "met" if ratio >= 0.9 else "MISSED", p99, "met" if p99 <= 1.0 else "MISSED"))


def main(argv: Optional[Sequence[str]] = None) -> int:
    opts = build_parser().parse_args(argv)
    if min(opts.concurrency, opts.procs, opts.rounds, opts.entries) < 1 or opts.seconds <= 0 or opts.warmup < 0:
        sys.stderr.write("milter_load: error: --concurrency, --procs, --rounds, --entries and --seconds "
                         "must be positive, --warmup not negative\n")
        return 2
    opts.procs = min(opts.procs, opts.concurrency)
    work = Path(tempfile.mkdtemp(prefix="rm-load-"))
    running: list = []
    errors: List[str] = []
    try:
        milters = start_milters(work, opts, running)
        figures = {name: Figures() for name in milters}
        order = list(milters)
        print("load: %d concurrent sessions from %d generator processes, %g s per milter in %d rounds, %d CPUs"
              % (opts.concurrency, opts.procs, opts.seconds, opts.rounds, os.cpu_count() or 0))
        cold = {name: Figures() for name in milters}
        writer = Writer(str(work / "relayers.db"), opts.writes, opts.entries) if opts.writes > 0 else None
        if opts.warmup:
            for name in order:
                if name.endswith("+writes"):
                    continue            # the same process as relaymilter, warmed up with it
                path, pid, scripts = milters[name]
                run_round(path, pid, scripts, opts, opts.warmup, cold[name], errors)
        per_round: Dict[str, List[float]] = {name: [] for name in order}
        for _, name in interleaved(order, opts.rounds):
            path, pid, scripts = milters[name]
            one = Figures()
            with writer if name.endswith("+writes") and writer else contextlib.nullcontext():
                run_round(path, pid, scripts, opts, opts.seconds / opts.rounds, one, errors)
            if name.endswith("+writes"):
                # Steady state again for the other rounds: the last write started the answer
                # cache of every relaymilter afresh. Unmeasured, like the warm-up.
                time.sleep(0.2)
                for other in order:
                    if other != "minimal" and not other.endswith("+writes"):
                        run_round(*milters[other], opts, REWARM, Figures(), errors)
            figures[name].add(one)
            per_round[name].append(one.sessions / one.seconds)
        if "relaymilter-metrics" in milters:
            counted = scraped_decisions(work / "relaymilter-metrics" / "milter.log")
    finally:
        for proc in reversed(running):
            if isinstance(proc, MilterProcess):
                proc.stop()
            else:
                proc.kill()
                proc.wait(10)
    report(figures, opts.procs)
    ratios = [a / b for a, b in zip(per_round["relaymilter"], per_round["minimal"])]
    print("relaymilter/minimal per round, in order: %s; median %.2f"
          % (" ".join("%.2f" % x for x in ratios), median_round(ratios)))
    if "relaymilter-metrics" in figures:
        on, off = figures["relaymilter-metrics"], figures["relaymilter"]
        ratios = [a / b for a, b in zip(per_round["relaymilter-metrics"], per_round["relaymilter"])]
        print("metrics on/off sessions/s per round: %s; median %.2f; milter CPU per session %.0f us on, %.0f us off"
              % (" ".join("%.2f" % x for x in ratios), median_round(ratios),
                 on.milter_cpu / max(1, on.sessions) * 1e6, off.milter_cpu / max(1, off.sessions) * 1e6))
        print("relaymilter-metrics: its endpoint counted %d decisions (at least %d were made in the measured rounds)"
              % (counted, 4 * on.sessions))
    if writer is not None:
        w = figures["relaymilter+writes"]
        print("relaymilter+writes: relayers.db written %d times (%.1f/s) during its rounds; %.2fx the minimal "
              "milter's sessions/s" % (writer.writes, writer.writes / w.seconds,
                                       (w.sessions / w.seconds) / (figures["minimal"].sessions / figures["minimal"].seconds)))
    if opts.warmup:
        print("cold (the %g s warm-up, not in the figures above): %s" % (opts.warmup, "; ".join(
            "%s %.0f sessions/s, p99 RCPT %.3f ms" % (name, f.sessions / f.seconds, percentile(sorted(f.latencies), 0.99))
            for name, f in cold.items() if f.seconds)))
    for name in [n for n in order[1:] if not n.endswith("+writes")]:
        print("%s decision log: %d bytes" % (name, (work / name / "milter.log").stat().st_size))
    return finish(sum(f.errors for f in figures.values()) + sum(f.errors for f in cold.values()), errors, work)


if __name__ == "__main__":
    sys.exit(main())
