"""Benchmark relaymilter-popwatch: throughput on a large mail log, and login-to-map latency.

1. Two generated 1,000,000-line mail logs (about 128 MB each), 10% of the
   lines POP/IMAP logins of four servers (Dovecot with session ids, Courier
   with IPv4-mapped addresses, Cyrus, UW), the rest MTA traffic, failed
   logins and Dovecot logouts. The lines' times run over the four minutes
   before the run, so each repeated login of an address is a new time that
   must be written again (nothing is saved by identical timestamps).

     worst case   every one of the 100,000 logins is a new address
     realistic    the logins come from 5,000 client addresses, each logging
                  in again and again, as a POP server's clients do

   For each log:
     matcher only    Matcher.scan() over the log held in memory (1 MB blocks)
     full pipeline   the real Watcher in a thread (follower -> matcher ->
                     tracker -> relayers.db on Berkeley DB), following a log
                     path that does not exist yet; the log is renamed onto
                     that path and the clock stops when the log's last login
                     (a sentinel address) is visible in relayers.db, looked up
                     the way the milter does. INFO logging is off (at INFO
                     the watcher also logs one line per login).
   Each throughput figure is the best of RUNS runs (timeit's rule: on a
   shared machine, the slower runs measure the other tenants).
   Target: >= 500,000 lines/s for the matcher and for the realistic full
   pipeline. The worst case's full pipeline writes 100,000 new keys to
   relayers.db (and reads the growing map before each write); its figure is
   printed with the time spent in the store, and is not held to the target.
2. Latency: relaymilter-popwatch runs as a process following a log file;
   1,000 times a Dovecot login line for a new address is appended and the
   time until the address is visible in relayers.db is measured (polling
   the map as the milter would). Prints p50/p99. Target: p99 <= 50 ms.

The machine's load average is printed before and after: on a shared machine
the figures are noisy, run it a few times.

Run: python3 benchmarks/popwatch.py   (about 20-40 s; not part of the tests)
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Mapping, Optional

from relaymilter.domainsconfig import DEFAULT_TRUSTED, parse_network
from relaymilter.popwatch.matcher import Matcher
from relaymilter.popwatch.patterns import PatternSet, load_patterns
from relaymilter.popwatch.readback import read_file
from relaymilter.popwatch.recorder import DEFAULT_MAX_SESSION
from relaymilter.popwatch.service import Settings, Watcher
from relaymilter.store.relayers import BDBRelayStore

LINES = 1_000_000
CLIENTS = 5_000
SPAN = 240                  # seconds of log time the lines cover (inside the watcher's LIVE_SKEW)
LOGINS = 1000
RUNS = 2                    # throughput figures are the best of this many runs (the machine may be shared)
TARGET = 500_000
SENTINEL = "192.0.2.254"

NOISE = [
    b"%s mail postfix/smtpd[%d]: connect from unknown[203.0.113.%d]",
    b"%s mail postfix/smtpd[%d]: 4F1A2B3C%02X: client=unknown[203.0.113.%d]",
    b"%s mail postfix/cleanup[%d]: 4F1A2B3C%02X: message-id=<20241121.%d@example.net>",
    b"%s mail postfix/qmgr[%d]: 4F1A2B3C%02X: from=<sender@example.net>, size=%d, nrcpt=1 (queue active)",
    b"%s mail postfix/local[%d]: 4F1A2B3C%02X: to=<alice@example.com>, relay=local, delay=0.%d, delays=0.1/0/0/0,"
    b" dsn=2.0.0, status=sent (delivered to mailbox)",
    b"%s mail sm-mta[%d]: 4ALIsW%02X012345: from=<bob@example.org>, size=%d, class=0, nrcpts=1, proto=ESMTP,"
    b" daemon=MTA-v4, relay=mx.example.org [198.51.100.7]",
    b"%s mail postfix/smtpd[%d]: NOQUEUE: reject: RCPT from unknown[203.0.113.%d]: 554 5.7.1 <x@example.org>:"
    b" Relay access denied; from=<spam@example.net> to=<x@example.org> proto=ESMTP helo=<spam>",
    b"%s mail dovecot: pop3-login: Disconnected (auth failed, 1 attempts in 2 secs): user=<mallory>,"
    b" method=PLAIN, rip=203.0.113.%d, lip=192.0.2.1, session=<Zx9aBcDeFg%d>",
    b"%s mail dovecot: imap(alice)<%d><AbCdEf%d>: Disconnected: Logged out in=120 out=540",
    b"%s mail postfix/smtpd[%d]: disconnect from unknown[203.0.113.%d] ehlo=1 mail=1 rcpt=0/1 quit=1 commands=3/4",
]
LOGIN = [
    b"%s mail dovecot: pop3-login: Login: user=<u%d>, method=PLAIN, rip=10.%d.%d.%d, lip=192.0.2.1, mpid=%d,"
    b" session=<kP1x%d>",
    b"%s mail imapd-ssl: LOGIN, user=u%d, ip=[::ffff:10.%d.%d.%d], port=[%d], protocol=IMAP",
    b"%s mail cyrus/imap[%d]: login: client.example.com [10.%d.%d.%d] u%d plaintext User logged in",
    b"%s mail ipop3d[%d]: Login user=u%d host=client.example.com [10.%d.%d.%d] nmsgs=3/3",
]


def make_log(path: str, clients: Optional[int], now: float) -> tuple[int, int]:
    """Write the log; (logins, distinct addresses). clients=None: every login a new address."""
    stamps = [time.strftime("%b %d %H:%M:%S", time.localtime(now - SPAN + s)).encode() for s in range(SPAN + 1)]
    rnd = random.Random(5)
    pool = [rnd.randrange(1 << 20) for _ in range(clients)] if clients else []
    out = []
    seen = set()
    for i in range(LINES):
        stamp = stamps[i * SPAN // LINES]
        if i % 10 == 5:
            k = (i // 10) % len(LOGIN)
            n = pool[rnd.randrange(clients)] if clients else i
            seen.add(n)
            a, b, c = (n >> 16) & 15, (n >> 8) & 255, n & 255
            tpl = LOGIN[k]
            if k == 0:
                out.append(tpl % (stamp, i, a, b, c, i, i))
            elif k == 1:
                out.append(tpl % (stamp, i, a, b, c, i & 65535))
            elif k == 2:
                out.append(tpl % (stamp, i, a, b, c, i))
            else:
                out.append(tpl % (stamp, i, i, a, b, c))
        else:
            tpl = NOISE[i % len(NOISE)]
            out.append(tpl % ((stamp, i & 65535, i & 255, i)[:tpl.count(b"%")]))
    # The last line (otherwise MTA noise): a login the pipeline run waits for.
    out[-1] = b"%s mail dovecot: pop3-login: Login: user=<last>, method=PLAIN, rip=%s, lip=192.0.2.1" % (
        stamps[-1], SENTINEL.encode())
    with open(path, "wb") as fh:
        fh.write(b"\n".join(out) + b"\n")
    return LINES // 10 + 1, len(seen) + 1


def matcher_only(path: str, patterns: PatternSet) -> float:
    blocks = list(read_file(path))
    best = float("inf")
    for _ in range(RUNS):
        matcher = Matcher(patterns)
        now = time.time()
        t0 = time.perf_counter()
        for block in blocks:
            matcher.scan(block, now)
        best = min(best, time.perf_counter() - t0)
    return LINES / best


class TimedStore(BDBRelayStore):
    """relayers.db on Berkeley DB, counting the time spent in it."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.writes = self.written = 0
        self.spent = {"add": 0.0, "read": 0.0}

    def add(self, entries: Mapping[str, int], ttl: Optional[int] = None) -> None:
        t0 = time.perf_counter()
        super().add(entries, ttl)
        self.spent["add"] += time.perf_counter() - t0
        self.writes += 1
        self.written += len(entries)

    def lookup(self, ip: str) -> Optional[int]:
        t0 = time.perf_counter()
        try:
            return super().lookup(ip)
        finally:
            self.spent["read"] += time.perf_counter() - t0

    def entries(self) -> list[tuple[str, int]]:
        t0 = time.perf_counter()
        try:
            return super().entries()
        finally:
            self.spent["read"] += time.perf_counter() - t0


