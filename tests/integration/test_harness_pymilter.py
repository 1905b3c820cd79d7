"""The harness against real pymilter/libmilter milters started as subprocesses.

The milters (tests/data/pymilter_milters.py) listen on unix sockets under a
short /tmp directory (libmilter's path limit is about 100 characters) and are
stopped with SIGKILL by PID: a pymilter process takes ~5 s to exit on SIGTERM.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from relaymilter.harness import MilterSession, SessionSpec, run_session
from relaymilter.harness import protocol as P
from relaymilter.harness.reply import AddHeader, AddRcpt, ChgFrom, ChgHeader, DelRcpt, InsHeader, Quarantine, ReplBody

from milterproc import unix_listening

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

MILTERS = Path(__file__).resolve().parent.parent / "data" / "pymilter_milters.py"
START_LIMIT = 20.0


def start_pymilter(kind: str) -> Iterator[str]:
    rundir = tempfile.mkdtemp(prefix="rmh", dir="/tmp")
    sock = os.path.join(rundir, "m.sock")
    errlog = open(os.path.join(rundir, "stderr"), "w+b")
    proc = subprocess.Popen([sys.executable, str(MILTERS), kind, "unix:" + sock],
                            stdin=subprocess.DEVNULL, stdout=errlog, stderr=errlog)
    try:
        deadline = time.monotonic() + START_LIMIT
        while not unix_listening(sock):
            if proc.poll() is not None:
                errlog.seek(0)
                pytest.fail("pymilter %s exited with %s: %s" % (kind, proc.returncode, errlog.read().decode()))
            if time.monotonic() > deadline:
                pytest.fail("pymilter %s: no socket after %ss" % (kind, START_LIMIT))
            time.sleep(0.02)
        yield "unix:" + sock
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        errlog.close()
        shutil.rmtree(rundir, ignore_errors=True)


@pytest.fixture(scope="module")
def relaydeny() -> Iterator[str]:
    yield from start_pymilter("relaydeny")


@pytest.fixture(scope="module")
def echo() -> Iterator[str]:
    yield from start_pymilter("echo")


@pytest.fixture(scope="module")
def fromreply() -> Iterator[str]:
    yield from start_pymilter("fromreply")


def test_declined_steps_and_full_reply_texts(relaydeny) -> None:
    result = run_session(relaydeny, SessionSpec(
        client="192.0.2.10", helo="client.example", mail_from="<alice@example.net>",
        rcpts=["<bob@remote.example>", "<busy@example.com>", "<plain@example.com>", "<carol@example.com>"],
        headers=[("Subject", "hello")], body="hi\n"), timeout=10)
    assert result.error is None, result.error
    got = [(s.label, s.answer, s.reply.sent) for s in result]
    assert got == [
        ("CONNECT 192.0.2.10", "continue", True),
        ("HELO client.example", "continue", False),
        ("MAIL <alice@example.net>", "continue", False),
        ("RCPT <bob@remote.example>", "550 5.7.1 Relaying denied", True),
        ("RCPT <busy@example.com>", "451 4.3.0 Try again later", True),
        ("RCPT <plain@example.com>", "reject", True),
        ("RCPT <carol@example.com>", "continue", True),
        ("DATA", "continue", False),
        ("HEADER Subject: hello", "continue", False),
        ("EOH", "continue", False),
        ("BODY 4 bytes", "continue", False),
        ("EOM", "continue", True),
    ]
    rejected = result[3].reply
    assert (rejected.action, rejected.code, rejected.xcode, rejected.text) == (
        "reject", "550", "5.7.1", "Relaying denied")
    assert result[4].reply.action == "tempfail"


def test_pymilter_negotiates_what_it_does_not_override(relaydeny) -> None:
    with MilterSession(relaydeny, timeout=10) as s:
        declined = s.negotiated.protocol
        assert s.connect("127.0.0.5").action == "continue"
    for flag in (P.SMFIP_NOHELO, P.SMFIP_NOMAIL, P.SMFIP_NODATA, P.SMFIP_NOHDRS, P.SMFIP_NOEOH, P.SMFIP_NOBODY):
        assert declined & flag, hex(flag)
    assert not declined & (P.SMFIP_NOCONNECT | P.SMFIP_NORCPT)


def test_everything_overridden_sees_exactly_what_we_sent(echo) -> None:
    result = run_session(echo, SessionSpec(
        client="127.0.0.5", helo="client.example", auth="alice", mail_from="alice@example.com",
        rcpts=["<bob@remote.example>", "dropped@example.com"],
        headers=[("Subject", "hello"), ("To", "bob")], body="line one\nline two\n"), timeout=10)
    assert result.error is None, result.error
    assert all(s.reply.sent and s.reply.awaited and s.answer == "continue" for s in result)
    eom = result[-1].reply
    seen = {m.name: m.value for m in eom.modifications if isinstance(m, AddHeader)}
    assert seen["X-Seen-Connect"] == "[127.0.0.5] 2 ('127.0.0.5', 0)"
    assert seen["X-Seen-Helo"] == "client.example"
    assert seen["X-Seen-From"] == "<alice@example.com>"  # with angle brackets, as sendmail passes it
    assert seen["X-Seen-From-Macros"] == "auth_authen=alice auth_type=PLAIN mail_addr=alice@example.com i=True"
    assert seen["X-Seen-Rcpts"] == (
        "<bob@remote.example> rcpt_addr=bob@remote.example rcpt_host=remote.example. rcpt_mailer=esmtp | "
        "<dropped@example.com> rcpt_addr=dropped@example.com rcpt_host=example.com. rcpt_mailer=esmtp")
    assert seen["X-Seen-Content"] == "headers=2 body=20"   # CRLF line ends: 2 x (8 + 2)
    assert seen["X-Seen-Connect-Macros"].startswith("j=")
    assert "daemon_name=MTA client_addr=127.0.0.5 client_name=[127.0.0.5]" in seen["X-Seen-Connect-Macros"]
    # Every modification libmilter can send, decoded in order.
    rest = [m for m in eom.modifications if not (isinstance(m, AddHeader) and m.name.startswith("X-Seen"))]
    assert rest == [
        InsHeader(0, "X-Inserted", "first"),
        ChgHeader(1, "Subject", "changed"),
        AddRcpt("<added@example.com>"),
        DelRcpt("<dropped@example.com>"),
        ChgFrom("<new-sender@example.com>"),
        ReplBody(b"replaced body\r\n"),
        Quarantine("held for review"),
    ]


def test_ipv6_and_unix_clients_reach_pymilter(echo) -> None:
    with MilterSession(echo, timeout=10) as s:
        s.connect("2001:db8::5", port=2525)
        s.mail("<a@example.com>")
        s.rcpt("<b@example.com>")
        six = {m.name: m.value for m in s.end_of_message().modifications if isinstance(m, AddHeader)}
    assert six["X-Seen-Connect"] == "[IPv6:2001:db8::5] 10 ('2001:db8::5', 2525, 0, 0)"
    with MilterSession(echo, timeout=10) as s:
        s.connect(unix_path="/run/smtp.sock")
        s.mail("<a@example.com>")
        s.rcpt("<b@example.com>")
        local = {m.name: m.value for m in s.end_of_message().modifications if isinstance(m, AddHeader)}
    assert local["X-Seen-Connect"].startswith("localhost 1 ")
    assert "/run/smtp.sock" in local["X-Seen-Connect"]


@pytest.mark.parametrize("sender, answer", [
    ("<spammer@bad.example>", "550 5.7.1 Access denied"),
    ("<busy@example.net>", "451 4.3.0 Sender check temporarily unavailable, try again later"),
    ("<multi@example.net>", "550-5.7.1 first line\n550 5.7.1 second line"),
])
def test_reply_set_at_mail(fromreply, sender, answer) -> None:
    result = run_session(fromreply, SessionSpec(client="192.0.2.10", mail_from=sender,
                                                rcpts=["<bob@example.com>", "<carol@example.com>"]), timeout=10)
    assert result.error is None, result.error
    assert result[1].label == "MAIL %s" % sender
    assert result[1].answer == answer
    assert [s.answer for s in result.steps[2:]] == ["not sent", "not sent"]


def test_session_after_a_rejected_mail_still_works(fromreply) -> None:
    # After the abort the same connection takes a new transaction, as with sendmail.
    with MilterSession(fromreply, timeout=10) as s:
        s.connect("192.0.2.10")
        assert str(s.mail("<spammer@bad.example>")) == "550 5.7.1 Access denied"
        s.abort()
        assert s.mail("<good@example.net>").action == "continue"
        assert s.rcpt("<bob@example.com>").action == "continue"
        s.abort()


def test_many_sessions_are_quick(relaydeny) -> None:
    spec = SessionSpec(client="192.0.2.10", mail_from="<a@example.net>", rcpts=["<bob@remote.example>"])
    started = time.monotonic()
    for _ in range(50):
        result = run_session(relaydeny, spec, timeout=10)
        assert result[-1].answer == "550 5.7.1 Relaying denied"
    assert time.monotonic() - started < 20
