"""relaymilter-popwatch on a real systemd journal: forged login lines are refused, Dovecot's are recorded.

A real systemd-journald (journald.py: the machine's own, or one started
standalone for these tests, under an flock; stopped by PID, /dev/log put
back) and a real Dovecot (dovecot.py) that logs through it, the two ways a
Dovecot does under systemd: ``log_path = syslog`` (lines reach journald's
syslog socket from Dovecot's log process) and ``log_path = /dev/stderr`` on
a journald stdout stream connected by the process that becomes the master
(what systemd hands a service). relaymilter-popwatch (the installed script)
runs with ``source: journal`` and the default journal_senders.

Forgeries, each claiming to be Dovecot: ``logger --journald`` with
SYSLOG_IDENTIFIER=dovecot, ``logger -t dovecot`` through /dev/log, and a
process running as nobody that announces itself on journald's stdout socket
as unit dovecot.service and exits at once (journald then takes that unit
name for _SYSTEMD_UNIT when it cannot place the sender in a cgroup). None
may reach relayers.db; each is logged as refused with its sender's fields.
"""

from __future__ import annotations

import json
import os
import poplib
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from relaymilter.store.bdb import read_items

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dovecot import DovecotServer, pop3_login  # noqa: E402
from journald import STDOUT, Journald, stream_to_journal  # noqa: E402
from milterproc import ToolProcess, wait_for  # noqa: E402

pytestmark = pytest.mark.integration

NOBODY: dict = {"user": 65534, "group": 65534, "extra_groups": [], "cwd": "/"}
FORGED = "pop3-login: Login: user=<mallory>, method=PLAIN, rip=%s, lip=192.0.2.1, mpid=1, session=<forged>"


def entries(db: Path) -> dict[str, int]:
    if not db.exists():
        return {}
    return {k.decode(): int(v) for k, v in read_items(str(db))}


