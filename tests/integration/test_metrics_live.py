"""Prometheus metrics scraped from a live relaymilter-popwatch.

The watcher follows a real log file that the test writes line by line; its
endpoint must show the lines, logins, writes and expiries, and no lag.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable, Optional

import pytest
from prometheus_client.parser import text_string_to_metric_families

from relaymilter.metrics.milter import FLUSH_EVERY

sys.path.insert(0, str(Path(__file__).resolve().parent))
from milterproc import ToolProcess  # noqa: E402

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
URL_RE = re.compile(r"metrics on (http://\S+)")


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode("utf-8")
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def select(samples: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def wait_for(what: str, cond: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError("timed out after %gs waiting for %s" % (timeout, what))


def settle(url: str, name: str, total: float) -> Samples:
    """Scrape until *name* sums to *total* (the workers flush every FLUSH_EVERY s), then once more a
    flush later: the numbers must have stayed put (nothing counted twice, nothing late)."""
    got: list[Samples] = []

    def reached() -> bool:
        got[:] = [scrape(url)]
        return sum(select(got[0], name).values()) >= total

    wait_for("%s to reach %s" % (name, total), reached)
    time.sleep(FLUSH_EVERY + 0.5)
    again = scrape(url)
    assert select(again, name) == select(got[0], name)
    return again


def decisions(samples: Samples) -> dict[tuple[str, str, str], int]:
    return {(d["stage"], d["verdict"], d["rule"]): int(v)
            for labels, v in select(samples, "relaymilter_decisions_total").items()
            for d in [dict(labels)] if v}


def one(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


# ------------------------------------------------------------------------------- the watcher

GRACE = 2


def cyrus(ip: str) -> str:
    now = time.localtime()
    stamp = "%s %2d %s" % (time.strftime("%b", now), now.tm_mday, time.strftime("%H:%M:%S", now))
    return "%s mail cyrus/imap[7001]: login: client.example [%s] alice plaintext User logged in\n" % (stamp, ip)


def test_popwatch_metrics_count_the_log(tmp_path: Path) -> None:
    logfile = tmp_path / "mail.log"
    logfile.write_text("")
    db = tmp_path / "relayers.db"
    cfg = tmp_path / "relaymilter.yaml"
    cfg.write_text("relayers: {path: %s}\n"
                   "popwatch: {logfiles: [%s], grace: %d, patterns: [cyrus], skip_networks: [127.0.0.0/8]}\n"
                   "metrics: {popwatch_listen: '127.0.0.1:0'}\n" % (db, logfile, GRACE))
    pw = ToolProcess(["relaymilter-popwatch", "-c", str(cfg)])
    try:
        wait_for("popwatch to start", lambda: pw.said("following ") or not pw.running())
        assert pw.running(), pw.output()
        found: Optional[re.Match] = next((URL_RE.search(line) for line in pw.lines if URL_RE.search(line)), None)
        assert found is not None, pw.output()
        url = found.group(1)
        start = scrape(url)
        for name in ("lines_read", "logins", "writes", "expired", "store_errors"):
            assert one(start, "relaymilter_popwatch_%s_total" % name) == 0

        lines = [cyrus("192.0.2.1"), "Nov 21 18:50:00 mail cyrus/imap[7001]: accepted connection\n",
                 cyrus("192.0.2.2"), cyrus("127.0.0.5"),
                 "Nov 21 18:50:00 mail cyrus/imap[7001]: badlogin: client.example [192.0.2.3] plaintext\n",
                 cyrus("2001:db8::4")]
        for line in lines:
            with logfile.open("a") as fh:
                fh.write(line)
            size = logfile.stat().st_size
            wait_for("the line to be read", lambda: one(scrape(url), "relaymilter_popwatch_lag_bytes") == 0
                     and one(scrape(url), "relaymilter_popwatch_lines_read_total") == lines.index(line) + 1)
            assert logfile.stat().st_size == size
        wait_for("the writes", lambda: one(scrape(url), "relaymilter_popwatch_writes_total") == 3)
        got = scrape(url)
        assert one(got, "relaymilter_popwatch_lines_read_total") == len(lines)
        assert one(got, "relaymilter_popwatch_logins_total") == 3
        assert one(got, "relaymilter_popwatch_lag_seconds") == 0
        assert one(got, "relaymilter_popwatch_expired_total") == 0
        wait_for("the expiries", lambda: one(scrape(url), "relaymilter_popwatch_expired_total") == 3,
                 timeout=GRACE + 10)

        os.kill(pw.proc.pid, signal.SIGHUP)
        wait_for("the reload", lambda: one(scrape(url), "relaymilter_popwatch_config_reloads_total",
                                           result="ok") == 1)
        got = scrape(url)
        assert one(got, "relaymilter_popwatch_config_reloads_total", result="failed") == 0
        assert one(got, "relaymilter_popwatch_writes_total") == 3
        assert one(got, "relaymilter_popwatch_store_errors_total") == 0
    finally:
        assert pw.stop() == 0, pw.output()
