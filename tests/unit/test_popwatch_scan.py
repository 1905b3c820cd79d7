"""The fast paths of the log watcher: few passes over a block, lines cut at any block
boundary, the timestamp anchor of combined regexes, one write per address per burst,
bulk reads of the map, writes held while catching up, cached address checks."""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import pytest

from relaymilter.domainsconfig import parse_network
from relaymilter.ipaddr import normalize_ip
from relaymilter.popwatch import follow, service
from relaymilter.popwatch.follow import Follower
from relaymilter.popwatch.matcher import Event, Matcher
from relaymilter.popwatch.patterns import load_patterns
from relaymilter.popwatch.readback import read_file
from relaymilter.popwatch.recorder import BULK_MIN, Tracker
from relaymilter.popwatch.scanplan import ScanPlan
from relaymilter.popwatch.service import Settings, Watcher
from relaymilter.store.relayers import BDBRelayStore

LOGS = Path(__file__).resolve().parent.parent / "data" / "logs"
NOW = time.mktime((2024, 11, 22, 12, 0, 0, 0, 0, -1))


def plan_masks(plan: ScanPlan, block: bytes) -> dict[bytes, int]:
    """Line -> rule mask, as the matcher computes it from the plan."""
    out = {}
    for start, roots in plan.candidates(block).items():
        line = block[start:block.find(b"\n", start)]
        mask, longer = plan.resolve(roots)
        for lit, more in longer:
            if lit in line:
                mask |= more
        out[line] = mask
    return out


def random_block(lits: list[bytes], rnd: random.Random, lines: int = 3000) -> bytes:
    noise = [b"postfix/smtpd[1]: connect from x[203.0.113.1]", b"from=<a@b>, size=12: ok", b"reject: RCPT: 554 ",
             b": ", b">: ", b"x: ", b"Auth", b"user", b" ", b":", b">"]
    out = []
    for _ in range(lines):
        parts = [rnd.choice(noise) for _ in range(rnd.randrange(0, 4))]
        for _ in range(rnd.choice((0, 0, 1, 1, 2))):
            lit = rnd.choice(lits)
            cut = rnd.randrange(len(lit) + 1)
            # Whole prefilters, and pieces of them that must not count.
            parts.insert(rnd.randrange(len(parts) + 1), lit if rnd.random() < 0.6 else lit[:cut])
        out.append(b"Nov 21 18:14:14 mail prog[1]: " + b"".join(parts))
    return b"\n".join(out) + b"\n"


@pytest.mark.parametrize("lits", [
    None,           # the shipped patterns' prefilters
    # parts of each other; a shared first part that overlaps itself ("aa"); one that does not ("xy")
    [b"aab", b"aabx", b"xaab", b"aaa1", b"aab2", b"ab", b"abab", b"baba", b"xy1", b"xy22", b"ccd"],
    # anchored ones: the same tail after different text, tails that start alike, too short a tail
    [b">: Disconnected", b": Disconnected now", b"x: Info: ", b">: Info: ", b": Info: more", b": Auth: ",
     b": Authentication passed", b"Stats: ", b": ab", b"a: long tail here", b"b: long", b": lo"],
])
def test_the_plan_finds_exactly_what_a_search_for_every_prefilter_finds(lits: Optional[list[bytes]]) -> None:
    table: dict[bytes, int] = {}
    if lits is None:
        for i, rule in enumerate(load_patterns().rules):
            for lit in rule.prefilters:
                table[lit] = table.get(lit, 0) | 1 << i
    else:
        table = {lit: 1 << i for i, lit in enumerate(lits)}
    plan = ScanPlan(table)
    rnd = random.Random(7)
    block = random_block(list(table), rnd)
    got = plan_masks(plan, block)
    for line in block.split(b"\n")[:-1]:
        want = 0
        for lit, mask in table.items():
            if lit in line:
                want |= mask
        # Never less than the prefilters present (that would hide logins); more only costs a regex try.
        assert got.get(line, 0) & want == want, (line, got.get(line, 0), want)
        if lits is None:
            assert got.get(line, 0) == want, line


def test_the_shipped_patterns_cost_four_passes_over_a_block() -> None:
    assert Matcher(load_patterns()).passes <= 4


@pytest.mark.parametrize("size", [1, 7, 100, 4096])
def test_a_line_cut_at_any_block_boundary_still_matches(tmp_path: Path, size: int) -> None:
    data = b"".join((LOGS / (s + ".log")).read_bytes() for s in ("dovecot", "courier", "popa3d", "uw-imap"))
    path = tmp_path / "mail.log"
    path.write_bytes(data)
    whole = [(e.kind, e.ip, e.session) for e in Matcher(load_patterns()).scan(data, NOW)]
    matcher = Matcher(load_patterns())
    pieces = [(e.kind, e.ip, e.session) for block in read_file(str(path), block=size) for e in matcher.scan(block, NOW)]
    assert pieces == whole and len(whole) > 10


