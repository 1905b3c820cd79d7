"""NAME
    relaymilter.metrics.popwatch - what relaymilter-popwatch counts, read when scraped

DESCRIPTION
    The watcher counts what it does anyway (Tracker.stats, Watcher.lines_read
    and .config_reloads); the collector reads those plain integers when
    Prometheus scrapes, so following the log costs nothing more with metrics
    on. Metrics:

      relaymilter_popwatch_lines_read_total       log lines read (read-back included)
      relaymilter_popwatch_logins_total           login lines recorded (not the skipped ones)
      relaymilter_popwatch_writes_total           entries written to the relayers map
      relaymilter_popwatch_expired_total          entries removed when their grace ran out
      relaymilter_popwatch_store_errors_total     failed writes or expiries (retried)
      relaymilter_popwatch_config_reloads_total{result}   SIGHUP reloads, ok / failed
      relaymilter_popwatch_lag_bytes              bytes in the followed logs not read yet
      relaymilter_popwatch_lag_seconds            0 when nothing is waiting; else seconds
                                                  since the watcher last had read every
                                                  log to its end

    The lag is measured at scrape time, from the files on disk, so a watcher
    that is stuck (a lock held elsewhere, a flood) shows a growing lag even
    though its own loop is not running.

DIAGNOSTICS
    A log file that cannot be stat'ed counts as nothing waiting.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Iterator

from relaymilter.metrics import Endpoint, serve

if TYPE_CHECKING:
    from relaymilter.popwatch.service import Watcher


def unread_bytes(watcher: "Watcher") -> int:
    """Bytes written to the watcher's logs that it has not read yet (safe from another thread)."""
    total = 0
    for tracked in list(watcher.follower.files):
        try:
            st = os.stat(tracked.path)
        except OSError:
            continue
        cur = tracked.cur
        if cur is not None and cur.ident == (st.st_dev, st.st_ino):
            total += max(0, st.st_size - cur.pos)
        else:
            total += st.st_size          # not open yet, or rotated and not picked up yet: all of it waits
    return total


class WatcherCollector:
    """A prometheus_client collector over a running Watcher."""

    def __init__(self, watcher: "Watcher") -> None:
        self.watcher = watcher

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        w = self.watcher
        stats = w.tracker.stats
        for name, doc, value in (
                ("lines_read", "Log lines read", w.lines_read),
                ("logins", "Login lines recorded", stats.get("logins", 0)),
                ("writes", "Entries written to the relayers map", stats.get("written", 0)),
                ("expired", "Entries expired from the relayers map", stats.get("expired", 0)),
                ("store_errors", "Writes or expiries that failed (retried)", stats.get("store_errors", 0))):
            yield CounterMetricFamily("relaymilter_popwatch_" + name, doc, value=value)
        reloads = CounterMetricFamily("relaymilter_popwatch_config_reloads", "Configuration reloads (SIGHUP) by result",
                                      labels=("result",))
        for result in ("ok", "failed"):
            reloads.add_metric((result,), w.config_reloads[result])
        yield reloads
        waiting = unread_bytes(w)
        yield GaugeMetricFamily("relaymilter_popwatch_lag_bytes", "Bytes in the followed logs not read yet",
                                value=waiting)
        lag = max(0.0, time.time() - w.caught_up_at) if waiting else 0.0
        yield GaugeMetricFamily("relaymilter_popwatch_lag_seconds",
                                "0 when nothing is waiting, else seconds since the logs were last read to the end",
                                value=lag)


def serve_watcher(watcher: "Watcher", listen: tuple[str, int]) -> Endpoint:
    """The watcher's metrics endpoint, serving in a thread of this process."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(WatcherCollector(watcher))
    return serve(registry, listen)
