"""The journal source's pure parts: journal_senders in the configuration, which entries are accepted,
an entry as a log line (matched by the shipped patterns), the cursor file.

The entries in tests/data/journal/ are journalctl --output=json lines recorded from a real
systemd-journald (252, standalone) with a real Dovecot 2.3 logging through it (log_path =
syslog, and log_path = /dev/stderr on a journald stdout stream as systemd gives a service),
and forged lines sent by logger --journald / logger -t dovecot (tests/integration/
test_popwatch_journal.py does the same live).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest

from relaymilter.cli.popwatch import main
from relaymilter.config import load_config
from relaymilter.errors import ConfigError
from relaymilter.popwatch.cursor import cursor_time, read_cursor, write_cursor
from relaymilter.popwatch.journal import accepts, as_line, describe
from relaymilter.popwatch.matcher import Matcher
from relaymilter.popwatch.patterns import load_patterns
from relaymilter.popwatchconfig import DEFAULT_JOURNAL_SENDERS, journal_running

DATA = Path(__file__).resolve().parent.parent / "data" / "journal"
SAMPLE = Path(__file__).resolve().parents[2] / "rules" / "relaymilter.sample.yaml"


def entries(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def logins(entry_list: list[dict]) -> list[dict]:
    return [e for e in entry_list if ": Login: user=<" in str(e.get("MESSAGE"))]


def config(tmp_path: Path, popwatch: str) -> str:
    path = tmp_path / "relaymilter.yaml"
    path.write_text("popwatch:\n" + popwatch + "relayers: {path: %s}\n" % (tmp_path / "relayers.db"), encoding="utf-8")
    return str(path)


# --- which senders are accepted ------------------------------------------------------------

@pytest.mark.parametrize("name", ["dovecot-syslog.json", "dovecot-stdout.json"])
def test_the_default_accepts_a_real_dovecots_login_lines(name: str) -> None:
    found = logins(entries(name))
    assert found, "the recording holds Dovecot's login lines"
    for e in found:
        assert accepts(DEFAULT_JOURNAL_SENDERS, e), describe(e)


def test_the_default_refuses_forged_login_lines() -> None:
    forged = logins(entries("forged.json"))
    assert len(forged) >= 2
    for e in forged:
        assert e.get("SYSLOG_IDENTIFIER") == "dovecot"      # what the forger claims
        assert not accepts(DEFAULT_JOURNAL_SENDERS, e), describe(e)
        assert "_UID=65534" in describe(e)


def test_every_field_of_a_match_must_hold_and_repeated_fields_never_match() -> None:
    real = logins(entries("dovecot-syslog.json"))[0]
    assert accepts(DEFAULT_JOURNAL_SENDERS, real)
    assert not accepts(DEFAULT_JOURNAL_SENDERS, dict(real, _UID="1000"))
    assert not accepts(DEFAULT_JOURNAL_SENDERS, dict(real, _EXE="/tmp/log"))
    assert not accepts(DEFAULT_JOURNAL_SENDERS, dict(real, _TRANSPORT="kernel"))
    assert not accepts(DEFAULT_JOURNAL_SENDERS, {k: v for k, v in real.items() if k != "_EXE"})
    assert not accepts(DEFAULT_JOURNAL_SENDERS, dict(real, _EXE=[real["_EXE"], real["_EXE"]]))


# --- an entry as a line: the same patterns as for log files -------------------------------

def test_an_accepted_entry_is_a_syslog_line_with_the_journals_time() -> None:
    real = logins(entries("dovecot-syslog.json"))[0]
    line = as_line(real)
    assert line is not None and line.endswith(b"\n") and line.count(b"\n") == 1
    assert (" dovecot[%s]: " % real["_PID"]).encode() in line
    events = Matcher(load_patterns()).scan(line, time.time())
    assert [(ev.kind, ev.pattern, ev.user) for ev in events] == [("login", "dovecot", "alice")]
    assert events[0].ts == int(real["__REALTIME_TIMESTAMP"]) / 1e6


def test_a_message_is_one_line_whatever_it_holds() -> None:
    real = logins(entries("dovecot-syslog.json"))[0]
    forged_second_line = "Disconnected\nDec  3 06:00:00 host dovecot: pop3-login: Login: user=<x>, method=PLAIN, " \
                         "rip=203.0.113.66, lip=192.0.2.1"
    line = as_line(dict(real, MESSAGE=forged_second_line))
    assert line is not None and line.count(b"\n") == 1
    assert Matcher(load_patterns()).scan(line, time.time()) == []
    binary = as_line(dict(real, MESSAGE=list(b"pop3-login: \xff")))
    assert binary is not None and binary.endswith(b"pop3-login: \xff\n")
    assert as_line({k: v for k, v in real.items() if k != "__REALTIME_TIMESTAMP"}) is None


# --- journal_senders in the configuration --------------------------------------------------

def test_the_sample_shows_the_built_in_default() -> None:
    cfg = load_config(str(SAMPLE))
    assert cfg.popwatch.journal_senders == DEFAULT_JOURNAL_SENDERS
    assert cfg.popwatch.source == "files"


def test_senders_of_ones_own(tmp_path: Path) -> None:
    cfg = load_config(config(tmp_path, "  source: journal\n  journal_senders:\n"
                                       "    - {_EXE: /usr/lib/cyrus/bin/pop3d, _SYSTEMD_UNIT: cyrus-imapd.service}\n"
                                       "    - {_UID: [0, 8], _COMM: pop3login}\n"))
    senders = cfg.popwatch.journal_senders
    assert len(senders) == 2 and dict(senders[1].fields)["_UID"] == frozenset({"0", "8"})
    assert accepts(senders, {"_UID": "8", "_COMM": "pop3login"})
    assert not accepts(senders, {"_UID": "8", "_COMM": "imaplogin"})


@pytest.mark.parametrize("text, message", [
    ("  journal_senders: [{SYSLOG_IDENTIFIER: dovecot, _UID: 0}]\n", "the sender sets it, anyone can forge it"),
    ("  journal_senders: [{_FOO: x, _UID: 0}]\n", "not a field journald sets"),
    ("  journal_senders: [{_COMM: dovecot}]\n", "a match needs _EXE, _UID, _GID or _SYSTEMD_UNIT"),
    ("  journal_senders: [{_COMM: log, _PID: 1234, _TRANSPORT: syslog}]\n", "a match needs"),
    ("  journal_senders: [{_UID: []}]\n", "an empty list matches nothing"),
    ("  journal_senders: [{_UID: true}]\n", "want text or a number"),
    ("  journal_senders: []\n", "accepts no one"),
    ("  journal_senders: [x]\n", "must be a mapping"),
    ("  source: journald\n", "must be one of files, journal, auto"),
])
def test_bad_senders_stop_with_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    path = config(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith("%s:2: " % path) and message in str(err.value)


# --- the cursor file ------------------------------------------------------------------------

def test_the_cursor_is_kept_in_a_file_replaced_as_a_whole(tmp_path: Path) -> None:
    cursor = entries("dovecot-syslog.json")[-1]["__CURSOR"]
    path = str(tmp_path / "popwatch.cursor")
    assert read_cursor(path) is None
    write_cursor(path, cursor)
    assert read_cursor(path) == cursor
    assert abs(cursor_time(cursor) - int(entries("dovecot-syslog.json")[-1]["__REALTIME_TIMESTAMP"]) / 1e6) < 1e-6
    # A link planted at the path is replaced, its target untouched.
    target = tmp_path / "target"
    target.write_text("keep\n")
    os.unlink(path)
    os.symlink(target, path)
    write_cursor(path, cursor)
    assert target.read_text() == "keep\n" and not os.path.islink(path) and read_cursor(path) == cursor
    Path(path).write_text("garbage\n")
    assert read_cursor(path) is None


# --- choosing the source ------------------------------------------------------------------------

def test_auto_needs_a_journald_that_answers(tmp_path: Path) -> None:
    path = str(tmp_path / "socket")
    assert not journal_running(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    try:
        assert journal_running(path)
    finally:
        server.close()
    assert os.path.exists(path) and not journal_running(path)     # the socket file of a journald that stopped


def test_auto_is_files_without_journald_and_logfile_means_files(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("relaymilter.cli.popwatch.journal_running", lambda: False)
    assert main(["-c", config(tmp_path, "  source: auto\n"), "--dumpconfig"]) == 0
    assert "source:        files" in capsys.readouterr().out
    monkeypatch.setattr("relaymilter.cli.popwatch.journal_running", lambda: True)
    assert main(["-c", config(tmp_path, "  source: auto\n"), "--dumpconfig"]) == 0
    assert "source:        journal" in capsys.readouterr().out
    assert main(["-c", config(tmp_path, "  source: auto\n"), "--logfile", "/x.log", "--dumpconfig"]) == 0
    assert "source:        files" in capsys.readouterr().out
    assert main(["-c", config(tmp_path, ""), "--source", "journal", "--logfile", "/x.log", "--dumpconfig"]) == 0
    assert "source:        journal" in capsys.readouterr().out


def test_the_journal_source_without_journalctl_says_so_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    assert main(["-c", config(tmp_path, "  source: journal\n  journal_cursor: null\n")]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == ("relaymilter-popwatch: error: popwatch.source journal: journalctl not found "
                                    "(Debian package systemd)")
    assert "Traceback" not in err