def pipeline(tmp: str, src: str, label: str, patterns: PatternSet) -> tuple[float, str]:
    """Lines/s of the real watcher on *src* (best of RUNS, each on a new map), and where the time went."""
    return max(one_pipeline(tmp, src, "%s-%d" % (label, run), patterns) for run in range(RUNS))


def one_pipeline(tmp: str, src: str, label: str, patterns: PatternSet) -> tuple[float, str]:
    path = os.path.join(tmp, "follow-%s.log" % label)
    settings = Settings(logfiles=(path,), dbfile=os.path.join(tmp, "%s.db" % label), grace=3600,
                        max_session=DEFAULT_MAX_SESSION, skip_networks=tuple(parse_network(n) for n in DEFAULT_TRUSTED),
                        readback=False, write=True, pattern_file=patterns.source, patterns=patterns.names)
    stores: list[TimedStore] = []

    def factory(location: str) -> TimedStore:
        stores.append(TimedStore(location))
        return stores[-1]

    watcher = Watcher(lambda: (settings, patterns), store_factory=factory)
    thread = threading.Thread(target=watcher.run, kwargs={"install_signals": False}, daemon=True)
    thread.start()
    reader = BDBRelayStore(settings.dbfile)
    try:
        if not watcher.started.wait(30):
            raise SystemExit("pipeline: the watcher did not start")
        t0 = time.perf_counter()
        os.link(src, path)          # the log appears whole, as after a rotation
        deadline = t0 + 300
        while reader.lookup(SENTINEL) is None:
            if time.perf_counter() > deadline or not thread.is_alive():
                raise SystemExit("pipeline (%s): %s never reached relayers.db" % (label, SENTINEL))
            time.sleep(0.005)
        elapsed = time.perf_counter() - t0
    finally:
        watcher.stop()
        thread.join(30)
        reader.close()
    store = stores[0]
    spent = sum(store.spent.values())
    note = ("%d writes of %d entries in all; %.2f s of %.2f s in relayers.db (writes %.2f s, reads %.2f s),"
            " %.0f lines/s without it" % (store.writes, store.written, spent, elapsed, store.spent["add"],
                                          store.spent["read"], LINES / max(elapsed - spent, 1e-9)))
    return LINES / elapsed, note


