"""The real-sendmail fixture and the shipped sendmail snippet, proven with a probe milter.

A real sendmail 8.17 (built from a .mc that includes packaging/sendmail/relaymilter.m4)
talks to tests/data/sendmail_probe_milter.py, which rejects @remote.example recipients.
These tests pin what the product relies on: the client address the milter sees, the
exact reply text, fail-closed behaviour with F=T, and that the sample .mc builds.
"""

from __future__ import annotations

import re
import smtplib
import subprocess
import time
from pathlib import Path

import pytest

import mta

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PACKAGING = mta.REPO / "packaging" / "sendmail"
SAMPLE = PACKAGING / "sendmail.mc.sample"
DENIED = (550, "5.7.1 <bob@remote.example>... Relaying denied")
TRY_LATER = (451, "4.3.2 Please try again later")
ALICE_OK = (250, "2.1.5 <alice@example.test>... Recipient ok")


def test_sendmail_starts_fast_and_milter_sees_the_client_address(sendmail_factory, probe_milter_factory):
    # The shipped default transport is inet: use it here once (unix elsewhere: faster).
    port = mta.free_port()
    milter = probe_milter_factory("inet:%d@127.0.0.1" % port)
    started = time.monotonic()
    mx = sendmail_factory(milter_socket=milter.socket_spec, hosts={"127.0.0.8": "named8.client.test"})
    assert time.monotonic() - started < 5.0
    assert mx.ready() and mx.running

    assert mta.rcpt_replies(mx.port, "127.0.0.5", "carol@client.test", ["alice@example.test"]) == [ALICE_OK]
    assert mta.rcpt_replies(mx.port, "127.0.0.8", "dave@client.test", ["alice@example.test"]) == [ALICE_OK]

    connects = milter.records("connect")
    assert [c["hostaddr"][0] for c in connects] == ["127.0.0.5", "127.0.0.8"]
    assert [c["macros"]["{client_addr}"] for c in connects] == ["127.0.0.5", "127.0.0.8"]
    # No PTR for .5 (and no 5 s DNS stall: the private hosts file answers); .8 has one.
    assert [c["hostname"] for c in connects] == ["[127.0.0.5]", "named8.client.test"]
    assert connects[0]["macros"]["j"] == mta.HOSTNAME
    rcpts = milter.records("envrcpt")
    assert [r["macros"]["{client_addr}"] for r in rcpts] == ["127.0.0.5", "127.0.0.8"]
    assert [r["rcpt"] for r in rcpts] == ["<alice@example.test>"] * 2


def test_milter_reply_reaches_the_client_verbatim(sendmail_factory, probe_milter_factory):
    milter = probe_milter_factory()
    mx = sendmail_factory(milter_socket=milter.socket_spec)
    session = mta.smtp_session(mx.port, "127.0.0.5", "carol@client.test",
                               ["bob@remote.example", "alice@example.test", "erin@elsewhere.example"])
    assert session.mail == (250, "2.1.0 <carol@client.test>... Sender ok")
    # promiscuous_relay: sendmail itself accepts the other remote recipient, so the
    # 550 above is the milter's decision, not sendmail's.
    assert session.rcpts == [DENIED, ALICE_OK, (250, "2.1.5 <erin@elsewhere.example>... Recipient ok")]
    assert [(r["rcpt"], r["decision"]) for r in milter.records("envrcpt")] == [
        ("<bob@remote.example>", "reject"), ("<alice@example.test>", "continue"),
        ("<erin@elsewhere.example>", "continue")]
    assert mta.mail_reply(mx.port, "127.0.0.6", "<>") == (250, "2.1.0 <>... Sender ok")


def test_smtp_auth_user_reaches_milter_macros(sendmail_factory, probe_milter_factory):
    milter = probe_milter_factory()
    mx = sendmail_factory(milter_socket=milter.socket_spec, auth_users={"alice": "s3cret"})
    good = mta.smtp_session(mx.port, "127.0.0.5", "alice@example.test", ["alice@example.test"],
                            auth=("alice", "s3cret"))
    bad = mta.smtp_session(mx.port, "127.0.0.6", "eve@client.test", ["alice@example.test"],
                           auth=("alice", "guess"))
    login = mta.smtp_session(mx.port, "127.0.0.7", "alice@example.test", [], auth=("alice", "s3cret"),
                             mechanism="LOGIN")
    assert "AUTH PLAIN LOGIN" in good.ehlo[1].splitlines()
    assert good.auth == (235, "2.0.0 OK Authenticated")
    assert bad.auth == (535, "5.7.0 authentication failed")
    assert login.auth == (235, "2.0.0 OK Authenticated")
    froms = milter.records("envfrom")
    assert [(f["macros"]["{auth_authen}"], f["macros"]["{auth_type}"]) for f in froms] == [
        ("alice", "PLAIN"), (None, None), ("alice", "LOGIN")]


