"""The real relaymilter process, driven over its socket with the harness (no MTA).

Covers the RCPT decision end to end (relayers.db changes seen without a
restart, window, AUTH, trusted), fail-closed behaviour (corrupt db, errors),
the open-relay battery, bad input, SIGHUP reloads and SIGTERM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from relaymilter.harness import MilterSession, SessionSpec, run_session
from relaymilter.harness.codec import frame
from relaymilter.harness import protocol as proto
from relaymilter.store.relayers import BDBRelayStore

from milterproc import MilterProcess

DENIED = "550 5.7.1 Relaying denied"
TEMPFAIL = "451 4.3.0 Relay check temporarily unavailable, try again later"
BATTERY = yaml.safe_load((Path(__file__).parents[1] / "data" / "relay_battery.yaml").read_text())


def rcpts(m: MilterProcess, client: str, recipients, sender="<someone@example.net>", auth=None) -> list[str]:
    with MilterSession(m.socket, timeout=10) as s:
        s.connect(client_ip=client)
        s.helo("client.example")
        assert s.mail(sender, auth=auth).action == "continue"
        return [str(s.rcpt(r)) for r in recipients]


def test_unknown_client_refused_local_accepted(milter):
    got = rcpts(milter, "192.0.2.7", ["<bob@remote.example>", "<bob@local.test>", "<Bob@LOCAL.TEST.>",
                                       "<postmaster>", "<x@relayed.test>", "<x@deep.sub.relayed.test>"])
    assert got == [DENIED, "continue", "continue", "continue", "continue", "continue"]
    log = milter.wait_for_log("rule=relay_domain")
    assert "reject: RCPT from [192.0.2.7]: 550 5.7.1 <bob@remote.example>: Relaying denied;" in log
    assert "rule=default_reject" in log and "rule=local_domain" in log


def test_vsmtprelay_add_and_delete_take_effect_without_restart(milter):
    assert rcpts(milter, "192.0.2.5", ["<bob@remote.example>"]) == [DENIED]
    subprocess.run(["vsmtprelay", "-f", milter.relayers_db, "add", "192.0.2.5"], check=True, timeout=60)
    assert rcpts(milter, "192.0.2.5", ["<bob@remote.example>"]) == ["continue"]
    assert rcpts(milter, "192.0.2.6", ["<bob@remote.example>"]) == [DENIED]
    subprocess.run(["vsmtprelay", "-f", milter.relayers_db, "delete", "192.0.2.5"], check=True, timeout=60)
    assert rcpts(milter, "192.0.2.5", ["<bob@remote.example>"]) == [DENIED]
    milter.wait_for_log("rule=relayers_db")


def test_ipv6_and_mapped_clients(milter):
    BDBRelayStore(milter.relayers_db).add({"2001:db8::5": int(time.time()), "192.0.2.77": int(time.time())})
    assert rcpts(milter, "2001:db8:0::5", ["<a@remote.example>"]) == ["continue"]
    assert rcpts(milter, "2001:db8::6", ["<a@remote.example>"]) == [DENIED]
    assert rcpts(milter, "::ffff:192.0.2.77", ["<a@remote.example>"]) == ["continue"]


def test_window(tmp_path):
    m = MilterProcess(tmp_path, {"relayers": {"path": str(tmp_path / "relayers.db"), "window": 30}}).start()
    try:
        now = int(time.time())
        BDBRelayStore(m.relayers_db).add({"192.0.2.1": now - 31 * 60, "192.0.2.2": now - 29 * 60,
                                          "192.0.2.3": now + 3600})
        assert rcpts(m, "192.0.2.1", ["<a@remote.example>"]) == [DENIED]      # older than the window
        assert rcpts(m, "192.0.2.2", ["<a@remote.example>"]) == ["continue"]
        assert rcpts(m, "192.0.2.3", ["<a@remote.example>"]) == ["continue"]  # future counts as fresh
    finally:
        m.stop()


def test_authenticated_and_trusted_clients(milter):
    assert rcpts(milter, "192.0.2.9", ["<a@remote.example>"], auth="alice") == ["continue"]
    assert rcpts(milter, "127.0.0.1", ["<a@remote.example>"]) == ["continue"]
    assert rcpts(milter, "127.0.0.2", ["<a@remote.example>"]) == [DENIED]     # trusted is 127.0.0.1/32 here
    log = milter.wait_for_log("rule=trusted_network")      # decision lines are written in batches
    assert "rule=authenticated" in log


def test_auth_not_permitted(tmp_path):
    m = MilterProcess(tmp_path, {"permit_authenticated": False}).start()
    try:
        assert rcpts(m, "192.0.2.9", ["<a@remote.example>"], auth="alice") == [DENIED]
    finally:
        m.stop()


def test_local_sender_never_grants_relay(milter):
    assert rcpts(milter, "192.0.2.9", ["<a@remote.example>"], sender="<postmaster@local.test>") == [DENIED]
    assert rcpts(milter, "192.0.2.9", ["<a@remote.example>"], sender="<>") == [DENIED]


def battery_rows():
    for row in BATTERY["rows"]:
        yield pytest.param(row, id=row["rcpt"])


def fill(text: str) -> str:
    return text.format(local="local.test", remote="remote.example", local_ip="192.0.2.250")


def test_open_relay_battery(tmp_path):
    m = MilterProcess(tmp_path, {"local_domains": ["local.test", "mail.local.test", "[192.0.2.250]"]}).start()
    try:
        forms = [fill(row["rcpt"]) for row in BATTERY["rows"]]
        refused = rcpts(m, "192.0.2.66", forms)
        for form, answer in zip(forms, refused):
            assert answer.split()[0] in ("550", "553"), (form, answer)
        BDBRelayStore(m.relayers_db).add({"192.0.2.67": int(time.time())})
        allowed = rcpts(m, "192.0.2.67", forms)
        # Everything is relayed for a POP-before-SMTP client. The double-@ forms are
        # left to the MTA, which refuses them while parsing (553 5.1.3; sendmail
        # never even passes them to a milter): the milter has no reason to refuse
        # a client that may relay.
        for form, answer in zip(forms, allowed):
            assert answer == "continue", (form, answer)
    finally:
        m.stop()


def test_corrupt_relayers_db_tempfails_relay_but_not_local_mail(milter):
    BDBRelayStore(milter.relayers_db).add({"192.0.2.5": int(time.time())})
    assert rcpts(milter, "192.0.2.5", ["<a@remote.example>"]) == ["continue"]
    good = Path(milter.relayers_db).read_bytes()
    Path(milter.relayers_db).write_bytes(b"this is not a Berkeley DB file\n" * 200)
    for client in ("192.0.2.5", "192.0.2.8"):
        assert rcpts(milter, client, ["<a@remote.example>", "<a@local.test>", "<x@relayed.test>"]) == [
            TEMPFAIL, "continue", "continue"]
    assert rcpts(milter, "127.0.0.1", ["<a@remote.example>"]) == ["continue"]   # trusted needs no lookup
    Path(milter.relayers_db).write_bytes(good)
    assert rcpts(milter, "192.0.2.5", ["<a@remote.example>"]) == ["continue"]
    milter.wait_for_log("rule=relayers_unavailable")


def test_unreadable_relayers_db_as_unprivileged_milter(tmp_path):
    """Permission denied (not corruption) also tempfails relay attempts."""
    m = MilterProcess(tmp_path, {"relayers": {"path": str(tmp_path / "sub" / "relayers.db")}})
    (tmp_path / "sub").write_text("a file where a directory should be")
    m.start()
    try:
        assert rcpts(m, "192.0.2.5", ["<a@remote.example>", "<a@local.test>"]) == [TEMPFAIL, "continue"]
    finally:
        m.stop()


BAD_RCPTS = ["<>", "", "<", ">", "<@>", "<a@>", "<@b>", "<a@b@c>", "<" + "a" * 1000 + "@remote.example>",
             "<" + "b" * 300 + "@" + "c" * 700 + ">", "<jörg@remote.example>", "<jörg@lócal.test>",
             "<用户@例子.广告>", "<\"unterminated@remote.example>", "<a\x01b@remote.example>", "<a@[300.1.1.1]>",
             "<a@[IPv6:zz::1]>", "<" + "@x," * 200 + "@y:a@remote.example>", "<a@remote.example> SIZE=100"]


def threads_of(pid: int) -> int:
    with open("/proc/%d/status" % pid) as fh:
        return int(next(line for line in fh if line.startswith("Threads:")).split()[1])


def test_bad_input_gets_a_decision_and_the_milter_survives(milter):
    # libmilter keeps a small pool of idle workers: warm it up before counting.
    for _ in range(3):
        rcpts(milter, "192.0.2.7", ["<bob@local.test>"])
    time.sleep(0.5)
    threads_before = threads_of(milter.worker_pid())
    for _ in range(10):
        for client, bad_sender in (("192.0.2.40", "<x@example.net>"), ("127.0.0.1", "<" + "s" * 1000 + ">"),
                                   ("192.0.2.41", "<jörg@exämple.net>")):
            with MilterSession(milter.socket, timeout=10) as s:
                s.connect(client_ip=client)
                assert s.mail(bad_sender).action in ("continue", "reject")
                for bad in BAD_RCPTS:
                    r = s.rcpt(bad)
                    assert r.action in ("continue", "reject"), (bad, r)
                    if client != "127.0.0.1" and r.action == "reject":
                        assert r.code in ("550", "553"), (bad, r)
    # a NUL inside the argument: sendmail never sends one, but a broken MTA might
    with MilterSession(milter.socket, timeout=10) as s:
        s.connect(client_ip="192.0.2.42")
        s.mail("<a@example.net>")
        s.channel.send("RCPT raw", frame(proto.SMFIC_RCPT, b"<a\0b@remote.example>\0"))
        raw = s.channel.await_reply("RCPT raw")
        assert raw.action in ("continue", "reject")
    # still healthy, and the 31 sessions left no thread behind (a leak would add one each)
    assert rcpts(milter, "192.0.2.7", ["<bob@remote.example>", "<bob@local.test>"]) == [DENIED, "continue"]
    assert "Traceback" not in milter.log()
    deadline = time.monotonic() + 10
    while threads_of(milter.worker_pid()) > threads_before + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threads_of(milter.worker_pid()) <= threads_before + 2


def test_sighup_reload_and_broken_config_keeps_old_rules(milter):
    assert rcpts(milter, "192.0.2.7", ["<a@newly.local>"]) == [DENIED]
    good = milter.config_path.read_text()
    milter.config_path.write_text(good + "no_such_key: 1\n")
    milter.hup()
    milter.wait_for_log("reload failed, keeping the running configuration: %s:" % milter.config_path)
    assert rcpts(milter, "192.0.2.7", ["<a@local.test>", "<a@remote.example>"]) == ["continue", DENIED]
    cfg = yaml.safe_load(good)
    cfg["local_domains"].append("newly.local")
    milter.write_config(config_text=yaml.safe_dump(cfg))
    milter.hup()
    milter.wait_for_log("reloaded %s" % milter.config_path)
    assert rcpts(milter, "192.0.2.7", ["<a@newly.local>"]) == ["continue"]


def test_reload_does_not_drop_open_connections(milter):
    with MilterSession(milter.socket, timeout=10) as s:
        s.connect(client_ip="192.0.2.7")
        s.mail("<a@example.net>")
        assert str(s.rcpt("<a@remote.example>")) == DENIED
        milter.hup()
        milter.wait_for_log("reloaded")
        assert str(s.rcpt("<b@remote.example>")) == DENIED    # the same connection goes on
        assert str(s.rcpt("<b@local.test>")) == "continue"


def test_sigterm_stops_cleanly(tmp_path):
    m = MilterProcess(tmp_path, {"workers": 2}).start()
    workers = m.workers(2)
    assert len(workers) == 2
    os.kill(m.pid, signal.SIGTERM)
    assert m.proc.wait(40) == 0
    assert not any(Path("/proc/%d" % pid).exists() for pid in workers)
    assert not m.sock_path.exists()         # the supervisor removes the socket it created
    m.proc = None
    m.logfile.close()


def test_session_runner_reports_every_step(milter):
    result = run_session(milter.socket, SessionSpec(client="192.0.2.7", helo="c.example", mail_from="<a@example.net>",
                                                    rcpts=["<bob@remote.example>", "<bob@local.test>"]))
    assert result.error is None
    assert [s.answer for s in result.steps if s.step == "rcpt"] == [DENIED, "continue"]
