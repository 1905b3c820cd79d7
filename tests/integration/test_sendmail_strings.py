"""The milter judges the string sendmail delivers, and agrees with sendmail about it.

Byte-exact SMTP through a real sendmail (promiscuous_relay: every relay decision is the
milter's) from an unknown client. What sendmail itself does with each form was checked
with `sendmail -bt` on this fixture's configuration (rulesets 3,0): ``alice@local.test..``
is delivered by the local mailer; ``u@[IPv6:::ffff:127.0.0.1]`` and ``u@[::ffff:127.0.0.1]``
go out by esmtp; ``[127.0.0.1]`` is local. test_sendmail_agrees_* asks sendmail again, so
a change in sendmail's behaviour shows here.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

import mta
from milterproc import MilterProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

LOCAL = ("local.test",)
CLIENT = "127.0.0.5"        # unknown: not trusted, not in relayers.db


@pytest.fixture(scope="module")
def rig(module_sendmail_factory):
    base = Path(tempfile.mkdtemp(prefix="rm-strings-", dir="/tmp"))
    os.chmod(base, 0o755)
    # [127.0.0.1] as sendmail's class w holds it here (the test milter adds no host names itself)
    milter = MilterProcess(base, {"local_domains": [*LOCAL, "[127.0.0.1]"]}).start()
    try:
        source = base / "spammers"
        source.write_text("spam2.example\n")
        subprocess.run(["vnewspammers", "-f", str(source), "-o", str(base / "spammers.db")], check=True,
                       timeout=60, capture_output=True)
        mx = module_sendmail_factory(milter_socket="unix:%s" % milter.sock_path, local_domains=LOCAL)
        yield milter, mx
    finally:
        milter.stop()
        shutil.rmtree(base, ignore_errors=True)


class RawSMTP:
    """SMTP with the bytes exactly as given (smtplib would refuse or re-encode 8-bit)."""

    def __init__(self, port: int, client_ip: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(client_ip, 0))
        self.buf = b""
        assert self.reply()[0] == 220
        assert self.cmd(b"EHLO client.example.test")[0] == 250

    def reply(self) -> tuple[int, bytes]:
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(4096)
                if not chunk:
                    raise ConnectionError("closed; got %r" % self.buf)
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line)
            if line[3:4] != b"-":
                return int(line[:3]), b"\n".join(x[4:] for x in lines)

    def cmd(self, line: bytes) -> tuple[int, bytes]:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def close(self) -> None:
        try:
            self.cmd(b"QUIT")
        finally:
            self.sock.close()


def rcpt_codes(mx, rcpts: list[bytes]) -> list[int]:
    s = RawSMTP(mx.port, CLIENT)
    try:
        assert s.cmd(b"MAIL FROM:<someone@example.net>")[0] == 250
        return [s.cmd(b"RCPT TO:" + r)[0] for r in rcpts]
    finally:
        s.close()


def mail_code(mx, sender: bytes) -> int:
    s = RawSMTP(mx.port, CLIENT)
    try:
        return s.cmd(b"MAIL FROM:" + sender)[0]
    finally:
        s.close()


def test_sendmail_agrees_about_the_forms(rig):
    _, mx = rig
    out = mx.run_namespaced([mta.SENDMAIL, "-C", str(mx.cf), "-bt"], input="".join(
        "3,0 %s\n" % a for a in ("alice@local.test..", "u@[IPv6:::ffff:127.0.0.1]", "u@[::ffff:127.0.0.1]",
                                 "u@[127.0.0.1]")), check=False).stdout
    mailers = [line.split("$#", 1)[1].split()[0] for line in out.splitlines() if line.startswith("parse") and
               "returns" in line]
    assert mailers == ["local", "esmtp", "esmtp", "local"], out


def test_literals_are_local_only_in_class_w_forms(rig):
    _, mx = rig
    got = rcpt_codes(mx, [b"<alice@[IPv6:::ffff:127.0.0.1]>", b"<alice@[::ffff:127.0.0.1]>",
                          b"<alice@[127.0.0.1]>", b"<alice@[127.0.0.1\xc2\xa0]>"])
    # sendmail sends the first two out by SMTP: a relay attempt from an unknown client.
    assert got[0] == 550 and got[1] in (550, 553), got
    assert got[2] == 250, got
    assert got[3] in (550, 553), got


def test_trailing_dots_and_non_smtp_spaces(rig):
    _, mx = rig
    got = rcpt_codes(mx, [b"<alice@local.test..>", b"<alice@local.test...>", b"<alice@local.test\xc2\xa0>",
                          b"<alice@local.test>\xc2\xa0"])
    assert got[:2] == [250, 250], got           # sendmail delivers these locally: so do we
    assert got[2] == 550, got                   # U+00A0 is part of the domain sendmail routes to
    assert got[3] == 250, got                   # after the brackets: sendmail's address is alice@local.test


def test_spammers_entry_matches_however_the_sender_spells_its_end(rig):
    _, mx = rig
    for sender in (b"<x@spam2.example>", b"<x@spam2.example.>", b"<x@spam2.example..>",
                   b"<x@spam2.example\xc2\xa0>", b"<x@mail.spam2.example..>"):
        assert mail_code(mx, sender) == 550, sender
    assert mail_code(mx, b"<x@notspam2.example>") == 250
