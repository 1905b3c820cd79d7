#!/usr/bin/env python3
"""Sessions/s through a real Postfix, alone and with relaymilter on a unix and on an inet socket.

    python3 benchmarks/postfix.py [--messages 1000] [--rounds 5] [--concurrency 8] [--entries 100000]

Method: three private Postfix instances from Debian's unpacked package
(tests/integration/postfix.py; loopback only, nothing delivered: the discard
transport), run at the same time:

    alone        Postfix does POP-before-SMTP itself, no milter: the relay
                 restriction of packaging/postfix/main.cf.snippet-b
                 (check_client_access hash:relayers) and no smtpd_milters
    milter unix  packaging/postfix/main.cf.snippet (variant A) verbatim, relaymilter
                 on unix:relaymilter/relaymilter.sock (under the queue directory)
    milter inet  the same snippet, relaymilter on inet:127.0.0.1:PORT

Each relaymilter is a real process (tests/integration/milterproc.py) on the
same configuration. Workload: Postfix's own load generator, smtp-source from
the same package, keeps --concurrency sessions open at a time; each session
is EHLO, MAIL, one RCPT to a remote domain, DATA with a 1 kB message, QUIT
(one message per session). The client, 127.0.0.1, is not in mynetworks nor in
relaymilter's trusted_networks: it may relay because it is in relayers.db,
which holds --entries addresses, so Postfix (alone) and relaymilter make the
POP-before-SMTP lookup each session. (The client address is always the same:
relaymilter's per-client memo and answer cache are warm, Postfix's map pages
cached; what this measures is the MTA-milter round trips per session, not the
map.) After every round the benchmark checks that Postfix took every
message (smtp-source exits non-zero on any refusal) and, at the end, that
each instance delivered all of them to the REMOTE discard tag and each
relaymilter logged a pass decision for every recipient.

The rounds are interleaved (alone, unix, inet, then rotated) so that load
from other tenants of a shared machine hits all three alike; per-round
ratios are printed, their spread shows the noise. Figures: sessions/s per
round (messages / wall time of smtp-source), the median over rounds, the
median of the per-round ratios of each milter variant to Postfix alone
(target >= 0.8), and CPU milliseconds per session of Postfix (every process
of the instance, reaped ones included), relaymilter (supervisor and workers)
and the client: the figure least disturbed by other tenants, and the one
that sets the ratio when the machine is CPU-bound. The load average before
and after is printed with the core count. Takes about
3 x rounds x messages / rate seconds, plus ~15 s of set-up.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "integration"))
sys.path.insert(0, str(HERE.parent / "milter"))

import mta  # noqa: E402
import postfix  # noqa: E402
from milterproc import MilterProcess  # noqa: E402

CLIENT = "127.0.0.1"
RCPT = "bob@remote.example"
SENDER = "pop-user@example.net"
VARIANTS = ("alone", "milter unix", "milter inet")


def fill_relayers(path: str, entries: int) -> None:
    """relayers.db with *entries* addresses (10.x.y.z) plus the benchmark's client."""
    from relaymilter.store.relayers import BDBRelayStore

    now = int(time.time())
    batch = {"10.%d.%d.%d" % (i >> 16 & 255, i >> 8 & 255, i & 255): now for i in range(entries)}
    batch[CLIENT] = now
    BDBRelayStore(path).add(batch)


class Instance:
    def __init__(self, name: str, base: Path, db: str) -> None:
        self.name = name
        self.dir = base / name.replace(" ", "-")
        self.dir.mkdir(mode=0o755)
        self.milter = None
        settings = {"mynetworks": "127.0.0.2/32"}
        if name == "alone":
            wiring = ("smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated, "
                      "permit_auth_destination, check_client_access hash:%s, defer_unauth_destination\n" % db[:-3])
        else:
            queue = self.dir / "queue"
            if name.endswith("unix"):
                sockdir = queue / "relaymilter"
                sockdir.mkdir(parents=True)
                os.chown(sockdir, 0, postfix.ensure_accounts()[1])
                os.chmod(sockdir, 0o2750)
                spec, pf_spec = "unix:%s/relaymilter.sock" % sockdir, "unix:relaymilter/relaymilter.sock"
            else:
                port = mta.free_port()
                spec, pf_spec = "inet:%d@127.0.0.1" % port, "inet:127.0.0.1:%d" % port
            self.milter = MilterProcess(self.dir / "milter", {
                "mta": "postfix", "local_domains": ["local.test", "localhost"], "relay_domains": ["relayed.test"],
                "trusted_networks": ["127.0.0.2/32"], "relayers": {"path": db}}, socket_spec=spec, umask=0o007)
            wiring = postfix.snippet("a", milter=pf_spec)
        self.pf = postfix.Postfix(self.dir, mta.free_port(), wiring=wiring, settings=settings)

    def start(self) -> None:
        if self.milter is not None:
            self.milter.start()
        self.pf.start()

    def stop(self) -> None:
        self.pf.stop()
        if self.milter is not None:
            self.milter.stop()

    def run(self, messages: int, concurrency: int) -> float:
        """smtp-source: *messages* sessions, one message each; wall seconds."""
        argv = [str(self.pf.root / "usr/sbin/smtp-source"), "-s", str(concurrency), "-m", str(messages),
                "-l", "1024", "-f", SENDER, "-t", RCPT, "-M", "client.example.test", "127.0.0.1:%d" % self.pf.port]
        start = time.perf_counter()
        proc = subprocess.run(argv, env=self.pf.env, capture_output=True, text=True, timeout=600)
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit("%s: smtp-source failed (%d): %s" % (self.name, proc.returncode, proc.stderr[-2000:]))
        return elapsed

    def cpu(self) -> tuple[float, float]:
        """CPU seconds so far of (Postfix, relaymilter): live processes plus the reaped children
        their parents collected (the master reaps every Postfix daemon)."""
        tick = os.sysconf("SC_CLK_TCK")

        def tree(pids: list[int]) -> float:
            total = 0
            for pid in pids:
                fields = _stat(pid)
                if fields is not None:
                    total += sum(int(x) for x in fields[11:15])     # utime stime cutime cstime
            return total / tick

        milter = 0.0
        if self.milter is not None and self.milter.proc is not None:
            milter = tree([self.milter.pid, *descendants(self.milter.pid)])
        return tree(mta.session_members(self.pf.pid) if self.pf.pid else []), milter

    def delivered(self) -> int:
        return self.pf.log().count("status=sent (REMOTE)")


