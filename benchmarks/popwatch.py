"""Benchmark relaymilter-popwatch: matcher throughput and login-to-map latency.

1. Throughput: a 1,000,000-line mixed maillog (10% POP/IMAP logins of several
   servers, the rest MTA traffic, failed logins and logouts) is generated in
   a temp dir, then read through the real pipeline: LineBuffer -> Matcher ->
   Tracker, flushing every block into a real relayers.db. Prints lines/s.
   Target: >= 500,000 lines/s.
2. Latency: relaymilter-popwatch runs as a process following a log file;
   1,000 times a Dovecot login line for a new address is appended and the
   time until the address is visible in relayers.db is measured (polling
   the map as the milter would). Prints p50/p99. Target: p99 <= 50 ms.

Run: python3 benchmarks/popwatch.py   (about 20-40 s; not part of the tests)
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from relaymilter.popwatch.matcher import Matcher
from relaymilter.popwatch.patterns import load_patterns
from relaymilter.popwatch.readback import read_file
from relaymilter.popwatch.recorder import Tracker
from relaymilter.store.relayers import BDBRelayStore

LINES = 1_000_000
LOGINS = 1000

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


def make_log(path: str) -> None:
    stamp = time.strftime("%b %d %H:%M:%S", time.localtime()).encode()
    out = []
    for i in range(LINES):
        if i % 10 == 5:
            k = (i // 10) % len(LOGIN)
            a, b, c = (i >> 16) & 15, (i >> 8) & 255, i & 255
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
    with open(path, "wb") as fh:
        fh.write(b"\n".join(out) + b"\n")


def throughput(tmp: str) -> float:
    log = os.path.join(tmp, "maillog")
    make_log(log)
    blocks = list(read_file(log))
    matcher = Matcher(load_patterns())
    t0 = time.perf_counter()
    found = 0
    for block in blocks:
        found += len(matcher.scan(block, time.time()))
    bare = time.perf_counter() - t0
    del blocks
    print("matcher alone: %.0f lines/s (%d events)" % (LINES / bare, found))
    store = BDBRelayStore(os.path.join(tmp, "throughput.db"))
    matcher = Matcher(load_patterns())
    tracker = Tracker(store, grace=3600)
    lines = 0
    t0 = time.perf_counter()
    for block in read_file(log):
        lines += block.count(b"\n")
        now = time.time()
        for ev in matcher.scan(block, now):
            tracker.handle(ev, now)
        tracker.flush(now)
    elapsed = time.perf_counter() - t0
    store.close()
    rate = lines / elapsed
    print("throughput: %d lines (%.0f MB, %d logins) in %.2f s = %.0f lines/s  [target >= 500000]" % (
        lines, os.path.getsize(log) / 1e6, tracker.stats["logins"], elapsed, rate))
    return rate


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
    tmp = tempfile.mkdtemp(prefix="popwatch-bench-")
    try:
        rate = throughput(tmp)
        _p50, p99 = latency(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if rate >= 500_000 and p99 <= 50 else 1


if __name__ == "__main__":
    sys.exit(main())
