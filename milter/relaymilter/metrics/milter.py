"""NAME
    relaymilter.metrics.milter - what the milter counts, summed over its worker processes

DESCRIPTION
    Metrics (all counters but the last two, which are a histogram and a gauge):

      relaymilter_decisions_total{stage, verdict, rule}    one per MAIL or RCPT decision (verdict
                                                           continue, reject, tempfail, or warn:
                                                           a refusal warn mode let pass)
      relaymilter_lookup_errors_total{map}                 relayers / spammers map unreadable
      relaymilter_store_reloads_total{map}                 a changed map file opened afresh
      relaymilter_config_reloads_total{result}             SIGHUP reloads, ok / failed
      relaymilter_rcpt_decision_seconds                    time from RCPT to its decision
      relaymilter_workers_alive                            libmilter worker processes running

    The hot path (Tally) only appends the decision to a deque, a fraction
    of a microsecond and no lock; prometheus_client's own metric
    objects in multiprocess mode cost several microseconds per update (a
    lock, a pid check and a write into a memory-mapped file), which RCPT,
    the busiest callback, should not pay. A thread in each worker
    (WorkerMetrics) adds what its Tally gathered to prometheus_client
    metrics every FLUSH_EVERY seconds and once more when the worker stops,
    so a scrape is at most that old.

    Several processes: the supervisor (SupervisorMetrics) makes a private
    directory and points PROMETHEUS_MULTIPROC_DIR at it before
    prometheus_client is first imported; every worker it forks then keeps
    its values in files of its own there, and the supervisor's endpoint
    adds them up (prometheus_client's MultiProcessCollector). A worker that
    exits leaves its files: counters keep adding up across worker restarts
    (a killed worker loses what it had not flushed yet, at most FLUSH_EVERY
    seconds' worth). The directory is removed when the supervisor stops.
    The supervisor's own figures (config reloads, which it makes once for
    every worker, and the gauge of its live workers) are read when scraped.

DIAGNOSTICS
    MetricsError if prometheus_client was imported before the directory
    was set (it would then count per process and nothing would add up), or
    if the endpoint cannot listen.
"""

from __future__ import annotations

import bisect
import collections
import glob
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Iterator, Mapping, Optional

from relaymilter.metrics import Endpoint, MetricsError, serve

log = logging.getLogger("relaymilter")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
FLUSH_EVERY = 1.0
# Seconds; a decision answered from the memo tables takes some microseconds, one that reads
# relayers.db tens, one stuck behind a lock or a slow Redis up to its timeout.
BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.25, 1.0)
MAPS = ("relayers", "spammers")
_clock = time.perf_counter


class Warn:
    """The verdict of a refusal made in warn mode: logged as "would reject", answered as a pass."""


class Tally:
    """What one worker counted since it started; the hot path's part of the metrics."""

    def __init__(self) -> None:
        # The hot path only appends to a deque (atomic under the GIL: no lock for libmilter's
        # threads to queue on); snapshot() adds the queued decisions up.
        self._queue: collections.deque[tuple[tuple[str, type, str], Optional[float]]] = collections.deque()
        self._drain = threading.Lock()
        self._decisions: dict[tuple[str, type, str], int] = {}
        self._buckets = [0] * (len(BUCKETS) + 1)
        self._seconds = 0.0

    def decided(self, stage: str, decision: Any, started: float, warned: Any = None) -> None:
        """Count one decision at *stage* (MAIL or RCPT); a RCPT's time runs from *started* (perf_counter).

        *warned*: the refusal a rule in warn mode did not make (the decision
        is then a pass); it is counted as verdict ``warn`` under its own rule.
        """
        if warned is None:
            key = (stage, type(decision), decision.rule)
        else:
            key = (stage, Warn, warned.rule)
        self._queue.append((key, _clock() - started if stage == "RCPT" else None))

    def snapshot(self) -> tuple[dict[tuple[str, type, str], int], list[int], float]:
        """Copies of (decisions, latency buckets, latency sum): everything counted so far."""
        with self._drain:
            popleft = self._queue.popleft
            counts, buckets = self._decisions, self._buckets
            while True:
                try:
                    key, seconds = popleft()
                except IndexError:
                    break
                counts[key] = counts.get(key, 0) + 1
                if seconds is not None:
                    buckets[bisect.bisect_left(BUCKETS, seconds)] += 1     # the first bound >= seconds
                    self._seconds += seconds
            return dict(counts), list(buckets), self._seconds


StoreSource = Callable[[], Mapping[str, Any]]     # map name -> the store object in use now


