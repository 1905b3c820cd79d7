"""The metrics parts on their own: the config key, the hot-path tally and its flush, the stores'
counters, the watcher's collector (lag of a stuck watcher). A live milter and watcher are scraped in
tests/integration/test_metrics.py."""

from __future__ import annotations

import os
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional

import pytest
from prometheus_client import Histogram
from prometheus_client.parser import text_string_to_metric_families

from relaymilter.config import load_config
from relaymilter.errors import ConfigError, StoreUnavailable
from relaymilter.metrics import MetricsError, serve
from relaymilter.metrics import milter as mm
from relaymilter.metrics.popwatch import WatcherCollector, serve_watcher
from relaymilter.policy.decision import Continue, Reject, TempFail
from relaymilter.popwatch.patterns import load_patterns
from relaymilter.popwatch.service import Settings, Watcher
from relaymilter.replies import RELAYING_DENIED
from relaymilter.store import spammers
from relaymilter.store.relayers import BDBRelayStore


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "c.yaml"
    p.write_text("add_host_names: false\n" + text)
    return str(p)


# --- configuration -----------------------------------------------------------------------------

def test_metrics_are_off_unless_configured(tmp_path: Path) -> None:
    m = load_config(write(tmp_path, "")).metrics
    assert m.listen is None and m.popwatch_listen is None
    m = load_config(write(tmp_path, "metrics: {listen: 127.0.0.1:9464, popwatch_listen: '[::1]:9465'}\n")).metrics
    assert m.listen == ("127.0.0.1", 9464) and m.popwatch_listen == ("::1", 9465)
    assert load_config(write(tmp_path, "metrics: {listen: localhost:0}\n")).metrics.listen == ("localhost", 0)


@pytest.mark.parametrize("text,message", [
    ("metrics: {listen: 9464}\n", "listen: must be a non-empty string"),
    ("metrics: {listen: '127.0.0.1:70000'}\n", "want HOST:PORT"),
    ("metrics: {listen: '::1:9464'}\n", "want HOST:PORT"),
    ("metrics: {port: 9464}\n", "unknown metrics key"),
    ("metrics: {listen: 'a:1', popwatch_listen: 'a:1'}\n", "cannot listen on the same address"),
])
def test_bad_metrics_settings_name_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert str(err.value).startswith(str(tmp_path / "c.yaml") + ":2:"), err.value
    assert message in str(err.value)


def test_an_address_in_use_is_one_clear_error() -> None:
    from prometheus_client import CollectorRegistry

    first = serve(CollectorRegistry(), ("127.0.0.1", 0))
    try:
        with pytest.raises(MetricsError, match="cannot listen on 127.0.0.1:%d" % first.port):
            serve(CollectorRegistry(), ("127.0.0.1", first.port))
    finally:
        first.stop()


# --- the milter's tally --------------------------------------------------------------------------

def samples(metric: Any) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for fam in metric.collect() for s in fam.samples}


def test_a_batch_flushed_is_what_observe_would_have_made(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mm, "_clock", lambda: 0.0)
    values = [3e-6, 1e-5, 1.1e-5, 4e-4, 0.0009, 0.02, 0.3, 2.5, 1e-5]
    one_by_one = Histogram("a_seconds", "a", buckets=mm.BUCKETS, registry=None)
    for v in values:
        one_by_one.observe(v)
    tally = mm.Tally()
    for v in values:
        tally.decided("RCPT", Continue("x"), -v)
    _, buckets, total = tally.snapshot()
    batched = Histogram("a_seconds", "a", buckets=mm.BUCKETS, registry=None)
    mm._observe_many(batched, buckets, total)
    a, b = samples(one_by_one), samples(batched)
    assert a.pop(("a_seconds_sum", ())) == pytest.approx(b.pop(("a_seconds_sum", ())))
    a = {k: v for k, v in a.items() if not k[0].endswith("_created")}
    b = {k: v for k, v in b.items() if not k[0].endswith("_created")}
    assert a == b and a[("a_seconds_count", ())] == len(values)


class Store:
    def __init__(self) -> None:
        self.lookup_errors = 0
        self.reloads = 0


