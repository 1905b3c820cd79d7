"""End to end: unknown local users refused at RCPT through a real sendmail and a real relaymilter.

sendmail's own class w here is a name nobody writes to, so sendmail treats
local.test as remote and (promiscuous_relay) accepts every user there: what
is refused is refused by relaymilter alone, whose local domains are
local.test and mail.local.test. The sources are real files: an aliases(5)
file, a user list, a map built by makemap, and passwd through NSS.
"""

from __future__ import annotations

import os
import pwd
import shutil
import smtplib
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import mta
from milterproc import MilterProcess

KNOWN_CLIENT, STRANGER, TRUSTED = "127.0.0.5", "127.0.0.6", "127.0.0.1"
ROOT = pwd.getpwuid(0).pw_name


def unknown(rcpt: str) -> tuple[int, str]:
    return (550, "5.1.1 %s... User unknown" % rcpt)


TEMPFAIL = (451, "4.3.0 Temporary lookup failure")      # sendmail adds no address to a 4xx


@pytest.fixture(scope="module")
def rig(module_sendmail_factory):
    base = Path(tempfile.mkdtemp(prefix="rm-lr-", dir="/tmp"))
    os.chmod(base, 0o755)
    (base / "aliases").write_text("# aliases(5)\nstaff: alice,\n  bob\n\"John Doe\": jdoe\n"
                                  "list: :include:%s\n" % (base / "list-members"))
    (base / "list-members").write_text("alice\nbob\n")
    (base / "users").write_text("listed\ncarol@mail.local.test\n")
    subprocess.run(["makemap", "hash", str(base / "virt")], input="mapped@local.test x\n@mail.local.test any\n",
                   text=True, check=True, timeout=60)
    settings = {
        "local_recipients": {"passwd": True, "aliases": [str(base / "aliases")], "lists": [str(base / "users")],
                             "maps": [str(base / "virt.db")], "recipient_delimiter": "+"},
    }
    milter = MilterProcess(base, settings).start()
    try:
        mx = module_sendmail_factory(milter_socket="unix:%s" % milter.sock_path, local_domains=("sendmail-only.test",))
        subprocess.run(["vsmtprelay", "-f", milter.relayers_db, "add", KNOWN_CLIENT], check=True, timeout=60)
        yield milter, mx, base
    finally:
        milter.stop()
        shutil.rmtree(base, ignore_errors=True)


def session_with_data(port: int, client: str, rcpts: list[str]) -> tuple[list[tuple[int, str]], tuple[int, str]]:
    """RCPT replies, then what DATA gets (a refused recipient's message must never be taken)."""
    with smtplib.SMTP(timeout=30, source_address=(client, 0)) as smtp:
        smtp.connect("127.0.0.1", port)
        smtp.ehlo("client.example.test")
        smtp.docmd("MAIL FROM:", "<sender@example.net>")
        got = [smtp.docmd("RCPT TO:", r) for r in rcpts]
        data = smtp.docmd("DATA")
        if data[0] == 354:              # sendmail may take the text and refuse it at its end
            smtp.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
            data = smtp.getreply()
    decode = lambda r: (r[0], r[1].decode())  # noqa: E731
    return [decode(r) for r in got], decode(data)


@pytest.mark.parametrize("client", [STRANGER, TRUSTED, KNOWN_CLIENT])
def test_unknown_user_refused_for_every_client_and_its_data_never_accepted(rig, client):
    milter, mx, base = rig
    before = mx.queued()
    got, data = session_with_data(mx.port, client, ["<nobody-here@local.test>", "<Ghost.User@LOCAL.TEST>"])
    assert got == [unknown("<nobody-here@local.test>"), unknown("<Ghost.User@LOCAL.TEST>")]
    assert data[0] in (503, 554), data  # no valid recipient: the message is never accepted
    assert mx.queued() == before
    milter.wait_for_log("to=<nobody-here@local.test> resolved=nobody-here@local.test rule=unknown_recipient")


KNOWN = [
    ("passwd", "<%s@local.test>" % ROOT),
    ("aliases, continued entry", "<Staff@local.test>"),
    ("aliases, quoted name", '<"john doe"@local.test>'),
    ("aliases, :include: list", "<list@local.test>"),
    ("list", "<listed@local.test>"),
    ("list, user@domain", "<carol@mail.local.test>"),
    ("map, user@domain", "<mapped@local.test>"),
    ("map, @domain catch-all", "<anyone-at-all@mail.local.test>"),
    ("user+tag", "<listed+news@local.test>"),
    ("Postmaster", "<Postmaster@local.test>"),
    ("MAILER-DAEMON", "<MAILER-DAEMON@local.test>"),
]


@pytest.mark.parametrize("rcpt", [r for _, r in KNOWN], ids=[n for n, _ in KNOWN])
def test_known_users_accepted(rig, rcpt):
    milter, mx, base = rig
    assert [r[0] for r in mta.rcpt_replies(mx.port, STRANGER, "<a@example.net>", [rcpt])] == [250]


