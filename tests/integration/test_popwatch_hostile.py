"""relaymilter-popwatch against what a local user can put in or at its log.

Real processes and real files: a directory where the log should be (the daemon must
say so once, not every poll and every inotify event), and user names holding control
characters (--test must print them escaped: a log line must not forge output lines or
terminal escapes).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from relaymilter.store.relayers import BDBRelayStore

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def own_config(tmp_path: Path) -> dict[str, str]:
    """The environment for a popwatch that reads our (empty) configuration, whatever /etc holds."""
    ok = tmp_path / "ok.yaml"
    ok.write_text("{}\n")
    return {**os.environ, "RELAYMILTER_CONFIG": str(ok)}


def login_line(user: str, ip: str) -> bytes:
    stamp = time.strftime("%b %e %H:%M:%S", time.localtime()).encode()
    return b"%s mail dovecot: pop3-login: Login: user=<%s>, method=PLAIN, rip=%s, lip=192.0.2.1\n" % (
        stamp, user.encode("utf-8"), ip.encode())


def test_a_directory_at_the_log_path_is_reported_once(tmp_path: Path) -> None:
    log = tmp_path / "mail.log"
    log.mkdir()
    err = tmp_path / "popwatch.err"
    with open(err, "wb") as fh:
        proc = subprocess.Popen(["relaymilter-popwatch", "--logfile", str(log), "--dbfile", str(tmp_path / "r.db"),
                                 "--nowrite", "--pattern", "dovecot"], stdout=fh, stderr=fh,
                                env=own_config(tmp_path))
    try:
        deadline = time.monotonic() + 5
        n = 0
        while time.monotonic() < deadline:     # activity in the directory: inotify events
            (log / ("f%d" % n)).write_text("x")
            n += 1
            time.sleep(0.05)
        # it becomes a file: followed from then on
        for f in log.iterdir():
            f.unlink()
        log.rmdir()
        log.write_bytes(b"")
        for _ in range(100):
            if b"appeared: following it" in err.read_bytes():
                break
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(10)
    text = err.read_text()
    assert text.count("ERROR") == 1, text
    assert "is a directory, not a log file" in text and "appeared: following it" in text, text


def test_test_mode_escapes_control_characters_in_user_names(tmp_path: Path) -> None:
    log = tmp_path / "mail.log"
    log.write_bytes(login_line("al\x1b[31mice", "192.0.2.10") + login_line("bob\rfake line", "192.0.2.11")
                    + login_line("carol", "192.0.2.12"))
    proc = subprocess.run(["relaymilter-popwatch", "--test", str(log), "--pattern", "dovecot"], capture_output=True,
                          timeout=60, env=own_config(tmp_path))
    out = proc.stdout.decode("utf-8")
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in out and "\r" not in out, repr(out)
    assert "user=al\\x1b[31mice" in out and "user=bob\\rfake line" in out and "user=carol" in out, out
    assert len([line for line in out.splitlines() if not line.startswith("#")]) == 3, out


def test_a_login_after_a_long_nul_hole_is_recorded_by_the_daemon_and_by_test(tmp_path: Path) -> None:
    """A copy-truncate hole longer than a line (16 KB) does not hide the line written after it."""
    log = tmp_path / "mail.log"
    db = tmp_path / "relayers.db"
    log.write_bytes(b"Dec  3 04:00:00 mail dovecot: master: started\n")
    err = tmp_path / "popwatch.err"
    with open(err, "wb") as fh:
        proc = subprocess.Popen(["relaymilter-popwatch", "--logfile", str(log), "--dbfile", str(db),
                                 "--pattern", "dovecot", "--grace", "600"], stdout=fh, stderr=fh,
                                env=own_config(tmp_path))
    try:
        for _ in range(100):
            if b"following" in err.read_bytes():
                break
            time.sleep(0.1)
        with open(log, "ab") as fh:
            fh.write(b"\0" * 40000 + login_line("alice", "192.0.2.77"))
        store = BDBRelayStore(str(db))
        for _ in range(100):
            if db.exists() and store.lookup("192.0.2.77") is not None:
                break
            time.sleep(0.1)
        assert store.lookup("192.0.2.77") is not None, err.read_text()
    finally:
        proc.terminate()
        proc.wait(10)
    out = subprocess.run(["relaymilter-popwatch", "--test", str(log), "--pattern", "dovecot"], capture_output=True,
                         timeout=60, env=own_config(tmp_path)).stdout.decode()
    assert "192.0.2.77" in out and "user=alice" in out, out