def test_a_line_written_in_two_pieces_is_matched_once_complete(tmp_path: Path) -> None:
    path = tmp_path / "mail.log"
    path.write_bytes(b"")
    f = Follower([str(path)], use_inotify=False)
    f.start()
    matcher = Matcher(load_patterns(None, ["dovecot"]))
    line = b"Nov 21 18:14:14 mail dovecot: pop3-login: Login: user=<a>, method=PLAIN, rip=192.0.2.9, lip=192.0.2.1\n"
    try:
        with open(path, "ab", buffering=0) as fh:
            fh.write(line[:50])
            assert [c.data for c in f.read()] == []
            fh.write(line[50:])
            [chunk] = f.read()
        [ev] = matcher.scan(chunk.data, NOW)
        assert ev.ip == "192.0.2.9"
    finally:
        f.close()


def test_a_look_alike_after_the_timestamp_never_matches_and_a_line_without_one_does() -> None:
    m = Matcher(load_patterns(None, ["dovecot"]))
    body = b"pop3-login: Login: user=<a>, method=PLAIN, rip=192.0.2.1, lip=192.0.2.2"
    events = m.scan(b"Nov 21 18:14:14 mail postfix/cleanup[1]: 4X: warning: header Subject: " + body + b"\n"
                    b"Nov 21 18:14:14 Nov 21 18:14:14 " + body + b"\n" + body + b"\n", NOW)
    assert [(e.ip, e.ts) for e in events] == [("192.0.2.1", None)]


@pytest.mark.parametrize("regex", [
    "(?i)\\S+ MINE\\[\\d+\\]: OK (?P<ip>\\S+)",            # global flags must stay first
    "(\\S+) mine\\[\\d+\\]: ok (?P<ip>\\S+) \\1",          # a numbered back-reference
])
def test_regexes_that_cannot_be_combined_are_still_anchored_after_the_timestamp(tmp_path: Path, regex: str) -> None:
    path = tmp_path / "pat.yaml"
    path.write_text("patterns:\n  - name: mine\n    server: test\n    prefilter: ': ok '\n    regex: '%s'\n" % regex,
                    encoding="utf-8")
    m = Matcher(load_patterns(str(path)))
    assert not m._compiled[0].lead
    events = m.scan(b"Nov 21 18:14:14 host mine[1]: ok 192.0.2.9 host\n"
                    b"Nov 21 18:14:14 x: host mine[1]: ok 192.0.2.8 host\n", NOW)
    assert [(e.ip, e.ts) for e in events] == [("192.0.2.9", time.mktime((2024, 11, 21, 18, 14, 14, 0, 0, -1)))]


SHARED_ROOT = """\
patterns:
  - name: short
    server: test
    prefilter: ': ok '
    regex: '\\S+ a\\[\\d+\\]: ok (?P<ip>\\S+)$'
  - name: long
    server: test
    prefilter: ': ok from '
    regex: '\\S+ b\\[\\d+\\]: ok from (?P<ip>\\S+)$'
"""


def test_lines_with_the_same_roots_still_check_a_longer_prefilter_each_time(tmp_path: Path) -> None:
    # ": ok from " has ": ok " as its root: the rule a line's roots pick must not be cached
    # as the only one, or "long" would never match after a "short" line (or the other way).
    path = tmp_path / "pat.yaml"
    path.write_text(SHARED_ROOT, encoding="utf-8")
    m = Matcher(load_patterns(str(path)))
    lines = [b"Nov 21 18:14:14 h a[1]: ok 192.0.2.1", b"Nov 21 18:14:14 h b[2]: ok from 192.0.2.2",
             b"Nov 21 18:14:14 h b[3]: ok from 192.0.2.3", b"Nov 21 18:14:14 h a[4]: ok 192.0.2.4",
             b"Nov 21 18:14:14 h a[5]: ok from 192.0.2.5", b"Nov 21 18:14:14 h c[6]: nothing here"]
    want = [("short", "192.0.2.1"), ("long", "192.0.2.2"), ("long", "192.0.2.3"), ("short", "192.0.2.4")]
    for block in (b"\n".join(lines) + b"\n", b"\r\n".join(lines) + b"\r\n", b"\0\0" + b"\n".join(lines) + b"\n"):
        assert [(e.pattern, e.ip) for e in m.scan(block, NOW)] == want, block[:40]
    # One line at a time, after the cache has seen both kinds: the same answers.
    assert [(e.pattern, e.ip) for line in lines for e in m.scan(line + b"\n", NOW)] == want


