"""What the milter benchmarks share: measured rounds, interleaving, the figures and the verdict.

Not a benchmark: imported by the scripts beside it (python3 benchmarks/NAME.py puts
this directory on sys.path). Importing it also puts tests/ and tests/integration/ on
sys.path, for the test helpers the benchmarks start their servers with (milterproc,
redisproc, mta, dnsserver).

    run_round           one measured window: generator processes (milter_loadgen.py)
                        keep --concurrency milter sessions busy against one milter;
                        adds sessions, RCPTs, wrong answers, RCPT round trips and CPU
                        (the milter's process tree, the generators, the rest of the
                        machine) to a Figures
    interleaved         the order of the rounds: A B, B A, A B ... so that load from
                        other processes on a shared machine hits every variant alike
    check_with_harness  one session per kind through relaymilter.harness.MilterSession,
                        an independent check of the answers the generator expects
    Writer              relayers.db written N times a second, as by a busy POP server
    finish              the exit status: 1 (the work directory kept) when any answer
                        was wrong or missing, else 0
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import shutil
import sys
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, List, Sequence, Tuple, TypeVar

HERE = Path(__file__).resolve().parent
for _helpers in (HERE.parent / "tests", HERE.parent / "tests" / "integration"):
    if str(_helpers) not in sys.path:
        sys.path.insert(0, str(_helpers))

from milter_loadgen import STEP_TIMEOUT, Kind, Script, db_address, generate  # noqa: E402
from milterproc import children  # noqa: E402  (a test helper, found through sys.path)

from relaymilter.harness import MilterSession  # noqa: E402
from relaymilter.harness.reply import OptNeg  # noqa: E402
from relaymilter.store.relayers import BDBRelayStore  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
T = TypeVar("T")


def prog() -> str:
    """The running benchmark's name, for its error lines."""
    return Path(sys.argv[0]).stem


def tree_cpu(pid: int) -> float:
    """user+sys seconds of pid and its children (all their threads, dead or alive)."""
    total = 0
    for p in [pid, *children(pid)]:
        try:
            fields = Path("/proc/%d/stat" % p).read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine so far (all cores)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK


@dataclass
class Figures:
    sessions: int = 0
    rcpts: int = 0
    errors: int = 0
    seconds: float = 0.0
    milter_cpu: float = 0.0
    gen_cpu: float = 0.0
    other_cpu: float = 0.0
    machine_cpu: float = 0.0
    latencies: array = field(default_factory=lambda: array("q"))

    def add(self, other: "Figures") -> None:
        for name in ("sessions", "rcpts", "errors", "seconds", "milter_cpu", "gen_cpu", "other_cpu", "machine_cpu"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.latencies.extend(other.latencies)


def run_round(path: str, pid: int, scripts: Sequence[Script], opts: argparse.Namespace, seconds: float,
              figures: Figures, errors: List[str]) -> None:
    """Load the milter on unix socket *path* (process *pid*) for *seconds* with opts.concurrency sessions."""
    ctx = multiprocessing.get_context("fork")
    start_at = time.monotonic() + 0.3        # room for the forks before the window opens
    end_at = start_at + seconds
    shares = [opts.concurrency // opts.procs + (i < opts.concurrency % opts.procs) for i in range(opts.procs)]
    workers, pipes = [], []
    for i, share in enumerate(s for s in shares if s):
        recv_end, send_end = ctx.Pipe(duplex=False)
        chunk = list(scripts[i::opts.procs]) or list(scripts)
        w = ctx.Process(target=generate, args=(path, chunk, share, start_at, end_at, send_end), daemon=True)
        w.start()
        send_end.close()
        workers.append(w)
        pipes.append(recv_end)
    time.sleep(max(0.0, start_at - time.monotonic()))
    m0, b0 = tree_cpu(pid), machine_busy()
    results = []
    for w, pipe in zip(workers, pipes):
        if not pipe.poll(seconds + 4 * STEP_TIMEOUT + 10):
            raise SystemExit("%s: error: a generator process did not report in time" % prog())
        try:
            results.append(pipe.recv())
        except EOFError:
            raise SystemExit("%s: error: a generator process died (exit %s)" % (prog(), w.exitcode)) from None
        w.join(10)
    m1, b1 = tree_cpu(pid), machine_busy()
    for r in results:
        figures.sessions += r["sessions"]
        figures.rcpts += r["rcpts"]
        figures.errors += r["errors"]
        figures.gen_cpu += r["cpu"]
        figures.latencies.frombytes(r["latencies"])
        errors.extend(r["errors_shown"])
    gen = sum(r["cpu"] for r in results)
    figures.seconds += max(r["ended"] for r in results) - start_at
    figures.milter_cpu += m1 - m0
    figures.other_cpu += max(0.0, (b1 - b0) - (m1 - m0) - gen)
    figures.machine_cpu += b1 - b0


def interleaved(order: Sequence[T], rounds: int) -> Iterator[Tuple[int, T]]:
    """(round, variant) for *rounds* rounds of every variant, the order reversed every other round."""
    for r in range(rounds):
        for item in (order if r % 2 == 0 else order[::-1]):
            yield r, item


def check_with_harness(spec: str, kinds: Sequence[Kind]) -> OptNeg:
    """Run one session per kind through MilterSession; return the negotiated options."""
    neg = None
    for kind in kinds:
        with MilterSession(spec, timeout=STEP_TIMEOUT) as s:
            neg = s.negotiated
            s.connect(client_ip=kind.client)
            s.helo("probe.client.example")
            s.mail("<probe@client.example>")
            for rcpt, want in kind.rcpts:
                got = str(s.rcpt(rcpt))
                if got != want:
                    raise SystemExit("%s: error: %s: RCPT %s from %s: expected %s, got %s"
                                     % (prog(), spec, rcpt, kind.client, want, got))
            s.abort()
    assert neg is not None
    return neg


def percentile(sorted_ns: Sequence[int], q: float) -> float:
    """Nearest-rank percentile, in milliseconds."""
    if not sorted_ns:
        return float("nan")
    rank = max(0, min(len(sorted_ns) - 1, math.ceil(q * len(sorted_ns)) - 1))
    return sorted_ns[rank] / 1e6


def median_round(ratios: Sequence[float]) -> float:
    """The median the reports print for per-round ratios (the upper one of an even count)."""
    return sorted(ratios)[len(ratios) // 2]


def write_loop(path: str, rate: float, entries: int, stop: Any, count: Any) -> None:
    """Refresh one listed address in relayers.db *rate* times a second until *stop* is set."""
    store = BDBRelayStore(path)
    period = 1.0 / rate
    due = time.monotonic()
    while not stop.wait(max(0.0, due - time.monotonic())):
        store.add({db_address(count.value * 7919 % entries): int(time.time())})
        count.value += 1
        due += period


class Writer:
    """relayers.db written *rate* times a second by a process of its own, while in a with block.

    Its own process, started by spawn: a writer thread here would hold LOCK_EX
    on a descriptor that the generator processes, forked from this one,
    inherit, and the lock would stay held for as long as they live.
    """

    def __init__(self, path: str, rate: float, entries: int) -> None:
        self._ctx = multiprocessing.get_context("spawn")
        self.path, self.rate, self.entries = path, rate, entries
        self._count = self._ctx.Value("q", 0)
        self._stop = self._ctx.Event()
        self._proc: Any = None

    @property
    def writes(self) -> int:
        return int(self._count.value)

    def __enter__(self) -> "Writer":
        self._stop.clear()
        self._proc = self._ctx.Process(target=write_loop, daemon=True,
                                       args=(self.path, self.rate, self.entries, self._stop, self._count))
        self._proc.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._proc.join(10)


def finish(failed: int, errors: Sequence[str], work: Path) -> int:
    """The exit status: 1 with the first errors when *failed* answers were wrong or missing
    (the work directory, with the milters' logs, is kept), else 0 with the work directory removed."""
    if failed:
        sys.stderr.write("%s: error: %d wrong or missing answers (logs kept in %s); first ones:\n"
                         % (prog(), failed, work))
        sys.stderr.writelines("  %s\n" % e for e in errors[:10])
        return 1
    shutil.rmtree(work, ignore_errors=True)
    return 0