def test_worker_flush_adds_only_what_is_new(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(mm.MULTIPROC_ENV, str(tmp_path))
    monkeypatch.setattr(mm, "_clock", lambda: 0.0)
    tally = mm.Tally()
    stores = {"relayers": Store(), "spammers": Store()}
    w = mm.WorkerMetrics(tally, lambda: stores)
    denied = Reject(RELAYING_DENIED, "default_reject")
    tally.decided("MAIL", Continue("sender_ok"), 0.0)
    tally.decided("RCPT", denied, -2e-5)
    tally.decided("RCPT", denied, -3e-5)
    stores["relayers"].reloads = 2
    w.flush()
    w.flush()           # nothing new: nothing added
    tally.decided("RCPT", TempFail(RELAYING_DENIED, "relayers_unavailable"), -0.5)
    tally.decided("MAIL", Continue("sender_ok"), 0.0, warned=Reject(RELAYING_DENIED, "spammers"))
    stores["relayers"].lookup_errors = 1
    stores["relayers"] = Store()        # a reload opened another map: its counts start at 0
    stores["relayers"].reloads = 1
    w.flush()
    d = samples(w._decisions)
    assert d[("relaymilter_decisions_total", (("rule", "sender_ok"), ("stage", "mail"), ("verdict", "continue")))] == 1
    assert d[("relaymilter_decisions_total", (("rule", "default_reject"), ("stage", "rcpt"),
                                              ("verdict", "reject")))] == 2
    assert d[("relaymilter_decisions_total", (("rule", "relayers_unavailable"), ("stage", "rcpt"),
                                              ("verdict", "tempfail")))] == 1
    assert d[("relaymilter_decisions_total", (("rule", "spammers"), ("stage", "mail"), ("verdict", "warn")))] == 1
    assert d[("relaymilter_decisions_total", (("rule", "sender_ok"), ("stage", "mail"), ("verdict", "continue")))] == 1
    lat = samples(w._latency)
    assert lat[("relaymilter_rcpt_decision_seconds_count", ())] == 3
    assert lat[("relaymilter_rcpt_decision_seconds_bucket", (("le", "2.5e-05"),))] == 1
    assert lat[("relaymilter_rcpt_decision_seconds_sum", ())] == pytest.approx(0.50005)
    assert samples(w._reloads)[("relaymilter_store_reloads_total", (("map", "relayers"),))] == 3
    assert samples(w._errors)[("relaymilter_lookup_errors_total", (("map", "relayers"),))] == 0


def test_supervisor_refuses_a_prometheus_client_imported_too_early(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(mm.MULTIPROC_ENV, raising=False)
    with pytest.raises(MetricsError, match="imported before"):
        mm.SupervisorMetrics(("127.0.0.1", 0), lambda: 1)


# --- the stores' counters ------------------------------------------------------------------------

def test_relayers_reader_counts_reopens_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "relayers.db"
    BDBRelayStore(str(path)).add({"192.0.2.1": 100})
    store = BDBRelayStore(str(path))
    for _ in range(3):
        assert store.lookup("192.0.2.1") == 100
    assert (store.reloads, store.lookup_errors) == (1, 0)
    BDBRelayStore(str(path)).add({"192.0.2.2": 200})
    assert store.lookup("192.0.2.2") == 200
    assert (store.reloads, store.lookup_errors) == (2, 0)
    good = path.read_bytes()
    path.write_bytes(b"not a Berkeley DB file\n" * 100)
    for _ in range(2):
        with pytest.raises(StoreUnavailable):
            store.lookup("192.0.2.1")
    assert (store.reloads, store.lookup_errors) == (2, 2)
    path.write_bytes(good)
    os.utime(path, (time.time() + 5, time.time() + 5))
    assert store.lookup("192.0.2.1") == 100
    assert (store.reloads, store.lookup_errors) == (3, 2)


def test_spammers_map_counts_reloads_and_unanswered_lookups(tmp_path: Path) -> None:
    db = tmp_path / "spammers.db"
    db.write_bytes(b"not a Berkeley DB file\n" * 100)
    m = spammers.SpammersMap(str(db))
    for _ in range(2):
        with pytest.raises(StoreUnavailable):
            m.members()
    assert (m.reloads, m.lookup_errors) == (0, 2)
    (tmp_path / "src").write_text("spam.example\n")
    spammers.rebuild(str(tmp_path / "src"), str(db))
    os.utime(db, (time.time() - 60, time.time() - 60))
    assert "spam.example" in m.members()
    assert "spam.example" in m.members()
    assert (m.reloads, m.lookup_errors) == (1, 2)


# --- the watcher ---------------------------------------------------------------------------------

class StuckStore(BDBRelayStore):
    """Its first add() waits until released: a watcher stuck on the map (a lock held elsewhere)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.entered = threading.Event()
        self.release = threading.Event()

    def add(self, entries: Any, ttl: Optional[int] = None) -> None:
        self.entered.set()
        assert self.release.wait(10)
        super().add(entries, ttl)


def login(ip: str) -> bytes:
    return b"%s mail dovecot: pop3-login: Login: user=<a>, method=PLAIN, rip=%s, lip=192.0.2.1\n" % (
        time.strftime("%b %d %H:%M:%S").encode(), ip.encode())


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples if not s.labels}


def test_a_stuck_watcher_shows_its_lag(tmp_path: Path) -> None:
    log = tmp_path / "mail.log"
    log.write_bytes(b"")
    settings = Settings(logfiles=(str(log),), dbfile=str(tmp_path / "relayers.db"), grace=600, max_session=60,
                        skip_networks=(), readback=False, write=True, pattern_file="", patterns=("dovecot",))
    stores: list[StuckStore] = []

    def factory(path: str) -> StuckStore:
        stores.append(StuckStore(path))
        return stores[-1]

    w = Watcher(lambda: (settings, load_patterns(None, ["dovecot"])), store_factory=factory)
    endpoint = serve_watcher(w, ("127.0.0.1", 0))
    th = threading.Thread(target=w.run, kwargs={"install_signals": False}, daemon=True)
    th.start()
    try:
        assert w.started.wait(10)
        with log.open("ab") as fh:
            fh.write(login("192.0.2.1"))
        assert stores[0].entered.wait(10)           # it read the line and is stuck writing it
        waiting = login("192.0.2.2") + b"noise\n"
        with log.open("ab") as fh:
            fh.write(waiting)
        time.sleep(0.3)
        got = scrape(endpoint.url)
        assert got["relaymilter_popwatch_lag_bytes"] == len(waiting)
        assert got["relaymilter_popwatch_lag_seconds"] >= 0.3
        assert got["relaymilter_popwatch_lines_read_total"] == 1
        assert got["relaymilter_popwatch_logins_total"] == 1
        assert got["relaymilter_popwatch_writes_total"] == 0
        stores[0].release.set()
        deadline = time.monotonic() + 10
        while w.tracker.stats["written"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        got = scrape(endpoint.url)
        assert got["relaymilter_popwatch_lag_bytes"] == 0 and got["relaymilter_popwatch_lag_seconds"] == 0
        assert got["relaymilter_popwatch_lines_read_total"] == 3
        assert got["relaymilter_popwatch_writes_total"] == 2
        assert list(WatcherCollector(w).collect())
    finally:
        stores[0].release.set() if stores else None
        w.stop()
        th.join(10)
        endpoint.stop()