@pytest.mark.parametrize("transport", ["unix", "inet"])
def test_milter_not_running_tempfails_never_relays(sendmail_factory, socket_dir, transport):
    spec = ("unix:%s/nobody.sock" % socket_dir if transport == "unix"
            else "inet:%d@127.0.0.1" % mta.free_port())
    mx = sendmail_factory(milter_socket=spec)
    session = mta.smtp_session(mx.port, "127.0.0.5", "carol@client.test", ["bob@remote.example"])
    assert session.greeting[0] == 220
    assert session.mail == TRY_LATER
    assert session.rcpts[0][0] != 250
    assert mx.queued() == []


def test_milter_killed_mid_session_tempfails_next_rcpt(sendmail_factory, probe_milter_factory):
    milter = probe_milter_factory()
    mx = sendmail_factory(milter_socket=milter.socket_spec)
    with smtplib.SMTP("127.0.0.1", mx.port, timeout=30, source_address=("127.0.0.5", 0)) as smtp:
        smtp.ehlo("client.example.test")
        assert smtp.docmd("MAIL FROM:", "<carol@client.test>")[0] == 250
        assert smtp.docmd("RCPT TO:", "<bob@remote.example>") == (DENIED[0], DENIED[1].encode())
        milter.stop()
        code, text = smtp.docmd("RCPT TO:", "<bob@remote.example>")
        assert (code, text.decode()) == TRY_LATER
        code, _ = smtp.docmd("RCPT TO:", "<alice@example.test>")
        assert code != 250


def test_milter_started_after_sendmail_takes_over_without_restart(sendmail_factory, probe_milter_factory):
    milter = probe_milter_factory(start=False)
    mx = sendmail_factory(milter_socket=milter.socket_spec)
    assert mta.mail_reply(mx.port, "127.0.0.5", "carol@client.test") == TRY_LATER
    milter.start()
    assert mta.rcpt_replies(mx.port, "127.0.0.5", "carol@client.test", ["bob@remote.example"]) == [DENIED]


def test_without_f_t_a_down_milter_is_an_open_relay(sendmail_factory, socket_dir):
    """Why the snippet insists on F=T: the same set-up without it relays for anyone."""
    mx = sendmail_factory(extra_mc_lines=[
        "INPUT_MAIL_FILTER(`noflag', `S=unix:%s/nobody.sock, T=C:2s')dnl" % socket_dir])
    assert mta.rcpt_replies(mx.port, "127.0.0.5", "carol@client.test", ["bob@remote.example"]) == [
        (250, "2.1.5 <bob@remote.example>... Recipient ok")]


def test_stop_leaves_no_process_behind(sendmail_factory, probe_milter_factory):
    milter = probe_milter_factory()
    mx = sendmail_factory(milter_socket=milter.socket_spec)
    pid = mx.pid
    assert mta.session_members(pid) == [pid]
    # An open session is a forked child; stop must not leave it behind either.
    with smtplib.SMTP("127.0.0.1", mx.port, timeout=30, source_address=("127.0.0.5", 0)) as smtp:
        smtp.ehlo("client.example.test")
        members = mta.session_members(pid)
        assert len(members) == 2 and pid in members
        started = time.monotonic()
        mx.stop()
        assert time.monotonic() - started < 2.0
    assert all(mta.pid_gone(p) for p in members)
    assert mta.session_members(pid) == []
    assert not mta.tcp_listening(mx.port)
    mx.stop()  # idempotent


def _m4(mc: Path, out: Path, *defines: str) -> str:
    proc = subprocess.run(["m4", *("-D" + d for d in defines), str(mta.CF_M4), str(mc)],
                          capture_output=True, text=True, timeout=30)
    # m4's own diagnostics start with "m4:"; cf's errprint ones say ERROR or WARNING.
    assert proc.returncode == 0 and "ERROR" not in proc.stderr and "m4:" not in proc.stderr, proc.stderr
    out.write_text(proc.stdout)
    return proc.stdout


def _parse_errors(cf: Path) -> list[str]:
    proc = subprocess.run(mta.namespaced([mta.SENDMAIL, "-C", str(cf), "-bt"]), input="",
                          capture_output=True, text=True, timeout=30)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if re.search(r": line \d+: ", line)]