def throughput(tmp: str) -> list[tuple[str, float]]:
    patterns = load_patterns()
    results = []
    for label, clients in (("worst case", None), ("realistic", CLIENTS)):
        key = label.replace(" ", "-")
        src = os.path.join(tmp, "maillog-%s" % key)
        logins, distinct = make_log(src, clients, time.time())
        size = os.path.getsize(src) / 1e6
        rate = matcher_only(src, patterns)
        print("%-10s (%d lines, %.0f MB, %d logins from %d addresses)" % (label, LINES, size, logins, distinct))
        print("    matcher only:  %9.0f lines/s  (best of %d)" % (rate, RUNS))
        results.append(("%s, matcher only" % label, rate))
        rate, note = pipeline(tmp, src, key, patterns)
        print("    full pipeline: %9.0f lines/s  (best of %d)\n        (%s)" % (rate, RUNS, note))
        results.append(("%s, full pipeline" % label, rate))
    return results


def latency(tmp: str) -> tuple[float, float]:
    log = os.path.join(tmp, "live.log")
    db = os.path.join(tmp, "latency.db")
    cfg = os.path.join(tmp, "popwatch.yaml")
    open(log, "wb").close()
    with open(cfg, "w", encoding="utf-8") as fh:
        fh.write("relayers: {path: %s}\npopwatch: {logfiles: [%s], grace: 3600, skip_networks: []}\n" % (db, log))
    exe = shutil.which("relaymilter-popwatch")
    cmd = [exe] if exe else [sys.executable, "-m", "relaymilter.cli.popwatch"]
    errlog = open(os.path.join(tmp, "popwatch.stderr"), "w+", encoding="utf-8")
    proc = subprocess.Popen(cmd + ["-c", cfg], stderr=errlog, text=True)
    try:
        deadline = time.monotonic() + 30
        while "following" not in open(errlog.name, encoding="utf-8").read():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("latency: relaymilter-popwatch did not start")
            time.sleep(0.01)
        store = BDBRelayStore(db)
        samples = []
        with open(log, "ab", buffering=0) as fh:
            for i in range(LOGINS):
                ip = "10.200.%d.%d" % (i >> 8, i & 255)
                stamp = time.strftime("%b %d %H:%M:%S").encode()
                line = b"%s mail dovecot: pop3-login: Login: user=<u%d>, method=PLAIN, rip=%s, lip=192.0.2.1\n" % (
                    stamp, i, ip.encode())
                t0 = time.perf_counter()
                fh.write(line)
                deadline = t0 + 2.0
                while store.lookup(ip) is None:
                    if time.perf_counter() > deadline:
                        raise SystemExit("latency: %s not visible after 2 s" % ip)
                    time.sleep(0.0002)
                samples.append(time.perf_counter() - t0)
        store.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        errlog.close()
    samples.sort()
    p50 = samples[len(samples) // 2] * 1000
    p99 = samples[int(len(samples) * 0.99) - 1] * 1000
    print("latency: %d logins, line appended -> address in relayers.db: p50 %.1f ms, p99 %.1f ms, max %.1f ms"
          "  [target p99 <= 50 ms]" % (len(samples), p50, p99, samples[-1] * 1000))
    return p50, p99


def main() -> int:
    logging.getLogger("relaymilter").setLevel(logging.WARNING)
    print("load average before: %.2f %.2f %.2f" % os.getloadavg())
    tmp = tempfile.mkdtemp(prefix="popwatch-bench-")
    try:
        results = throughput(tmp)
        _p50, p99 = latency(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("load average after:  %.2f %.2f %.2f" % os.getloadavg())
    # The worst case's full pipeline writes 100,000 new keys into relayers.db and reads the growing
    # map back before each write: its figure is shown with the store's share, and not held to the target.
    held = [(label, rate) for label, rate in results if label != "worst case, full pipeline"]
    missed = [label for label, rate in held if rate < TARGET]
    print("target >= %d lines/s (matcher on both logs, full pipeline on the realistic one): %s" % (
        TARGET, "met" if not missed else "missed by " + "; ".join(missed)))
    return 0 if not missed and p99 <= 50 else 1


if __name__ == "__main__":
    sys.exit(main())