def test_two_roots_of_one_pass_on_one_line_both_count() -> None:
    table = {b": Login: user=<": 1, b">: Logged out": 2, b" host=": 4}
    plan = ScanPlan(table)
    block = (b"Nov 21 18:14:14 x y>: Logged out: Login: user=<a> host=b\n"
             b"Nov 21 18:14:14 x: Login: user=<a>\n"
             b"Nov 21 18:14:14 x y>: Logged out\n")
    assert sorted(plan_masks(plan, block).values()) == [1, 2, 7]


# -- the tracker -----------------------------------------------------------------


class CountingStore(BDBRelayStore):
    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.adds: list[dict[str, int]] = []
        self.lookups = self.bulk_reads = 0

    def add(self, entries, ttl=None) -> None:  # noqa: ANN001 - RelayStore signature
        self.adds.append(dict(entries))
        super().add(entries, ttl)

    def lookup(self, ip: str) -> Optional[int]:
        self.lookups += 1
        return super().lookup(ip)

    def entries(self) -> list[tuple[str, int]]:
        self.bulk_reads += 1
        return super().entries()


@pytest.fixture
def store(tmp_path: Path) -> CountingStore:
    s = CountingStore(str(tmp_path / "relayers.db"))
    yield s
    s.close()


def login(ip: str, ts: Optional[float] = None) -> Event:
    return Event("login", "dovecot", ip, ts, None, "alice", False)


def test_many_logins_of_one_address_in_a_burst_are_one_entry_of_one_write(store: CountingStore) -> None:
    t = Tracker(store, grace=60)
    now = 1_000_000.0
    t.handle_all([login("192.0.2.1", now - i % 5) for i in range(1000)] + [login("::ffff:192.0.2.1", now - 9)], now)
    t.flush(now)
    assert store.adds == [{"192.0.2.1": int(now)}]
    assert t.stats["logins"] == 1001


def test_a_large_burst_reads_the_map_once_and_still_never_lowers_a_future_time(store: CountingStore) -> None:
    store.add({"10.0.0.7": 2_000_000, "198.51.100.1": 999_000})
    t = Tracker(store, grace=60)
    now = 1_000_000.0
    burst = ["10.0.%d.%d" % (i >> 8, i & 255) for i in range(BULK_MIN + 10)]
    t.handle_all([login(ip) for ip in burst], now)
    t.flush(now)
    assert store.bulk_reads == 1 and store.lookups == 0
    assert store.lookup("10.0.0.7") == 2_000_000             # vsmtprelay add ... <future ticks> stays
    assert len(store.adds[-1]) == len(burst) - 1
    # A small burst next to a larger map: point lookups.
    looked = store.lookups
    t.handle_all([login("192.0.2.3", now + 1)], now + 1)
    t.flush(now + 1)
    assert store.bulk_reads == 1 and store.lookups == looked + 1
    assert store.lookup("192.0.2.3") == int(now + 1)


def test_address_checks_are_cached_but_counted_each_time_and_follow_new_networks() -> None:
    t = Tracker(None, grace=60, skip_networks=[parse_network("127.0.0.0/8"), parse_network("2001:db8::/32")],
                write=False)
    now = 1_000_000.0
    t.handle_all([login("999.1.1.1"), login("999.1.1.1"), login("127.0.0.5"), login("::ffff:127.0.0.5"),
                  login("2001:db8::5"), login("::ffff:192.0.2.5"), login("::FFFF:192.0.2.5"),
                  login("::ffff:c000:205"), login("192.0.2.6")], now)
    assert t.stats["invalid_ip"] == 2 and t.stats["skipped_local"] == 3 and t.stats["logins"] == 4
    assert sorted(w[0] for w in t.flush(now)) == ["192.0.2.5", "192.0.2.6"]
    t.configure(60, 3600, [parse_network("192.0.2.0/24")])           # SIGHUP with other networks
    t.handle_all([login("127.0.0.5"), login("192.0.2.6")], now)
    assert t.stats["skipped_local"] == 4 and t.stats["logins"] == 5


@pytest.mark.parametrize("raw", ["::ffff:192.0.2.5", "::FFFF:192.0.2.5", "::ffff:c000:205", "::ffff:010.0.0.1",
                                 "::ffff:1.2.3", "::ffff:256.1.1.1", "0:0:0:0:0:ffff:192.0.2.5", "::ffff:192.0.2.5x"])
def test_the_mapped_address_shortcut_agrees_with_normalize_ip(raw: str) -> None:
    t = Tracker(None, grace=60, write=False)
    try:
        want: Optional[str] = normalize_ip(raw)
    except ValueError:
        want = None
    assert t.canonical(raw) == want


# -- the watcher -----------------------------------------------------------------