def journal_messages() -> list[tuple[float, str]]:
    """(the journal's own time, MESSAGE) of the last ten minutes' entries."""
    out = subprocess.run(["journalctl", "--output=json", "--no-pager", "--output-fields=MESSAGE",
                          "--since=@%d" % (time.time() - 600)],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return [(int(e["__REALTIME_TIMESTAMP"]) / 1e6, e["MESSAGE"]) for e in map(json.loads, out.splitlines())
            if isinstance(e.get("MESSAGE"), str)]


def journal_time(text: str) -> float:
    """The journal's own time of the (one) entry whose MESSAGE holds *text*."""
    found = [ts for ts, message in journal_messages() if text in message]
    assert len(found) == 1, (text, found)
    return found[0]


def session_times(ip: str) -> set[int]:
    """The whole seconds of the journal's times of ip's Dovecot login and of its logout, once logged.

    The map holds the login's time, then (the dovecot pattern tracks sessions) its logout's.
    """
    messages = journal_messages()
    login = [(ts, m) for ts, m in messages if "rip=%s," % ip in m and ": Login: " in m]
    assert len(login) == 1, (ip, login)
    session = login[0][1].split("session=<")[1].split(">")[0]
    return {int(login[0][0])} | {int(ts) for ts, m in messages if "<%s>: Disconnected" % session in m}


def forge_with_logger_journald(ip: str) -> None:
    """A local user (nobody) claims SYSLOG_IDENTIFIER=dovecot through the native journal protocol."""
    subprocess.run(["logger", "--journald"], input=("MESSAGE=%s\nSYSLOG_IDENTIFIER=dovecot\n" % (FORGED % ip)).encode(),
                   check=True, timeout=30, **NOBODY)


def forge_with_logger_syslog(ip: str) -> None:
    """A local user (nobody) sends a syslog line tagged dovecot to /dev/log."""
    subprocess.run(["logger", "-t", "dovecot", FORGED % ip], check=True, timeout=30, **NOBODY)


def forge_on_the_stdout_stream_as_nobody(ip: str) -> subprocess.Popen:
    """Announce unit dovecot.service on journald's stdout socket as nobody and write the line.

    The process stays until its stdin is closed, so journald can read its _COMM and _EXE (logger is
    often gone by then, and journald records neither).
    """
    code = ("import socket, sys; s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.connect(%r); "
            "s.sendall(b'dovecot\\ndovecot.service\\n6\\n0\\n0\\n0\\n0\\n' + %r); sys.stdin.read()"
            % (STDOUT, (FORGED % ip + "\n").encode()))
    # The system's python3: nobody may not reach the test's interpreter.
    return subprocess.Popen(["/usr/bin/python3", "-c", code], stdin=subprocess.PIPE, **NOBODY)


def end(proc: subprocess.Popen) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@pytest.fixture(scope="module")
def journald() -> Iterator[Journald]:
    with Journald() as jd:
        yield jd


@pytest.fixture(scope="module")
def dovecot_syslog(journald: Journald) -> Iterator[DovecotServer]:
    """Dovecot with its default log_path = syslog: lines reach journald's /dev/log from its log process."""
    if not journald.syslog_ok:
        pytest.skip(journald.syslog_why)
    server = DovecotServer(log_to="syslog", instance_name="dovecot")   # the syslog identifier, as installed
    server.start()
    try:
        yield server
    finally:
        server.stop()


def config(tmp_path: Path, grace: int = 60, extra: str = "") -> tuple[Path, Path, Path]:
    db = tmp_path / "relayers.db"
    cursor = tmp_path / "popwatch.cursor"
    cfg = tmp_path / "relaymilter.yaml"
    cfg.write_text("relayers: {path: %s}\n"
                   "popwatch:\n"
                   "  source: journal\n"
                   "  journal_cursor: %s\n"
                   "  grace: %d\n"
                   "  skip_networks: [127.0.0.1/32]\n%s" % (db, cursor, grace, extra), encoding="utf-8")
    return cfg, db, cursor


def start_popwatch(cfg: Path) -> ToolProcess:
    pw = ToolProcess(["relaymilter-popwatch", "-c", str(cfg)])
    try:
        wait_for("popwatch to follow the journal",
                 lambda: pw.said("following the systemd journal") or not pw.running())
        assert pw.running(), pw.output()
    except BaseException:
        pw.stop()
        raise
    return pw


def test_forged_login_lines_are_refused_and_dovecots_are_recorded(dovecot_syslog: DovecotServer,
                                                                  tmp_path: Path) -> None:
    cfg, db, _ = config(tmp_path)
    pw = start_popwatch(cfg)
    forger = None
    try:
        forge_with_logger_journald("203.0.113.66")
        forge_with_logger_syslog("203.0.113.67")
        forger = forge_on_the_stdout_stream_as_nobody("203.0.113.68")
        pop3_login("127.0.0.1", dovecot_syslog.pop3_port)          # in skip_networks
        with pytest.raises(poplib.error_proto):
            pop3_login("127.0.0.8", dovecot_syslog.pop3_port, password="wrong")
        pop3_login("127.0.0.7", dovecot_syslog.pop3_port)
        # The journal is read in order: once 127.0.0.7 is in, every line before it was judged.
        wait_for("127.0.0.7 in relayers.db", lambda: "127.0.0.7" in entries(db) or not pw.running())
        assert "127.0.0.7" in entries(db), pw.output()
        wait_for("three refusals", lambda: pw.count("refused: ") >= 3, timeout=5)
        got = entries(db)
        assert set(got) == {"127.0.0.7"}, (got, pw.output())
        # The login's time is the journal's, not the time the watcher read it.
        assert got["127.0.0.7"] in session_times("127.0.0.7")
        assert pw.said("login from 127.0.0.7 (dovecot, user alice)")
        refused = [line for line in pw.lines if "refused: " in line]
        assert len(refused) == 3, refused
        by_ip = {ip: next(line for line in refused if ip in line) for ip in ("203.0.113.66", "203.0.113.67",
                                                                             "203.0.113.68")}
        # (_COMM and _EXE are there when journald reads /proc before the sender exits: logger is often
        # gone by then; _UID comes with the message.)
        for ip, transport in (("203.0.113.66", "journal"), ("203.0.113.67", "syslog")):
            assert "_UID=65534 " in by_ip[ip] and "_TRANSPORT=%s)" % transport in by_ip[ip], by_ip[ip]
            assert "_COMM=" not in by_ip[ip] or "_COMM=logger " in by_ip[ip], by_ip[ip]
        assert "_COMM=python3 _EXE=/usr/bin/python3" in by_ip["203.0.113.68"], by_ip["203.0.113.68"]
        assert "_UID=65534 " in by_ip["203.0.113.68"] and "_TRANSPORT=stdout)" in by_ip["203.0.113.68"]
        assert all("user mallory" in line and "not recorded" in line for line in refused)
    finally:
        if forger is not None:
            end(forger)
        assert pw.stop() == 0, pw.output()


def test_a_restart_continues_where_it_stopped(dovecot_syslog: DovecotServer, tmp_path: Path) -> None:
    cfg, db, cursor = config(tmp_path)
    pw = start_popwatch(cfg)
    try:
        pop3_login("127.0.0.20", dovecot_syslog.pop3_port)
        wait_for("127.0.0.20 in relayers.db", lambda: "127.0.0.20" in entries(db))
    finally:
        assert pw.stop() == 0, pw.output()
    assert cursor.exists()
    # While the watcher is down: a login (to be recorded, with its own time) and a forgery.
    pop3_login("127.0.0.21", dovecot_syslog.pop3_port)
    forge_with_logger_journald("203.0.113.70")
    wait_for("the logout in the journal", lambda: len(session_times("127.0.0.21")) == 2 or
             time.time() > journal_time("rip=127.0.0.21,") + 1)
    logged = session_times("127.0.0.21")
    wait_for("a clock second later", lambda: time.time() >= max(logged) + 2, timeout=4)
    pw = start_popwatch(cfg)
    try:
        wait_for("127.0.0.21 in relayers.db", lambda: "127.0.0.21" in entries(db))
        assert entries(db)["127.0.0.21"] in logged, (entries(db), logged)
        wait_for("the forgery refused", lambda: pw.said("203.0.113.70"), timeout=5)
        # Nothing from before the stop is read again.
        assert not pw.said("127.0.0.20"), pw.output()
        assert pw.count("refused: ") == 1, pw.output()
        assert "203.0.113.70" not in entries(db)
    finally:
        assert pw.stop() == 0, pw.output()


def test_dovecot_on_a_journal_stream_as_under_systemd(journald: Journald, tmp_path: Path) -> None:
    """log_path = /dev/stderr, stderr a journald stream opened by the master-to-be; grace applies."""
    def stderr_to_journal() -> None:
        fd = stream_to_journal("dovecot", "dovecot.service")
        os.dup2(fd, 2)
        os.close(fd)

    grace = 3
    cfg, db, _ = config(tmp_path, grace=grace)
    with DovecotServer(log_to="/dev/stderr", preexec=stderr_to_journal, instance_name="dovecot") as dc:
        pw = start_popwatch(cfg)
        try:
            forge_with_logger_journald("203.0.113.71")
            pop3_login("127.0.0.30", dc.pop3_port)
            wait_for("127.0.0.30 in relayers.db", lambda: "127.0.0.30" in entries(db))
            assert entries(db)["127.0.0.30"] in session_times("127.0.0.30")
            wait_for("the forgery refused", lambda: pw.said("203.0.113.71"), timeout=5)
            assert "203.0.113.71" not in entries(db)
            wait_for("127.0.0.30 to expire after the grace period", lambda: "127.0.0.30" not in entries(db),
                     timeout=grace + 10)
        finally:
            assert pw.stop() == 0, pw.output()


def test_auto_picks_the_journal_while_journald_runs(journald: Journald, tmp_path: Path) -> None:
    cfg = tmp_path / "relaymilter.yaml"
    cfg.write_text("popwatch: {source: auto}\n", encoding="utf-8")
    out = subprocess.run(["relaymilter-popwatch", "-c", str(cfg), "--dumpconfig"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "source:        journal" in out.stdout, out
    out = subprocess.run(["relaymilter-popwatch", "-c", str(cfg), "--logfile", "/var/log/x.log", "--dumpconfig"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "source:        files" in out.stdout, out


def test_without_a_cursor_readback_reads_the_window_back(dovecot_syslog: DovecotServer, tmp_path: Path) -> None:
    cfg, db, cursor = config(tmp_path, extra="  readback: true\n")
    pop3_login("127.0.0.40", dovecot_syslog.pop3_port)
    journal_time("rip=127.0.0.40,")             # in the journal before the watcher starts
    assert not cursor.exists()
    pw = start_popwatch(cfg)
    try:
        wait_for("127.0.0.40 in relayers.db", lambda: "127.0.0.40" in entries(db))
        assert entries(db)["127.0.0.40"] in session_times("127.0.0.40")
    finally:
        assert pw.stop() == 0, pw.output()


def test_senders_follow_the_configuration_and_journalctl_is_restarted(dovecot_syslog: DovecotServer,
                                                                      tmp_path: Path) -> None:
    """SIGHUP applies new journal_senders; a killed journalctl is started again after the last cursor."""
    cfg, db, _ = config(tmp_path)
    pw = start_popwatch(cfg)
    try:
        forge_with_logger_journald("203.0.113.80")
        wait_for("the first line refused", lambda: pw.said("203.0.113.80"), timeout=5)
        # An admin who trusts what nobody sends natively (a test of the setting, not advice; not _COMM:
        # logger exits so soon that journald often cannot read its name any more).
        cfg.write_text(cfg.read_text() + "  journal_senders: [{_UID: 65534, _TRANSPORT: journal},\n"
                       "                    {_EXE: /usr/lib/dovecot/log, _UID: 0}]\n", encoding="utf-8")
        pw.proc.send_signal(signal.SIGHUP)
        wait_for("the reload", lambda: pw.said("SIGHUP: reloading"), timeout=5)
        forge_with_logger_journald("203.0.113.81")
        wait_for("203.0.113.81 in relayers.db", lambda: "203.0.113.81" in entries(db), timeout=5)
        assert "203.0.113.80" not in entries(db)

        started = [line for line in pw.lines if "journalctl pid " in line]
        child = int(started[-1].split("journalctl pid ")[1].split(")")[0])
        os.kill(child, signal.SIGKILL)
        wait_for("the end of journalctl noticed", lambda: pw.said("journalctl ended"), timeout=5)
        pop3_login("127.0.0.41", dovecot_syslog.pop3_port)      # logged while no journalctl runs
        wait_for("127.0.0.41 in relayers.db", lambda: "127.0.0.41" in entries(db), timeout=15)
        assert pw.count("journalctl pid ") == 2 and pw.count("203.0.113.81") == 1, pw.output()
    finally:
        assert pw.stop() == 0, pw.output()


def test_a_journal_it_may_not_read_is_one_line_at_start(journald: Journald, tmp_path: Path) -> None:
    """The real journalctl, run as nobody (through setpriv), is refused the journal: exit 1, one line."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "journalctl"
    wrapper.write_text("#!/bin/sh\nexec setpriv --reuid=65534 --regid=65534 --clear-groups -- %s \"$@\"\n"
                       % shutil.which("journalctl"))
    wrapper.chmod(0o755)
    cfg, db, _ = config(tmp_path)
    env = dict(os.environ, PATH="%s:%s" % (bindir, os.environ["PATH"]))
    out = subprocess.run(["relaymilter-popwatch", "-c", str(cfg)], capture_output=True, text=True, timeout=60, env=env,
                         cwd="/")
    assert out.returncode == 1, out
    last = out.stderr.splitlines()[-1]
    assert last.startswith("relaymilter-popwatch: error: ") and "cannot read the system journal" in last, out.stderr
    assert "insufficient permissions" in last and "Traceback" not in out.stderr