def _stat(pid: int) -> list[str] | None:
    try:
        with open("/proc/%d/stat" % pid, encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        try:
            kids = [int(k) for k in Path("/proc/%d/task/%d/children" % (todo[0], todo[0])).read_text().split()]
        except OSError:
            kids = []
        todo = todo[1:] + kids
        found += kids
    return found


def client_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=1000, help="sessions per round per variant")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--entries", type=int, default=100000, help="addresses in relayers.db")
    args = ap.parse_args(argv)

    base = postfix.short_rundir("rm-pfb-")
    db = str(base / "relayers.db")
    fill_relayers(db, args.entries)
    instances = [Instance(name, base, db) for name in VARIANTS]
    load_before = os.getloadavg()
    try:
        for inst in instances:
            inst.start()
        for inst in instances:          # warm-up: every process started, maps opened
            inst.run(min(100, args.messages), args.concurrency)
        rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
        cpu: dict[str, list[float]] = {name: [0.0, 0.0, 0.0] for name in VARIANTS}   # postfix, milter, client
        for r in range(args.rounds):
            order = instances[r % 3:] + instances[:r % 3]
            for inst in order:
                before, c_before = inst.cpu(), client_cpu()
                rates[inst.name].append(args.messages / inst.run(args.messages, args.concurrency))
                after, c_after = inst.cpu(), client_cpu()
                acc = cpu[inst.name]
                acc[0] += after[0] - before[0]
                acc[1] += after[1] - before[1]
                acc[2] += c_after - c_before
            print("round %d: %s" % (r + 1, "  ".join("%s %.0f/s" % (n, rates[n][-1]) for n in VARIANTS)),
                  flush=True)
        expected = args.rounds * args.messages + min(100, args.messages)
        for inst in instances:
            mta.wait_until(lambda inst=inst: inst.delivered() >= expected, 120, "%s deliveries" % inst.name)
            if inst.milter is not None:     # the milter really decided every session
                mta.wait_until(lambda inst=inst: inst.milter.log().count("pass: RCPT") >= expected, 30,
                               "%s decision lines" % inst.name)
    finally:
        for inst in instances:
            inst.stop()
        shutil.rmtree(base, ignore_errors=True)
    load_after = os.getloadavg()

    sessions = args.rounds * args.messages
    print()
    print("Postfix %s, %d sessions/round x %d rounds, %d concurrent, one 1 kB message per session, "
          "relayers.db %d entries" % (postfix.package_version(), args.messages, args.rounds, args.concurrency,
                                      args.entries))
    print("machine: %d cores, load average %.2f before, %.2f after" % (os.cpu_count() or 0, load_before[0],
                                                                       load_after[0]))
    print("%-12s %11s %9s  %-36s %s" % ("variant", "sessions/s", "x alone", "per-round ratio to alone",
                                         "CPU ms/session: postfix milter client"))
    ratios = {}
    for name in VARIANTS:
        per_round = [x / a for x, a in zip(rates[name], rates["alone"])]
        ratios[name] = statistics.median(per_round)
        ms = ["%.2f" % (1000 * c / sessions) for c in cpu[name]]
        print("%-12s %11.0f %9.2f  %-36s %s" % (name, statistics.median(rates[name]), ratios[name],
                                                " ".join("%.2f" % x for x in per_round), "  ".join(ms)))
    print("(x alone: the median of the per-round ratios; sessions/s: the median round)")
    for name in VARIANTS[1:]:
        print("target >= 0.80 x alone, %s: %s (%.2f)" % (name, "met" if ratios[name] >= 0.8 else "MISSED",
                                                         ratios[name]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
