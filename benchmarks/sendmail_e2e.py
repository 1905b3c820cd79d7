#!/usr/bin/env python3
"""End to end through a real sendmail: relaymilter deciding, against sendmail deciding natively from the same map.

    python3 benchmarks/sendmail_e2e.py [--clients 1000] [--entries 100000] [--concurrency 8]
                                       [--seconds 12] [--rounds 6] [--workers auto]

Two private sendmail daemons on loopback (tests/integration/mta.py), both reading one
relayers.db:

  milter    FEATURE(`promiscuous_relay') and relaymilter (workers --workers) on a unix
            socket, wired with the shipped packaging/sendmail/relaymilter.m4: the milter
            makes every relay decision
  native    no milter; sendmail's own check_rcpt, with FEATURE(`drac') declaring the
            map (`Kdrac hash -o relayers') that its Local_check_rcpt consults for the
            client's address: sendmail decides alone

Each of --concurrency client processes runs SMTP sessions back to back, each from the
next of --clients loopback addresses (127.1.x.y; every other one is in relayers.db,
among --entries entries): EHLO, MAIL, three RCPT (one local, two remote), QUIT. Every
reply is checked: a listed client gets 250 for all three, an unlisted one 250 for the
local recipient and 550 for the remote ones. The two daemons are loaded one at a time in
interleaved rounds (order alternating), so load from other tenants hits both alike;
sendmail's load-average limits (RefuseLA, QueueLA) are switched off in both.
Prints sessions/s per daemon (median of the rounds and their range), the per-round
ratio milter/native (median and range), and the target (>= 0.9). Exit 1 on a wrong reply.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import smtplib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, List, Optional, Sequence

from _common import finish, interleaved
import mta  # test helpers (tests/integration/), on sys.path through _common
from milterproc import MilterProcess

from relaymilter.store.relayers import BDBRelayStore

LOCAL, REMOTE = "alice@local.test", "friend%d@remote.example"
# sendmail refuses connections above a load average of 12 and queues above 8 by default: on a
# shared machine that, not the milter, would set the pace. Both daemons get the same lines.
NO_LOAD_LIMITS = ["define(`confREFUSE_LA', `10000')dnl", "define(`confQUEUE_LA', `10000')dnl",
                  "define(`confDELAY_LA', `0')dnl", "define(`confMAX_DAEMON_CHILDREN', `0')dnl"]


def client_address(i: int) -> str:
    """The i-th client, 127.1.1.1 onwards (no .0 or .255 octet); distinct for every i < 64516."""
    return "127.1.%d.%d" % (i // 254 + 1, i % 254 + 1)


def session(port: int, ip: str, listed: bool, n: int) -> Optional[str]:
    """One SMTP session; None when every reply was the expected one, else what went wrong."""
    want = [250, 250 if listed else 550, 250 if listed else 550]
    try:
        with smtplib.SMTP(timeout=30, source_address=(ip, 0)) as smtp:
            smtp.connect("127.0.0.1", port)
            smtp.ehlo("client%d.example" % n)
            code, _ = smtp.docmd("MAIL FROM:", "<sender%d@client.example>" % n)
            if code != 250:
                return "MAIL from %s: %d" % (ip, code)
            got = [smtp.docmd("RCPT TO:", "<%s>" % r)[0] for r in (LOCAL, REMOTE % n, REMOTE % (n + 1))]
            smtp.docmd("QUIT")
    except (OSError, smtplib.SMTPException) as exc:
        return "session from %s: %s" % (ip, exc)
    return None if got == want else "RCPTs from %s (listed %s): %s, want %s" % (ip, listed, got, want)


def client_loop(port: int, first: int, step: int, clients: int, start_at: float, end_at: float, out: Any) -> None:
    time.sleep(max(0.0, start_at - time.time()))
    done, failed, wrong, i = 0, 0, [], first
    while time.time() < end_at:
        problem = session(port, client_address(i % clients), i % clients % 2 == 0, i)
        if problem is None:
            done += 1
        else:
            failed += 1
            if len(wrong) < 5:
                wrong.append(problem)
        i += step
    out.send((done, failed, wrong))
    out.close()


def run_round(port: int, opts: argparse.Namespace, seconds: float, offset: int) -> tuple[float, int, List[str]]:
    """SMTP sessions from opts.concurrency client processes for *seconds*: (sessions/s, failed, the first problems)."""
    ctx = multiprocessing.get_context("fork")
    start_at = time.time() + 0.3
    end_at = start_at + seconds
    procs, pipes = [], []
    for k in range(opts.concurrency):
        recv_end, send_end = ctx.Pipe(duplex=False)
        p = ctx.Process(target=client_loop, daemon=True,
                        args=(port, offset + k, opts.concurrency, opts.clients, start_at, end_at, send_end))
        p.start()
        send_end.close()
        procs.append(p)
        pipes.append(recv_end)
    total, failed, wrong = 0, 0, []
    for p, pipe in zip(procs, pipes):
        if not pipe.poll(seconds + 60):
            raise SystemExit("sendmail_e2e: error: a client process did not report in time")
        done, bad, shown = pipe.recv()
        total += done
        failed += bad
        wrong += shown
        p.join(10)
    return total / (time.time() - start_at), failed, wrong


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sendmail_e2e", description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=1000, help="client addresses, half listed (default 1000)")
    p.add_argument("--entries", type=int, default=100_000, help="relayers.db entries (default 100000)")
    p.add_argument("--concurrency", type=int, default=8, help="concurrent SMTP clients (default 8)")
    p.add_argument("--seconds", type=float, default=12.0, help="measured seconds per daemon (default 12)")
    p.add_argument("--rounds", type=int, default=6, help="interleaved rounds (default 6)")
    p.add_argument("--workers", default="auto", help="relaymilter workers (default auto)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    opts = build_parser().parse_args(argv)
    if min(opts.clients, opts.concurrency, opts.rounds) < 1 or opts.clients > 64516 or opts.seconds <= 0:
        sys.stderr.write("sendmail_e2e: error: bad --clients, --concurrency, --rounds or --seconds\n")
        return 2
    work = Path(tempfile.mkdtemp(prefix="rm-e2e-", dir="/tmp"))
    os.chmod(work, 0o755)
    relayers = work / "relayers.db"
    listed = {client_address(i): int(time.time()) for i in range(0, opts.clients, 2)}
    filler = {"10.%d.%d.%d" % (i >> 16 & 255, i >> 8 & 255, i & 255): int(time.time())
              for i in range(max(0, opts.entries - len(listed)))}
    BDBRelayStore(str(relayers)).add({**filler, **listed})
    milter = MilterProcess(work / "milter", {"local_domains": ["local.test"], "workers": opts.workers,
                                             "relayers": {"path": str(relayers)}})
    daemons: list = []
    wrong: List[str] = []
    failed = 0
    rates: dict[str, List[float]] = {"milter": [], "native": []}
    try:
        milter.start()
        with_milter = mta.Sendmail(work / "sm-milter", mta.free_port(), milter_socket="unix:%s" % milter.sock_path,
                                   local_domains=("local.test",), extra_mc_lines=NO_LOAD_LIMITS)
        native = mta.Sendmail(work / "sm-native", mta.free_port(), local_domains=("local.test",), promiscuous=False,
                              extra_mc_lines=[*NO_LOAD_LIMITS,
                                              "FEATURE(`drac', `hash -o %s')dnl" % str(relayers)[:-3]])
        for name, mx in (("milter", with_milter), ("native", native)):
            (work / ("sm-" + name)).mkdir(exist_ok=True)
            mx.start()
            daemons.append(mx)
        print("workload: %d concurrent SMTP clients, %d client addresses (half listed), %d-entry relayers.db, "
              "EHLO/MAIL/3 RCPT/QUIT; relaymilter workers=%s; %d CPUs, load average %.2f"
              % (opts.concurrency, opts.clients, opts.entries, opts.workers, os.cpu_count() or 0,
                 os.getloadavg()[0]))
        for _, mx in (("milter", with_milter), ("native", native)):      # warm-up, unmeasured
            run_round(mx.port, opts, 1.0, 0)
        order = [("milter", with_milter), ("native", native)]
        for r, (name, mx) in interleaved(order, opts.rounds):
            rate, bad, shown = run_round(mx.port, opts, opts.seconds / opts.rounds, r * 7919)
            rates[name].append(rate)
            failed += bad
            wrong += shown
    finally:
        for mx in daemons:
            mx.stop()
        milter.stop()
    ratios = [a / b for a, b in zip(rates["milter"], rates["native"])]
    for name in ("milter", "native"):
        print("%-7s %7.1f sessions/s (rounds %s)" % (name, statistics.median(rates[name]),
                                                    " ".join("%.0f" % x for x in rates[name])))
    ratio = statistics.median(ratios)
    print("milter/native per round: %s; median %.2f (target >= 0.90: %s); load average now %.2f"
          % (" ".join("%.2f" % x for x in ratios), ratio, "met" if ratio >= 0.9 else "MISSED", os.getloadavg()[0]))
    return finish(failed, wrong, work)


if __name__ == "__main__":
    sys.exit(main())
