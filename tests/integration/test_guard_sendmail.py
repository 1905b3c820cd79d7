"""Relaying limits end to end: a real sendmail, the real watcher on a real Dovecot's log, the milter.

Dovecot logs alice's POP logins; relaymilter-popwatch (the installed
command) follows that log and records each login's address in relayers.db
and alice in relayers-users.db; sendmail asks the milter (the installed
command, on a unix socket) at every RCPT. With recipients_per_hour: 100
the 101st remote recipient of the hour gets 451 4.7.1 while local ones
still pass; alice seen from a third address within the hour
(addresses_per_hour: 2) is suspended: every address she was listed with
leaves relayers.db and her relaying is refused from all of them; lifting
the suspension (relaymilter-guard lift) and her next login restore it.
Warn-only mode: a stranger's relay attempt gets 250 and a "would reject"
line; a SIGHUP switching back enforces from the next transaction of the
same SMTP session.
"""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

import mta
from dovecot import DovecotServer, pop3_login
from milterproc import MilterProcess, ToolProcess
from relaymilter.store.bdb import read_items

pytestmark = pytest.mark.integration

LOCAL = ("local.test",)
LIMIT = (451, "4.7.1 Relaying limit exceeded, try again later")


def wait_for(what: str, cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %gs waiting for %s" % (timeout, what))
        time.sleep(0.02)


def listed(db: str) -> set[str]:
    return {k.decode() for k, _ in read_items(db)}


def denied(rcpt: str) -> tuple[int, str]:
    return (550, "5.7.1 %s... Relaying denied" % rcpt)


@pytest.fixture
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="rm-guard-", dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_pop_user_limited_suspended_and_lifted(base: Path, dovecot: DovecotServer, sendmail_factory) -> None:
    settings = {
        "local_domains": list(LOCAL),
        "popwatch": {"logfiles": [dovecot.log_path], "grace": 600, "skip_networks": ["127.0.0.1/32"]},
        "limits": {"recipients_per_hour": 100},
        "workers": 2,
    }
    milter = MilterProcess(base, settings).start()
    watcher = ToolProcess(["relaymilter-popwatch", "-c", str(milter.config_path)])
    guard = ["relaymilter-guard", "-c", str(milter.config_path)]
    try:
        wait_for("popwatch to follow the log", lambda: watcher.said("following ") or not watcher.running())
        assert watcher.running(), watcher.output()
        mx = sendmail_factory(milter_socket="unix:%s" % milter.sock_path, local_domains=LOCAL)
        db = milter.relayers_db

        pop3_login("127.0.0.7", dovecot.pop3_port)
        wait_for("127.0.0.7 in relayers.db", lambda: "127.0.0.7" in listed(db))
        remote = ["<friend%d@remote.example>" % i for i in range(101)]
        got = mta.rcpt_replies(mx.port, "127.0.0.7", "<alice@local.test>",
                               remote[:60] + ["<alice@local.test>"] + remote[60:] + ["<postmaster@local.test>"])
        assert [code for code, _ in got[:60] + got[61:101]] == [250] * 100
        assert got[60][0] == 250 and got[-1][0] == 250           # local recipients: never limited
        assert got[101] == LIMIT                # sendmail puts no "<addr>... " before a 4xx
        log = milter.wait_for_log("rule=recipients_per_hour")
        assert "pass: RCPT from [127.0.0.7]: from=<alice@local.test> to=<friend0@remote.example> " \
               "resolved=friend0@remote.example user=alice rule=relayers_db" in log
        assert "tempfail: RCPT from [127.0.0.7]: 451 4.7.1 <friend100@remote.example>" in log
        shown = subprocess.run(guard + ["list"], capture_output=True, text=True, timeout=30)
        assert shown.returncode == 0 and "alice recipients 100 100 at" in shown.stdout.splitlines()

        # Now three addresses within an hour is a stolen password's signature: suspend for 30 minutes.
        # (A lift of someone not suspended says so, exits 1, and starts the counts afresh.)
        settings["limits"] = {"recipients_per_hour": 100, "addresses_per_hour": 2, "suspend_minutes": 30}
        milter.write_config(settings)
        milter.hup()
        os.kill(watcher.proc.pid, signal.SIGHUP)
        wait_for("both workers to reload", lambda: milter.log().count("reloaded ") >= 2)
        wait_for("popwatch to reload", lambda: watcher.said("SIGHUP"))
        assert subprocess.run(guard + ["lift", "alice"], capture_output=True, timeout=30).returncode == 1
        pop3_login("127.0.0.8", dovecot.pop3_port)
        pop3_login("127.0.0.9", dovecot.pop3_port)
        wait_for("127.0.0.9 in relayers.db", lambda: {"127.0.0.7", "127.0.0.8", "127.0.0.9"} <= listed(db))
        assert mta.rcpt_replies(mx.port, "127.0.0.8", "<alice@local.test>", ["<x@remote.example>"])[0][0] == 250
        pop3_login("127.0.0.10", dovecot.pop3_port)
        wait_for("the suspension", lambda: watcher.said("suspended alice"))
        assert not {"127.0.0.7", "127.0.0.8", "127.0.0.9", "127.0.0.10"} & listed(db)
        for ip in ("127.0.0.7", "127.0.0.8", "127.0.0.9", "127.0.0.10"):
            assert mta.rcpt_replies(mx.port, ip, "<alice@local.test>", ["<x@remote.example>"]) == \
                [denied("<x@remote.example>")]
        shown = subprocess.run(guard + ["suspended"], capture_output=True, text=True, timeout=30)
        assert [line.split()[:2] + line.split()[3:] for line in shown.stdout.splitlines()
                if not line.startswith("#")] == [["alice", "suspended", "addresses_per_hour"]]

        # While suspended her logins are not recorded.
        pop3_login("127.0.0.7", dovecot.pop3_port)
        wait_for("the refused login", lambda: watcher.said("login of alice from 127.0.0.7 not recorded"))
        assert "127.0.0.7" not in listed(db)

        lifted = subprocess.run(guard + ["lift", "alice"], capture_output=True, text=True, timeout=30)
        assert lifted.returncode == 0, lifted.stderr
        pop3_login("127.0.0.7", dovecot.pop3_port)
        wait_for("127.0.0.7 in relayers.db again", lambda: "127.0.0.7" in listed(db))
        assert mta.rcpt_replies(mx.port, "127.0.0.7", "<alice@local.test>", ["<x@remote.example>"])[0][0] == 250
    finally:
        watcher.stop()
        milter.stop()


def test_warn_mode_then_sighup_enforces_from_the_next_transaction(base: Path, sendmail_factory) -> None:
    settings = {"local_domains": list(LOCAL), "modes": {"relay": "warn"}, "workers": 2}
    milter = MilterProcess(base, settings).start()
    try:
        mx = sendmail_factory(milter_socket="unix:%s" % milter.sock_path, local_domains=LOCAL)
        with smtplib.SMTP(timeout=30, source_address=("127.0.0.5", 0)) as smtp:
            smtp.connect("127.0.0.1", mx.port)
            smtp.ehlo("client.example.test")
            assert smtp.docmd("MAIL FROM:", "<someone@example.net>")[0] == 250
            assert smtp.docmd("RCPT TO:", "<bob@remote.example>")[0] == 250
            milter.wait_for_log("would reject: RCPT from [127.0.0.5]: 550 5.7.1 <bob@remote.example>: "
                                "Relaying denied; from=<someone@example.net> to=<bob@remote.example> "
                                "resolved=bob@remote.example rule=default_reject")
            milter.write_config({**settings, "modes": {"relay": "enforce"}})
            milter.hup()
            # Every worker has reloaded (the session may be on either).
            wait_for("both workers to reload", lambda: milter.log().count("reloaded ") >= 2)
            assert smtp.docmd("RSET")[0] == 250
            assert smtp.docmd("MAIL FROM:", "<someone@example.net>")[0] == 250
            code, text = smtp.docmd("RCPT TO:", "<bob@remote.example>")
            assert (code, text.decode()) == denied("<bob@remote.example>")
            assert smtp.docmd("RCPT TO:", "<alice@local.test>")[0] == 250
    finally:
        milter.stop()
