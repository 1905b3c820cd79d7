"""relaymilter-popwatch command line: --test, --list, --dumpconfig, errors."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from relaymilter.cli.popwatch import main

LOGS = Path(__file__).resolve().parent.parent / "data" / "logs"


def config(tmp_path: Path, extra: str = "") -> str:
    path = tmp_path / "relaymilter.yaml"
    path.write_text("relayers: {path: %s}\npopwatch:\n  grace: 60\n  skip_networks: [127.0.0.0/8]\n%s" % (
        tmp_path / "relayers.db", extra), encoding="utf-8")
    return str(path)


def test_test_mode_prints_logins_and_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["-c", config(tmp_path), "--test", str(LOGS / "dovecot.log")]) == 0
    out = capsys.readouterr().out.splitlines()
    logins = [line.split()[2:4] for line in out if not line.startswith("#")]
    # 127.0.0.7/127.0.0.9 are in skip_networks; 999.1.2.3 is not an address.
    assert logins == [["192.0.2.7", "dovecot"], ["2001:db8::7", "dovecot"], ["198.51.100.9", "dovecot"],
                      ["192.0.2.44", "dovecot"], ["192.0.2.45", "dovecot"]]
    assert out[-1].startswith("# 22 lines read, 5 logins")
    assert "1 invalid addresses, 2 in skipped networks" in out[-1]
    assert not (tmp_path / "relayers.db").exists()


def test_list_and_dumpconfig(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["-c", config(tmp_path), "--pattern", "dovecot,cyrus", "--list"]) == 0
    out = capsys.readouterr().out
    assert "dovecot: Dovecot" in out and "cyrus: Cyrus" in out and "courier" not in out
    assert main(["-c", config(tmp_path), "--grace=99", "--logfile", "/x.log", "--watchlog", "/y.log",
                 "--nowrite", "--noflock", "--dumpconfig"]) == 0
    out = capsys.readouterr().out
    assert "grace:         99" in out and "logfiles:      /x.log, /y.log" in out
    assert "write:         no" in out and "skip_networks: 127.0.0.0/8" in out


def test_max_session_comes_from_the_config_and_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["-c", config(tmp_path), "--dumpconfig"]) == 0
    assert "max_session:   28800" in capsys.readouterr().out
    assert main(["-c", config(tmp_path, "  max_session: 7200\n"), "--dumpconfig"]) == 0
    assert "max_session:   7200" in capsys.readouterr().out
    assert main(["-c", config(tmp_path, "  max_session: 7200\n"), "--max-session", "60", "--dumpconfig"]) == 0
    assert "max_session:   60" in capsys.readouterr().out
    path = config(tmp_path, "  max_session: 0\n")
    assert main(["-c", path, "--dumpconfig"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("relaymilter-popwatch: error: %s:5: " % path) and "max_session" in err


def test_errors_are_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "pat.yaml"
    bad.write_text("patterns:\n  - name: x\n    server: y\n    regex: 'no ip group'\n", encoding="utf-8")
    assert main(["-c", config(tmp_path), "--pattern-file", str(bad), "--list"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("relaymilter-popwatch: error: %s:4: " % bad) and err.count("\n") == 1
    assert main(["-c", config(tmp_path), "--pattern", "nosuch", "--list"]) == 2
    assert main(["--grace"]) == 2


def test_installed_script_runs() -> None:
    exe = shutil.which("relaymilter-popwatch")
    if exe is None:
        pytest.skip("relaymilter-popwatch is not installed")
    done = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("relaymilter-popwatch ")