def test_decision_log_names_the_source(rig):
    milter, mx, base = rig
    mta.rcpt_replies(mx.port, STRANGER, "<a@example.net>", ["<staff@local.test>", "<mapped@local.test>"])
    milter.wait_for_log("to=<staff@local.test> resolved=staff@local.test rule=local_domain source=aliases")
    milter.wait_for_log("to=<mapped@local.test> resolved=mapped@local.test rule=local_domain source=map")


def test_relay_domain_and_relaying_unchanged(rig):
    milter, mx, base = rig
    assert [r[0] for r in mta.rcpt_replies(mx.port, STRANGER, "<a@example.net>", ["<anyone@relayed.test>"])] == [250]
    assert mta.rcpt_replies(mx.port, STRANGER, "<a@example.net>", ["<bob@remote.example>"]) == [
        (550, "5.7.1 <bob@remote.example>... Relaying denied")]
    assert [r[0] for r in mta.rcpt_replies(mx.port, KNOWN_CLIENT, "<a@example.net>", ["<bob@remote.example>"])] == [250]


def test_list_edited_while_running_counts_from_the_next_session(rig):
    milter, mx, base = rig
    users = base / "users"
    original = users.read_text()
    try:
        assert mta.rcpt_replies(mx.port, STRANGER, "<a@example.net>", ["<newcomer@local.test>"]) == [
            unknown("<newcomer@local.test>")]
        users.write_text(original + "newcomer\n")
        assert [r[0] for r in mta.rcpt_replies(mx.port, STRANGER, "<a@example.net>", ["<newcomer@local.test>"])] == [250]
        new = base / "users.new"
        new.write_text(original)            # replaced by rename, as the docs advise: gone again
        os.rename(new, users)
        # Within 0.1 s of a change a miss is 451, not 550 (the file may have been
        # read half written); after that, the refusal.
        deadline = time.monotonic() + 10
        while True:
            got = mta.rcpt_replies(mx.port, STRANGER, "<a@example.net>", ["<newcomer@local.test>"])
            if got != [TEMPFAIL] or time.monotonic() > deadline:
                break
        assert got == [unknown("<newcomer@local.test>")]
    finally:
        users.write_text(original)


@pytest.mark.parametrize("which", ["users", "aliases"])
def test_source_replaced_by_a_directory_tempfails_local_users_relaying_still_works(rig, which):
    milter, mx, base = rig
    path = base / which
    saved = path.read_text()
    os.unlink(path)
    os.mkdir(path)
    try:
        got = mta.rcpt_replies(mx.port, KNOWN_CLIENT, "<a@example.net>",
                               ["<nobody-here@local.test>", "<bob@remote.example>", "<mapped@local.test>",
                                "<postmaster@local.test>"])
        assert got[0] == TEMPFAIL                       # never a 550 while a source cannot be read
        assert [r[0] for r in got[1:]] == [250, 250, 250]  # relaying, a user another source knows, postmaster
        milter.wait_for_log("cannot read: Is a directory")
    finally:
        os.rmdir(path)
        path.write_text(saved)
    known = "<listed@local.test>" if which == "users" else "<staff@local.test>"
    assert [r[0] for r in mta.rcpt_replies(mx.port, STRANGER, "<a@example.net>", [known])] == [250]


def test_chmod_000_source_with_an_unprivileged_milter_tempfails_local_users(sendmail_factory):
    """Root reads through chmod 000; a milter without the DAC capabilities (as an unprivileged
    service user) cannot, which is the case to prove: 451 for local users, relaying unaffected."""
    base = Path(tempfile.mkdtemp(prefix="rm-lr0-", dir="/tmp"))
    os.chmod(base, 0o755)
    (base / "users").write_text("listed\n")
    (base / "aliases").write_text("staff: alice\n")
    settings = {"local_recipients": {"aliases": [str(base / "aliases")], "lists": [str(base / "users")]}}
    milter = MilterProcess(base, settings,
                           wrapper=["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]).start()
    try:
        mx = sendmail_factory(milter_socket="unix:%s" % milter.sock_path, local_domains=("sendmail-only.test",))
        subprocess.run(["vsmtprelay", "-f", milter.relayers_db, "add", KNOWN_CLIENT], check=True, timeout=60)
        assert [r[0] for r in mta.rcpt_replies(mx.port, KNOWN_CLIENT, "<a@example.net>", ["<listed@local.test>"])] == [250]
        os.chmod(base / "users", 0)         # ctime changes: seen at the next lookup
        got = mta.rcpt_replies(mx.port, KNOWN_CLIENT, "<a@example.net>",
                               ["<listed@local.test>", "<bob@remote.example>", "<staff@local.test>"])
        assert got[0] == TEMPFAIL and [r[0] for r in got[1:]] == [250, 250], got
        milter.wait_for_log("users: cannot read: Permission denied")
        os.chmod(base / "users", 0o644)
        assert [r[0] for r in mta.rcpt_replies(mx.port, KNOWN_CLIENT, "<a@example.net>", ["<listed@local.test>"])] == [250]
    finally:
        milter.stop()
        shutil.rmtree(base, ignore_errors=True)
