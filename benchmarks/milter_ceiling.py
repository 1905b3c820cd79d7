#!/usr/bin/env python3
"""relaymilter against the ceiling: a C libmilter + libdb milter with the same policy, in one run.

    python3 benchmarks/milter_ceiling.py [--clients 10000] [--entries 100000] [--concurrency 8,16]
                                         [--seconds 6] [--rounds 6] [--warmup 2] [--writes 2]
                                         [--procs 1] [--caches] [--only NAME,...]

Prints the figures the relaymilter README quotes for the milter, at each --concurrency:
sessions/s of each milter as the median of its rounds with their spread (min-max), the
same as a multiple of the C reference's *in the same round* (median and spread), RCPT
p99 and milter CPU per session; then relaymilter (workers=auto) against the C
reference while relayers.db is written --writes times a second. Ends with the targets
met or missed. Exit 1 if any answer was wrong.

The milters, each a real process on its own unix socket, loaded one at a time in
interleaved rounds (the order rotates every round, so load from other tenants of a
shared machine hits all alike):

  C reference          benchmarks/ref_milter.c, built here with cc -lmilter -ldb: a
                       recipient at local.test continues, any other only for a client
                       listed in relayers.db (read once per transaction under
                       flock(LOCK_SH), reopened when the file changes), else 550
  minimal pymilter     benchmarks/minimal_milter.py --relayers: the same policy in the
                       fewest lines of pymilter, one process
  minimal pymilter w=auto  the same, one process per CPU sharing the socket (--workers):
                       the same lever as relaymilter's workers, without their work
  relaymilter w=1      the installed relaymilter, workers: 1
  relaymilter w=auto   the installed relaymilter, workers: auto (one per CPU)
  relaymilter pinned   the same with cpu_affinity: auto (worker i on CPU i)

Workload: relayers.db with --entries entries; --clients client addresses, every other
one listed in it, each session from the next client in turn (so the population is
bigger than any memo table of relaymilter's: every session meets a client, sender and
recipients it has not seen for --clients sessions); each session is what sendmail sends
for one short SMTP connection: optneg, connect, MAIL, three RCPT (one local, two
remote), abort, quit, then a new connection. Answers are checked byte for byte: a
listed client's recipients continue, an unlisted client's remote ones get 550 5.7.1.
The generator (benchmarks/milter_loadgen.py, --procs processes) runs on the same
machine and its CPU is reported; on a 2-core machine it competes with the milters.

--caches adds relaymilter (workers=auto) with each of its caches switched off in turn,
and with all of them off (benchmarks/relaymilter_variant.py), to show what each is worth
(the table in relaymilter/runtime.py's header). --only keeps the named milters.
Takes about (milters x concurrencies x (--seconds + --warmup)) + 2 x --seconds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from _common import Figures, Writer, check_with_harness, finish, percentile, run_round
from milter_loadgen import build_script, db_address, session_kinds
from milterproc import MilterProcess, children, unix_listening  # a test helper, on sys.path through _common

from relaymilter.store.relayers import BDBRelayStore

HERE = Path(__file__).resolve().parent
LOCAL_DOMAIN = "local.test"


@dataclass
class Milter:
    name: str
    sock: str
    pid: int
    scripts: list = field(default_factory=list)


def build_reference(work: Path) -> Path:
    exe = work / "ref_milter"
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SystemExit("milter_ceiling: error: no C compiler (apt-get install gcc libmilter-dev libdb-dev)")
    proc = subprocess.run([cc, "-O2", "-o", str(exe), str(HERE / "ref_milter.c"), "-lmilter", "-ldb", "-lpthread"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit("milter_ceiling: error: cannot build ref_milter.c (libmilter-dev and libdb-dev "
                         "installed?):\n%s" % proc.stderr)
    return exe


def start_process(argv: Sequence[str], sock: Path, running: list, log: Optional[Path] = None) -> int:
    out = open(log, "ab") if log is not None else None
    proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT if out else None)
    running.append(proc)
    deadline = time.monotonic() + 15
    while not unix_listening(str(sock)):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("milter_ceiling: error: %s did not start listening" % argv[0])
        time.sleep(0.01)
    return proc.pid


def start_milters(work: Path, opts: argparse.Namespace, running: list) -> List[Milter]:
    relayers = str(work / "relayers.db")
    t0 = time.perf_counter()
    BDBRelayStore(relayers).add({db_address(i): int(time.time()) for i in range(opts.entries)})
    print("relayers.db: %d entries built in %.1f s" % (opts.entries, time.perf_counter() - t0))
    milters = []
    sock = work / "ref.sock"
    pid = start_process([str(build_reference(work)), "unix:%s" % sock, relayers, LOCAL_DOMAIN], sock, running)
    milters.append(Milter("C reference", str(sock), pid))
    sock = work / "minimal.sock"
    pid = start_process([sys.executable, str(HERE / "minimal_milter.py"), "--socket", "unix:%s" % sock,
                         "--relayers", relayers, "--local", LOCAL_DOMAIN], sock, running)
    milters.append(Milter("minimal pymilter", str(sock), pid))
    sock = work / "minimal2.sock"
    pid = start_process([sys.executable, str(HERE / "minimal_milter.py"), "--socket", "unix:%s" % sock,
                         "--relayers", relayers, "--local", LOCAL_DOMAIN, "--workers", str(os.cpu_count() or 1)],
                        sock, running)
    milters.append(Milter("minimal pymilter w=auto", str(sock), pid))
    settings = {"relayers": {"path": relayers},
                "spammers": {"source": str(work / "spammers"), "path": str(work / "spammers.db")}}
    variants = [("relaymilter w=1", 1, ""), ("relaymilter w=auto", "auto", ""), ("relaymilter pinned", "pinned", "")]
    if opts.caches:
        variants += [("w=auto -%s" % off, "auto", off) for off in ("rcpt", "answers")]
        variants.append(("w=auto -all caches", "auto", "rcpt,answers"))
    for name, workers, off in variants:
        pinning = {"workers": "auto", "cpu_affinity": "auto"} if workers == "pinned" else {"workers": workers}
        mp = MilterProcess(work / name.replace(" ", "_").replace("=", ""), {**settings, **pinning})
        sock = mp.sock_path
        pid = start_process([sys.executable, str(HERE / "relaymilter_variant.py"), "--off", off, "--",
                             "-c", str(mp.config_path), "--socket", "unix:%s" % sock, "--log", "stderr"],
                            sock, running, log=mp.log_path)
        milters.append(Milter(name, str(sock), pid))
    if opts.only:
        keep = set(opts.only.split(",")) | {"C reference"}
        milters = [m for m in milters if m.name in keep]
    kinds = session_kinds(opts.clients, opts.entries, minimal=False)
    for m in milters:
        neg = check_with_harness("unix:%s" % m.sock, kinds[:2])
        m.scripts = [build_script(k, neg, i) for i, k in enumerate(kinds)]
    return milters


def spread(values: Sequence[float], fmt: str = "%.2f") -> str:
    return (fmt + " (" + fmt + "-" + fmt + ")") % (statistics.median(values), min(values), max(values))


def measure(milters: List[Milter], opts: argparse.Namespace, concurrency: int, errors: List[str],
            writer: Optional[Writer] = None) -> Dict[str, tuple]:
    """Interleaved rounds at *concurrency*; name -> (per-round sessions/s, per-round ratio to the C ref, Figures)."""
    load = argparse.Namespace(concurrency=concurrency, procs=min(opts.procs, concurrency))
    if opts.warmup and writer is None:
        for m in milters:
            run_round(m.sock, m.pid, m.scripts, load, opts.warmup, Figures(), errors)
    rates: Dict[str, List[float]] = {m.name: [] for m in milters}
    figures = {m.name: Figures() for m in milters}
    for r in range(opts.rounds):
        order = milters[r % len(milters):] + milters[:r % len(milters)]
        if r % 2:
            order.reverse()
        for m in order:
            one = Figures()
            if writer is not None:
                with writer:
                    run_round(m.sock, m.pid, m.scripts, load, opts.seconds / opts.rounds, one, errors)
            else:
                run_round(m.sock, m.pid, m.scripts, load, opts.seconds / opts.rounds, one, errors)
            figures[m.name].add(one)
            rates[m.name].append(one.sessions / one.seconds)
    ref = rates["C reference"]
    return {name: (rates[name], [a / b for a, b in zip(rates[name], ref)], figures[name]) for name in rates}


def report(title: str, results: Dict[str, tuple]) -> None:
    print("\n%s" % title)
    print("%-20s %22s %20s %10s %10s %12s %10s" % ("milter", "sessions/s med (range)", "x C ref med (range)",
                                                   "p50 RCPT", "p99 RCPT", "CPU/session", "gen cores"))
    for name, (rates, ratios, f) in results.items():
        lat = sorted(f.latencies)
        print("%-20s %22s %20s %8.3fms %8.3fms %10.0fus %10.2f" % (
            name, spread(rates, "%.0f"), spread(ratios), percentile(lat, 0.5), percentile(lat, 0.99),
            f.milter_cpu / max(1, f.sessions) * 1e6, f.gen_cpu / f.seconds))
    other = [f.other_cpu / f.seconds for _, _, f in results.values()]
    print("other processes on the machine meanwhile: %.2f cores busy on average (max %.2f of %d)"
          % (statistics.mean(other), max(other), os.cpu_count() or 0))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="milter_ceiling", description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=10_000, help="client addresses, half listed (default 10000)")
    p.add_argument("--entries", type=int, default=100_000, help="relayers.db entries (default 100000)")
    p.add_argument("--concurrency", default="8,16", help="concurrent sessions, comma-separated (default 8,16)")
    p.add_argument("--seconds", type=float, default=6.0, help="measured seconds per milter and concurrency")
    p.add_argument("--rounds", type=int, default=6, help="interleaved rounds (default 6)")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per milter first (default 2)")
    p.add_argument("--writes", type=float, default=2.0, help="relayers.db writes a second in the last run (0: skip)")
    p.add_argument("--procs", type=int, default=1, help="generator processes (default 1)")
    p.add_argument("--caches", action="store_true", help="also run relaymilter with each cache off, and all off")
    p.add_argument("--only", metavar="NAMES", help="only these milters (comma-separated names), and the C reference")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    opts = build_parser().parse_args(argv)
    try:
        levels = [int(c) for c in opts.concurrency.split(",")]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1 or opts.clients < 2 or opts.entries < opts.clients or opts.rounds < 1:
        sys.stderr.write("milter_ceiling: error: bad --concurrency, --clients, --entries or --rounds\n")
        return 2
    work = Path(tempfile.mkdtemp(prefix="rm-ceiling-"))
    running: list = []
    errors: List[str] = []
    results: Dict[int, Dict[str, tuple]] = {}
    try:
        milters = start_milters(work, opts, running)
        print("workload: %d clients (half listed), 3 RCPT a session, %d-entry relayers.db; %d CPUs; load average "
              "at start %.2f" % (opts.clients, opts.entries, os.cpu_count() or 0, os.getloadavg()[0]))
        for c in levels:
            results[c] = measure(milters, opts, c, errors)
            report("C=%d, %g s per milter in %d interleaved rounds" % (c, opts.seconds, opts.rounds), results[c])
        written = None
        if opts.writes > 0:
            pair = [m for m in milters if m.name in ("C reference", "relaymilter w=auto", "relaymilter pinned")]
            writer = Writer(str(work / "relayers.db"), opts.writes, opts.entries)
            written = measure(pair, opts, levels[0], errors, writer)
            report("C=%d while relayers.db is written %g times a second" % (levels[0], opts.writes),
                   written)
    finally:
        for proc in reversed(running):
            stop(proc)
    print("\ntargets (workers=auto; the machine's load shows in 'other processes' above):")
    for c, res in results.items():
        for name in ("relaymilter w=auto", "relaymilter pinned"):
            if name not in res or "minimal pymilter" not in res:
                continue
            ratio = statistics.median(res[name][1])
            print("  C=%d: %s %.2fx the C reference (target >= 0.75: %s)" % (c, name, ratio, _met(ratio >= 0.75)))
            gain = statistics.median(res[name][0]) / statistics.median(res["minimal pymilter"][0])
            print("  C=%d: %s %.2fx the single-process minimal pymilter milter (target >= 1.5: %s)"
                  % (c, name, gain, _met(gain >= 1.5)))
            if "minimal pymilter w=auto" in res:
                near = statistics.median(res[name][0]) / statistics.median(res["minimal pymilter w=auto"][0])
                print("  C=%d: %s %.2fx the minimal pymilter milter forked once per CPU" % (c, name, near))
        if "minimal pymilter w=auto" in res:
            print("  C=%d: the minimal pymilter milter forked once per CPU: %.2fx the C reference, %.2fx its single "
                  "process (the same lever, without relaymilter's work)"
                  % (c, statistics.median(res["minimal pymilter w=auto"][1]),
                     statistics.median(res["minimal pymilter w=auto"][0]) / statistics.median(res["minimal pymilter"][0])))
    for name in ("relaymilter w=auto", "relaymilter pinned"):
        if 8 in results and name in results[8]:
            p99 = percentile(sorted(results[8][name][2].latencies), 0.99)
            print("  C=8: %s RCPT p99 %.3f ms (target <= 1 ms: %s)" % (name, p99, _met(p99 <= 1.0)))
    for name in ("relaymilter w=auto", "relaymilter pinned"):
        if written is not None and name in written:
            ratio = statistics.median(written[name][1])
            print("  with relayers.db written %g/s: %s %.2fx the C reference (target >= 0.6: %s)"
                  % (opts.writes, name, ratio, _met(ratio >= 0.6)))
    measured = [f for res in [*results.values(), written or {}] for _, _, f in res.values()]
    # the warm-up's errors are in *errors* only
    return finish(max(len(errors), sum(f.errors for f in measured)), errors, work)


def stop(proc: subprocess.Popen) -> None:
    """SIGKILL a milter and, for relaymilter, its workers (they also stop on their own without it)."""
    for pid in children(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.kill()
    proc.wait(10)


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


if __name__ == "__main__":
    sys.exit(main())
