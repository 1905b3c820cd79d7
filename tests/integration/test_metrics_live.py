"""Prometheus metrics scraped from a live relaymilter and a live relaymilter-popwatch.

The milter (the installed console script, its supervisor and its libmilter
worker processes) gets a known sequence of sessions through the harness; its
endpoint must then show exactly those decisions, by stage, verdict and rule,
one latency observation per RCPT, the store reloads the workers made (which
worker served what is read from the pid in each decision log line), one
relayers lookup error while relayers.db is corrupt, and the config reloads.
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
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

import pytest
from prometheus_client.parser import text_string_to_metric_families

from relaymilter.harness import MilterSession
from relaymilter.metrics.milter import FLUSH_EVERY
from relaymilter.store import spammers
from relaymilter.store.relayers import BDBRelayStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from milterproc import MilterProcess, ToolProcess, children  # noqa: E402

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


# ------------------------------------------------------------------------------- the milter

WORKERS = 3
ROUNDS = 8
LISTED, STRANGER, SPAMMER = "192.0.2.10", "192.0.2.20", "192.0.2.30"


def session(m: MilterProcess, client: str, sender: str, rcpts: list[str]) -> list[str]:
    with MilterSession(m.socket, timeout=10) as s:
        s.connect(client_ip=client)
        s.helo("client.example")
        first = s.mail(sender)
        if first.action != "continue":
            return [str(first)]
        return [str(s.rcpt(r)) for r in rcpts]


def one_round(m: MilterProcess) -> None:
    assert session(m, LISTED, "<a@example.net>", ["<x@remote.example>", "<y@local.test>"]) == ["continue"] * 2
    assert session(m, STRANGER, "<b@example.net>", ["<x@remote.example>", "<z@remote.example>",
                                                    "<w@relayed.test>"])[1:] == ["550 5.7.1 Relaying denied",
                                                                                  "continue"]
    assert session(m, "127.0.0.1", "<>", ["<x@remote.example>"]) == ["continue"]
    assert session(m, SPAMMER, "<u@spam.example>", ["<x@local.test>"]) == ["550 5.7.1 Access denied"]


ROUND = {("mail", "continue", "sender_ok"): 2, ("mail", "continue", "null_sender"): 1,
         ("mail", "reject", "spammers"): 1,
         ("rcpt", "continue", "relayers_db"): 1, ("rcpt", "continue", "local_domain"): 1,
         ("rcpt", "reject", "default_reject"): 2, ("rcpt", "continue", "relay_domain"): 1,
         ("rcpt", "continue", "trusted_network"): 1}


def times(n: int, counts: dict) -> Counter:
    return Counter({k: n * v for k, v in counts.items()})


def pids_with(log: str, *needles: str) -> set[str]:
    """The worker pids whose decision lines contain any of *needles*."""
    return {m.group(1) for line in log.splitlines() if any(n in line for n in needles)
            for m in [re.search(r"relaymilter\[(\d+)\]: ", line)] if m}


@pytest.fixture
def milter(tmp_path: Path):
    (tmp_path / "spammers").write_text("spam.example\n")
    spammers.rebuild(str(tmp_path / "spammers"), str(tmp_path / "spammers.db"))
    BDBRelayStore(str(tmp_path / "relayers.db")).add({LISTED: int(time.time())})
    (tmp_path / "tmp").mkdir()      # where the supervisor makes its metrics directory
    m = MilterProcess(tmp_path, {"metrics": {"listen": "127.0.0.1:0"}, "workers": WORKERS},
                      wrapper=("env", "TMPDIR=%s" % (tmp_path / "tmp")))
    m.start()
    try:
        yield m
    finally:
        m.stop()


def test_milter_metrics_add_up_over_the_workers(milter: MilterProcess) -> None:
    url = URL_RE.search(milter.wait_for_log("metrics on "))
    assert url is not None
    url = url.group(1)
    wait_for("the workers", lambda: one(scrape(url), "relaymilter_workers_alive") == WORKERS)
    first = scrape(url)
    assert decisions(first) == {}
    # A worker's metrics file the instant it is created (or left so by a worker killed then)
    # is 0 bytes: a scrape passes over it instead of failing whole.
    (multiproc,) = (milter.rundir / "tmp").glob("relaymilter-metrics-*")
    (multiproc / "counter_4194000.db").touch()
    assert scrape(url) == first
    # Nothing decided yet (a worker's zeroes may not be in the files yet: absent counts as 0).
    assert first.get(("relaymilter_rcpt_decision_seconds_count", ()), 0) == 0

    for _ in range(ROUNDS):
        one_round(milter)
    expected = times(ROUNDS, ROUND)
    got = settle(url, "relaymilter_decisions_total", sum(expected.values()))
    assert decisions(got) == expected
    rcpts = sum(v for (stage, _, _), v in expected.items() if stage == "rcpt")
    assert one(got, "relaymilter_rcpt_decision_seconds_count") == rcpts
    assert one(got, "relaymilter_rcpt_decision_seconds_bucket", le="+Inf") == rcpts
    assert 0 < one(got, "relaymilter_rcpt_decision_seconds_sum") < rcpts * 0.1
    # Every worker that served a session opened each map once (neither changed meanwhile).
    log = milter.log()
    served = pids_with(log, "rule=")
    assert 1 <= len(served) <= WORKERS
    assert one(got, "relaymilter_store_reloads_total", map="relayers") == len(
        pids_with(log, "rule=relayers_db", "rule=default_reject"))
    assert one(got, "relaymilter_store_reloads_total", map="spammers") == len(
        pids_with(log, "rule=sender_ok", "rule=spammers"))
    assert one(got, "relaymilter_lookup_errors_total", map="relayers") == 0
    assert one(got, "relaymilter_lookup_errors_total", map="spammers") == 0

    # A corrupt relayers.db: one failed lookup per transaction, each of its relay RCPTs tempfails.
    good = Path(milter.relayers_db).read_bytes()
    Path(milter.relayers_db).write_bytes(b"this is not a Berkeley DB file\n" * 200)
    assert session(milter, STRANGER, "<b@example.net>", ["<x@remote.example>", "<z@remote.example>",
                                                         "<y@local.test>"])[:2] == [
        "451 4.3.0 Relay check temporarily unavailable, try again later"] * 2
    Path(milter.relayers_db).write_bytes(good)
    expected += {("mail", "continue", "sender_ok"): 1, ("rcpt", "tempfail", "relayers_unavailable"): 2,
                 ("rcpt", "continue", "local_domain"): 1}
    got = settle(url, "relaymilter_decisions_total", sum(expected.values()))
    assert decisions(got) == expected
    assert one(got, "relaymilter_lookup_errors_total", map="relayers") == 1
    assert one(got, "relaymilter_rcpt_decision_seconds_count") == rcpts + 3

    # Reloads: one that works, one that fails (the config keeps running).
    milter.hup()
    wait_for("the reload", lambda: one(scrape(url), "relaymilter_config_reloads_total", result="ok") >= 1)
    config = milter.config_path.read_text()
    milter.config_path.write_text(config + "no_such_key: 1\n")
    milter.hup()
    wait_for("the failed reload",
             lambda: one(scrape(url), "relaymilter_config_reloads_total", result="failed") >= 1)
    milter.config_path.write_text(config)
    time.sleep(FLUSH_EVERY + 0.5)
    got = scrape(url)
    assert one(got, "relaymilter_config_reloads_total", result="ok") == 1
    assert one(got, "relaymilter_config_reloads_total", result="failed") == 1

    # A worker that dies keeps its counts in the sum; its replacement counts on.
    victim = children(milter.pid)[0]
    os.kill(victim, signal.SIGKILL)
    wait_for("a replacement worker", lambda: victim not in children(milter.pid)
             and len(children(milter.pid)) == WORKERS)
    assert one(scrape(url), "relaymilter_workers_alive") == WORKERS
    for _ in range(2):
        one_round(milter)
    expected += times(2, ROUND)
    got = settle(url, "relaymilter_decisions_total", sum(expected.values()))
    assert decisions(got) == expected


def tcp_listening(pids: list[int]) -> list[str]:
    """The TCP ports (hex, as in /proc/net/tcp*) on which any of *pids* listens."""
    inodes = set()
    for pid in pids:
        for fd in Path("/proc/%d/fd" % pid).iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                ports.append(fields[1].rsplit(":", 1)[1])
    return ports


def test_metrics_are_off_by_default(tmp_path: Path) -> None:
    m = MilterProcess(tmp_path).start()
    try:
        assert session(m, "127.0.0.1", "<>", ["<x@remote.example>"]) == ["continue"]
        assert "metrics on" not in m.log()
        assert tcp_listening([m.pid] + children(m.pid)) == []
    finally:
        m.stop()
    m = MilterProcess(tmp_path, {"metrics": {"listen": "127.0.0.1:0"}, "workers": 2}).start()
    try:       # the check above can see a metrics port; the supervisor alone holds it
        wait_for("the workers", lambda: len(children(m.pid)) == 2)
        assert len(tcp_listening([m.pid])) == 1
        assert tcp_listening(children(m.pid)) == []
    finally:
        m.stop()


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