def wait_for(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError("timed out")


def dovecot_line(ip: str, when: float) -> bytes:
    stamp = time.strftime("%b %d %H:%M:%S", time.localtime(when)).encode()
    return b"%s mail dovecot: pop3-login: Login: user=<u>, method=PLAIN, rip=%s, lip=192.0.2.1\n" % (stamp, ip.encode())


def run_watcher(tmp_path: Path, stores: list[CountingStore]) -> tuple[Watcher, threading.Thread]:
    settings = Settings(logfiles=(str(tmp_path / "mail.log"),), dbfile=str(tmp_path / "relayers.db"), grace=600,
                        max_session=60, skip_networks=(), readback=False, write=True, pattern_file="",
                        patterns=("dovecot",))
    patterns = load_patterns(None, ["dovecot"])

    def factory(path: str) -> CountingStore:
        stores.append(CountingStore(path))
        return stores[-1]

    w = Watcher(lambda: (settings, patterns), store_factory=factory)
    th = threading.Thread(target=w.run, kwargs={"install_signals": False}, daemon=True)
    th.start()
    assert w.started.wait(10)
    return w, th


def appear(tmp_path: Path, data: bytes) -> None:
    """The followed log appears at once (as after a rotation): the watcher reads it from its start."""
    (tmp_path / "new.log").write_bytes(data)
    (tmp_path / "new.log").rename(tmp_path / "mail.log")


def test_a_burst_in_the_log_is_one_write_of_one_entry_per_address(tmp_path: Path) -> None:
    stores: list[CountingStore] = []
    w, th = run_watcher(tmp_path, stores)
    try:
        now = time.time()
        appear(tmp_path, b"".join(dovecot_line("192.0.2.%d" % (i % 3 + 1), now) + b"Nov 21 noise: x\n"
                                  for i in range(3000)))
        wait_for(lambda: w.tracker.stats["logins"] == 3000 and w.tracker.stats["written"] == 3)
        assert [sorted(a) for a in stores[0].adds] == [["192.0.2.1", "192.0.2.2", "192.0.2.3"]]
    finally:
        w.stop()
        th.join(10)


def test_writes_are_held_while_catching_up_and_made_once_caught_up(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(follow, "BURST_MAX", 64 << 10)
    monkeypatch.setattr(follow, "READ_SIZE", 16 << 10)
    monkeypatch.setattr(service, "HOLD_WRITES", 60.0)
    stores: list[CountingStore] = []
    w, th = run_watcher(tmp_path, stores)
    reads = []
    real_read = w.follower.read

    def counting_read() -> list:
        chunks = real_read()
        if chunks:
            reads.append(w.follower.behind)
        return chunks

    w.follower.read = counting_read  # type: ignore[method-assign]
    try:
        now = time.time()
        ips = ["10.1.%d.%d" % (i >> 8, i & 255) for i in range(10000)]        # about 1 MB of log
        appear(tmp_path, b"".join(dovecot_line(ip, now) for ip in ips))
        reader = BDBRelayStore(str(tmp_path / "relayers.db"))
        try:
            wait_for(lambda: reader.lookup(ips[-1]) is not None)
            assert all(reader.lookup(ip) is not None for ip in ips[::97])
        finally:
            reader.close()
        assert len(reads) >= 10 and reads.count(True) >= 9
        # The first burst is written at once, the rest once the watcher has caught up.
        assert len(stores[0].adds) <= 2
        assert sum(len(a) for a in stores[0].adds) == len(ips)
    finally:
        w.stop()
        th.join(10)
    assert not th.is_alive()



@pytest.mark.parametrize("enabled_before", [True, False])
def test_the_collector_waits_while_a_burst_is_matched_and_is_back_after(tmp_path: Path, enabled_before: bool) -> None:
    import gc
    settings = Settings(logfiles=(str(tmp_path / "mail.log"),), dbfile=str(tmp_path / "relayers.db"), grace=3600,
                        max_session=3600, skip_networks=(), readback=False, write=True, pattern_file="",
                        patterns=("dovecot",))
    w = Watcher(lambda: (settings, load_patterns(None, ["dovecot"])))
    seen: list[bool] = []
    real_scan = w.matcher.scan

    def scan(block: bytes, now: float) -> list[Event]:
        seen.append(gc.isenabled())
        return real_scan(block, now)

    w.matcher.scan = scan  # type: ignore[method-assign]
    collecting = gc.isenabled()
    try:
        if not enabled_before:
            gc.disable()
        w._start()
        appear(tmp_path, dovecot_line("192.0.2.7", time.time()))
        w._step()
        assert seen == [False]
        assert gc.isenabled() is enabled_before          # as it was: never enabled by the watcher
        assert w.store is not None and w.store.lookup("192.0.2.7") is not None
    finally:
        w.follower.close()
        if w.store is not None:
            w.store.close()
        for fd in (w._rfd, w._wfd):
            os.close(fd)
        if collecting:
            gc.enable()