@pytest.mark.parametrize("choice", ["milter-decides", "sendmail-decides"])
def test_sample_mc_builds_a_cf_sendmail_accepts(tmp_path, mta_tools, choice):
    defines = ["RELAYMILTER_M4=%s" % (PACKAGING / "relaymilter.m4")]
    if choice == "sendmail-decides":
        defines.append("RELAYMILTER_SENDMAIL_RELAY_CHECKS")
    cf = tmp_path / "sendmail.cf"
    text = _m4(SAMPLE, cf, *defines)
    assert "Xrelaymilter, S=inet:8894@127.0.0.1, F=T, T=C:10s;S:10s;R:10s;E:30s\n" in text
    assert "O InputMailFilters=relaymilter\n" in text
    assert ("promiscuous_relay.m4" in text) == (choice == "milter-decides")
    assert ("\nKdrac hash -o /etc/mail/relayers\n" in text) == (choice == "sendmail-decides")
    assert _parse_errors(cf) == []


def _macro_options(cf_text: str) -> dict[str, list[str]]:
    found = re.findall(r"^O Milter\.macros\.(\w+)=(.*)$", cf_text, re.M)
    return {stage: [m.strip() for m in value.split(",")] for stage, value in found}


def test_snippet_appends_macros_and_is_overridable(tmp_path, mta_tools):
    stock_mc = tmp_path / "stock.mc"
    # Milter options appear in a .cf only when a milter is declared.
    stock_mc.write_text("OSTYPE(`linux')dnl\nINPUT_MAIL_FILTER(`other', `S=unix:/run/other.sock')dnl\n"
                        "MAILER(`local')dnl\n")
    stock = _macro_options(_m4(stock_mc, tmp_path / "stock.cf"))

    mc = tmp_path / "snippet.mc"
    mc.write_text("OSTYPE(`linux')dnl\ninclude(`%s')dnl\ninclude(`%s')dnl\nMAILER(`local')dnl\n"
                  % (PACKAGING / "relaymilter.m4", PACKAGING / "relaymilter.m4"))
    text = _m4(mc, tmp_path / "snippet.cf")
    macros = _macro_options(text)
    assert macros["connect"] == stock["connect"] + ["{client_addr}"]
    assert macros["envrcpt"] == stock["envrcpt"] + ["{client_addr}"]
    # The stock MAIL list already has both AUTH macros: nothing is added twice.
    assert macros["envfrom"] == stock["envfrom"]
    assert {"{auth_authen}", "{auth_type}"} <= set(stock["envfrom"])
    assert re.findall(r"^X.*$", text, re.M) == ["Xrelaymilter, S=inet:8894@127.0.0.1, F=T, T=C:10s;S:10s;R:10s;E:30s"]

    # Already there, first or last, with or without blanks: left as it is.
    edges = tmp_path / "edges.mc"
    edges.write_text("OSTYPE(`linux')dnl\ndefine(`confMILTER_MACROS_CONNECT', `{client_addr},j')dnl\n"
                     "define(`confMILTER_MACROS_ENVFROM', ``{auth_authen}, i,{auth_type}'')dnl\n"
                     "include(`%s')dnl\nMAILER(`local')dnl\n" % (PACKAGING / "relaymilter.m4"))
    macros = _macro_options(_m4(edges, tmp_path / "edges.cf"))
    assert macros["connect"] == ["{client_addr}", "j"]
    assert macros["envfrom"] == ["{auth_authen}", "i", "{auth_type}"]

    own = tmp_path / "own.mc"
    own.write_text("OSTYPE(`linux')dnl\n"
                   "define(`confMILTER_MACROS_ENVFROM', `i')dnl\n"
                   "define(`RELAYMILTER_SOCKET', `unix:/run/relaymilter/relaymilter.sock')dnl\n"
                   "define(`RELAYMILTER_TIMEOUTS', `C:5s;S:5s;R:5s;E:20s')dnl\n"
                   "include(`%s')dnl\nMAILER(`local')dnl\n" % (PACKAGING / "relaymilter.m4"))
    text = _m4(own, tmp_path / "own.cf")
    assert _macro_options(text)["envfrom"] == ["i", "{auth_authen}", "{auth_type}"]
    assert "\nXrelaymilter, S=unix:/run/relaymilter/relaymilter.sock, F=T, T=C:5s;S:5s;R:5s;E:20s\n" in text