class WorkerMetrics:
    """In a worker process: adds the Tally (and the stores' counters) to the shared metric files."""

    def __init__(self, tally: Tally, stores: StoreSource) -> None:
        from prometheus_client import Counter, Histogram

        if not os.environ.get(MULTIPROC_ENV):
            raise MetricsError("metrics: %s is not set in the worker" % MULTIPROC_ENV)
        self.tally = tally
        self._stores = stores
        self._decisions = Counter("relaymilter_decisions", "MAIL and RCPT decisions by verdict and rule",
                                  ("stage", "verdict", "rule"), registry=None)
        self._latency = Histogram("relaymilter_rcpt_decision_seconds",
                                  "Seconds from a RCPT command reaching the milter to its decision",
                                  buckets=BUCKETS, registry=None)
        self._errors = Counter("relaymilter_lookup_errors", "Lookups that found a map unreadable",
                               ("map",), registry=None)
        self._reloads = Counter("relaymilter_store_reloads", "Map files opened afresh after they changed",
                                ("map",), registry=None)
        for name in MAPS:           # present from the first scrape, at 0
            self._errors.labels(name)
            self._reloads.labels(name)
        self._done: dict[tuple[str, type, str], int] = {}      # the decisions flushed so far, per key
        self._buckets_done = [0] * (len(BUCKETS) + 1)
        self._seconds_done = 0.0
        self._store_done: dict[tuple[str, str], tuple[Any, int]] = {}
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="metrics-flush", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(FLUSH_EVERY):
            self.flush()

    def stop(self) -> None:
        """Stop the thread and flush what is left (the worker is about to exit)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.flush()

    def flush(self) -> None:
        """Add everything counted since the last flush to the metric files."""
        with self._flush_lock:
            decisions, buckets, seconds = self.tally.snapshot()
            for key, n in decisions.items():
                new = n - self._done.get(key, 0)
                if new:
                    stage, kind, rule = key
                    # The labels: mail or rcpt; the decision's class: continue, reject, tempfail (or warn).
                    self._decisions.labels(stage.lower(), kind.__name__.lower(), rule).inc(new)
                    self._done[key] = n
            added = [n - done for n, done in zip(buckets, self._buckets_done)]
            if any(added):
                _observe_many(self._latency, added, seconds - self._seconds_done)
                self._buckets_done, self._seconds_done = buckets, seconds
            for name, store in self._stores().items():
                self._store_counts(name, store, "lookup_errors", self._errors)
                self._store_counts(name, store, "reloads", self._reloads)

    def _store_counts(self, name: str, store: Any, what: str, counter: Any) -> None:
        # A store keeps plain counters of its own (under its lock); a reload that opens another
        # map starts a new store object, whose counts start at 0.
        n = int(getattr(store, what, 0))
        seen, done = self._store_done.get((name, what), (None, 0))
        if seen is not store:
            done = 0
        if n > done:
            counter.labels(name).inc(n - done)
        self._store_done[(name, what)] = (store, n)


def start_worker(holder: Any) -> WorkerMetrics:
    """In a new worker: give its RuntimeHolder a Tally and start flushing it (stop() it at exit)."""
    tally = holder.tally = Tally()
    metrics = WorkerMetrics(tally, lambda: {"relayers": holder.current.relayers, "spammers": holder.current.spammers})
    metrics.start()
    return metrics


def _observe_many(histogram: Any, per_bucket: list[int], total: float) -> None:
    """Add counted observations to a prometheus_client Histogram: *per_bucket* counts, *total* their sum.

    Histogram.observe() takes one value at a time; this does what it does
    (add to the sum and to the bucket the value falls in) for a batch, on
    the same value objects, so that the multiprocess files stay the ones
    prometheus_client reads. tests/unit/test_metrics.py checks the result
    against observe().
    """
    for value, n in zip(histogram._buckets, per_bucket):
        if n:
            value.inc(n)
    histogram._sum.inc(total)


class SupervisorMetrics:
    """In the supervisor: the shared directory, the endpoint that sums the workers, its own counts."""

    def __init__(self, listen: tuple[str, int], alive: Callable[[], int]) -> None:
        if "prometheus_client" in sys.modules and not os.environ.get(MULTIPROC_ENV):
            raise MetricsError("metrics: prometheus_client was imported before its multiprocess directory was set")
        self.dir = tempfile.mkdtemp(prefix="relaymilter-metrics-")
        os.environ[MULTIPROC_ENV] = self.dir
        self.reloads = {"ok": 0, "failed": 0}       # SIGHUP reloads, made here once for every worker
        try:
            from prometheus_client import CollectorRegistry

            registry = CollectorRegistry(auto_describe=False)
            registry.register(_Workers(self.dir))
            registry.register(_Own(alive, self.reloads))
            self.endpoint: Endpoint = serve(registry, listen)
        except (MetricsError, ImportError):
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        log.info("metrics on %s", self.endpoint.url)

    def in_child(self) -> None:
        """Right after fork(), in the new worker: let go of the supervisor's listening socket."""
        self.endpoint.close_inherited()

    def reloaded(self, ok: bool) -> None:
        self.reloads["ok" if ok else "failed"] += 1

    def worker_exited(self, pid: int) -> None:
        from prometheus_client.multiprocess import mark_process_dead

        mark_process_dead(pid, self.dir)

    def close(self) -> None:
        self.endpoint.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class _Workers:
    """The workers' files summed, as MultiProcessCollector does, over the files that are whole.

    prometheus_client creates a worker's file and sizes it afterwards: a
    scrape in between (a worker just started or replaced) would fail whole
    on the 0-byte file, and fail on every scrape if that worker was killed
    then. Such a file holds no counts yet, so it is passed over.
    """

    def __init__(self, path: str) -> None:
        self._path = path

    def collect(self) -> Any:
        from prometheus_client.multiprocess import MultiProcessCollector

        files = [f for f in glob.glob(os.path.join(self._path, "*.db")) if _holds_counts(f)]
        return MultiProcessCollector.merge(files, accumulate=True)


def _holds_counts(path: str) -> bool:
    try:
        return os.path.getsize(path) >= 8       # the used-bytes header, and room for something
    except OSError:
        return False


class _Own:
    """The supervisor's own figures, read when scraped."""

    def __init__(self, alive: Callable[[], int], reloads: dict[str, int]) -> None:
        self._alive = alive
        self._reloads = reloads

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        yield GaugeMetricFamily("relaymilter_workers_alive", "libmilter worker processes running",
                                value=self._alive())
        reloads = CounterMetricFamily("relaymilter_config_reloads", "Configuration reloads (SIGHUP) by result",
                                      labels=("result",))
        for result in ("ok", "failed"):
            reloads.add_metric((result,), self._reloads[result])
        yield reloads
