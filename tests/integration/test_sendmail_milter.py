"""End to end: a real sendmail with the shipped INPUT_MAIL_FILTER snippet and a real relaymilter.

SMTP clients bind to 127.0.0.x addresses to act as different clients. sendmail
runs with promiscuous_relay, so every relay decision is relaymilter's; only
127.0.0.1 is trusted, so 127.0.0.5 and friends are "unknown" until they log in.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml

import mta
from milterproc import MilterProcess
from relaymilter.store.relayers import BDBRelayStore

LOCAL = ("local.test", "mail.local.test")
BATTERY = yaml.safe_load((Path(__file__).parents[1] / "data" / "relay_battery.yaml").read_text())


def denied(rcpt: str) -> tuple[int, str]:
    return (550, "5.7.1 %s... Relaying denied" % rcpt)


def codes(replies) -> list[int]:
    return [r[0] for r in replies]


@pytest.fixture(scope="module")
def rig(module_sendmail_factory):
    base = Path(tempfile.mkdtemp(prefix="rm-e2e-", dir="/tmp"))
    os.chmod(base, 0o755)
    milter = MilterProcess(base, {"local_domains": list(LOCAL)}).start()
    try:
        mx = module_sendmail_factory(milter_socket="unix:%s" % milter.sock_path, local_domains=LOCAL,
                                     auth_users={"alice": "wonderland"})
        yield milter, mx
    finally:
        milter.stop()
        shutil.rmtree(base, ignore_errors=True)


def vsmtprelay(milter: MilterProcess, *args: str) -> None:
    subprocess.run(["vsmtprelay", "-f", milter.relayers_db, *args], check=True, timeout=60)


def test_unknown_client_refused_exactly_local_accepted(rig):
    milter, mx = rig
    got = mta.rcpt_replies(mx.port, "127.0.0.5", "<someone@example.net>",
                           ["<bob@remote.example>", "<alice@local.test>", "<postmaster>", "<alice@MAIL.LOCAL.TEST>"])
    assert got[0] == denied("<bob@remote.example>")
    assert codes(got[1:]) == [250, 250, 250]


def test_pop_before_smtp_add_and_delete_without_restart(rig):
    milter, mx = rig
    assert mta.rcpt_replies(mx.port, "127.0.0.5", "<a@example.net>", ["<bob@remote.example>"]) == [
        denied("<bob@remote.example>")]
    vsmtprelay(milter, "add", "127.0.0.5")
    assert codes(mta.rcpt_replies(mx.port, "127.0.0.5", "<a@example.net>", ["<bob@remote.example>"])) == [250]
    assert mta.rcpt_replies(mx.port, "127.0.0.6", "<a@example.net>", ["<bob@remote.example>"]) == [
        denied("<bob@remote.example>")]
    vsmtprelay(milter, "delete", "127.0.0.5")
    assert mta.rcpt_replies(mx.port, "127.0.0.5", "<a@example.net>", ["<bob@remote.example>"]) == [
        denied("<bob@remote.example>")]


def test_authenticated_client_relays(rig):
    milter, mx = rig
    t = mta.smtp_session(mx.port, "127.0.0.9", "<alice@local.test>", ["<bob@remote.example>"],
                         auth=("alice", "wonderland"))
    assert t.auth[0] == 235 and codes(t.rcpts) == [250]
    # a wrong password is no authentication
    t = mta.smtp_session(mx.port, "127.0.0.9", "<alice@local.test>", ["<bob@remote.example>"],
                         auth=("alice", "guess"))
    assert t.auth[0] == 535 and t.rcpts == [denied("<bob@remote.example>")]


def test_forged_local_sender_does_not_relay(rig):
    milter, mx = rig
    assert mta.rcpt_replies(mx.port, "127.0.0.10", "<postmaster@local.test>", ["<bob@remote.example>"]) == [
        denied("<bob@remote.example>")]


def test_open_relay_battery_through_sendmail(rig):
    milter, mx = rig
    forms = [row["rcpt"].format(local="local.test", remote="remote.example", local_ip="192.0.2.250")
             for row in BATTERY["rows"]]
    # sendmail checks syntax before the milter sees anything; unknown client first
    unknown = mta.rcpt_replies(mx.port, "127.0.0.11", "<a@example.net>", forms)
    for form, reply in zip(forms, unknown):
        assert reply[0] in (550, 553), (form, reply)
    vsmtprelay(milter, "add", "127.0.0.12")
    try:
        known = mta.rcpt_replies(mx.port, "127.0.0.12", "<a@example.net>", forms)
    finally:
        vsmtprelay(milter, "delete", "127.0.0.12")
    # For a client that may relay the milter refuses nothing; what sendmail then
    # says is its own business (553 for double-@ forms while parsing; "User
    # unknown" where sendmail reads an escaped form as a local user).
    for row, form, reply in zip(BATTERY["rows"], forms, known):
        assert "Relaying denied" not in reply[1], (form, reply)
        if row["parse_refused"]:
            assert reply[0] == 553, (form, reply)
        elif "\\@" in form:
            assert reply == (550, "5.1.1 %s... User unknown" % form), (form, reply)
        else:
            assert reply[0] == 250, (form, reply)


def test_corrupt_relayers_db_tempfails_relay_keeps_local_mail(rig):
    milter, mx = rig
    vsmtprelay(milter, "add", "127.0.0.5")
    db = Path(milter.relayers_db)
    good = db.read_bytes()
    db.write_bytes(os.urandom(8192))
    try:
        got = mta.rcpt_replies(mx.port, "127.0.0.5", "<a@example.net>", ["<bob@remote.example>", "<alice@local.test>"])
        # sendmail does not prefix a temporary failure with the address
        assert got[0] == (451, "4.3.0 Relay check temporarily unavailable, try again later")
        assert got[1][0] == 250
    finally:
        db.write_bytes(good)
        vsmtprelay(milter, "delete", "127.0.0.5")


def test_sighup_with_broken_config_keeps_old_rules_then_window_applies(rig):
    milter, mx = rig
    good = milter.config_path.read_text()
    now = int(time.time())
    vsmtprelay(milter, "add", "127.0.0.20", str(now - 45 * 60))       # logged in 45 minutes ago
    try:
        milter.config_path.write_text(good.replace("relayers:", "relayers:\n  window: never"))
        milter.hup()
        milter.wait_for_log("reload failed, keeping the running configuration")
        assert codes(mta.rcpt_replies(mx.port, "127.0.0.20", "<a@example.net>", ["<bob@remote.example>"])) == [250]
        cfg = yaml.safe_load(good)
        cfg["relayers"]["window"] = 30
        milter.write_config(config_text=yaml.safe_dump(cfg))
        milter.hup()
        milter.wait_for_log("(window 30 min)")
        assert mta.rcpt_replies(mx.port, "127.0.0.20", "<a@example.net>", ["<bob@remote.example>"]) == [
            denied("<bob@remote.example>")]
        vsmtprelay(milter, "add", "127.0.0.20")                          # a fresh login
        assert codes(mta.rcpt_replies(mx.port, "127.0.0.20", "<a@example.net>", ["<bob@remote.example>"])) == [250]
    finally:
        milter.write_config(config_text=good)
        milter.hup()
        vsmtprelay(milter, "delete", "127.0.0.20")


def test_listed_sender_refused_and_list_changes_seen_without_restart(rig):
    milter, mx = rig
    source = milter.rundir / "spammers"
    db = str(milter.rundir / "spammers.db")
    source.write_text("# spam senders\nbulk@spam.example\nspam.example\n")
    subprocess.run(["vnewspammers", "-f", str(source), "-o", db], check=True, timeout=60, capture_output=True)
    assert mta.mail_reply(mx.port, "127.0.0.1", "<anyone@mail.spam.example>") == (
        550, "5.7.1 <anyone@mail.spam.example>... Access denied")
    # refused even from a client allowed to relay (127.0.0.1 is trusted)
    assert mta.mail_reply(mx.port, "127.0.0.1", "<BULK@Spam.Example>")[0] == 550
    assert mta.mail_reply(mx.port, "127.0.0.5", "<>")[0] == 250
    assert mta.mail_reply(mx.port, "127.0.0.5", "<friend@example.net>")[0] == 250
    source.write_text("bulk@spam.example\n")
    subprocess.run(["vnewspammers", "-f", str(source), "-o", db], check=True, timeout=60, capture_output=True)
    assert mta.mail_reply(mx.port, "127.0.0.5", "<anyone@mail.spam.example>")[0] == 250
    assert mta.mail_reply(mx.port, "127.0.0.5", "<bulk@spam.example>") == (
        550, "5.7.1 <bulk@spam.example>... Access denied")
    source.write_text("")
    subprocess.run(["vnewspammers", "-f", str(source), "-o", db], check=True, timeout=60, capture_output=True)


def test_killed_milter_means_451_never_250(sendmail_factory, tmp_path):
    base = Path(tempfile.mkdtemp(prefix="rm-kill-", dir="/tmp"))
    os.chmod(base, 0o755)
    milter = MilterProcess(base, {"local_domains": list(LOCAL)}).start()
    try:
        BDBRelayStore(milter.relayers_db).add({"127.0.0.5": int(time.time())})
        mx = sendmail_factory(milter_socket="unix:%s" % milter.sock_path, local_domains=LOCAL)
        assert codes(mta.rcpt_replies(mx.port, "127.0.0.6", "<a@example.net>", ["<bob@remote.example>"])) == [550]
        milter.stop()       # SIGKILL, supervisor and every worker
        for client in ("127.0.0.5", "127.0.0.6"):
            t = mta.smtp_session(mx.port, client, "<a@example.net>", ["<bob@remote.example>", "<alice@local.test>"])
            assert t.mail[0] == 451 or all(r[0] == 451 for r in t.rcpts), t
            assert all(r[0] != 250 for r in t.rcpts), t
        milter.start()   # back up: sendmail uses it again with no restart
        assert codes(mta.rcpt_replies(mx.port, "127.0.0.5", "<a@example.net>", ["<bob@remote.example>"])) == [250]
    finally:
        milter.stop()
        shutil.rmtree(base, ignore_errors=True)
