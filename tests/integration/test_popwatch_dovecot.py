"""End to end: a real Dovecot logs logins, relaymilter-popwatch puts them in relayers.db.

Dovecot (tests/integration/dovecot.py) listens on 127.0.0.1 with log_path
to a file; relaymilter-popwatch (the installed console script) follows that
file with a 3 s grace and writes relayers.db in a temp dir. Clients connect
from chosen loopback addresses: a POP3 login from 127.0.0.7 and an IMAP
login from 127.0.0.9 appear in the map; a failed login from 127.0.0.8 never
does; after the grace period the entries are gone again.
"""

from __future__ import annotations

import poplib
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from relaymilter.store.bdb import read_items

sys.path.insert(0, str(Path(__file__).resolve().parent))
from milterproc import ToolProcess, wait_for  # noqa: E402
from dovecot import PASSWORD, USER, DovecotServer, imap_from, pop3_login  # noqa: E402

pytestmark = pytest.mark.integration

GRACE = 3


@pytest.fixture
def popwatch(dovecot: DovecotServer, tmp_path: Path) -> Iterator[tuple[ToolProcess, Path]]:
    db = tmp_path / "relayers.db"
    cfg = tmp_path / "relaymilter.yaml"
    cfg.write_text(
        "relayers: {path: %s}\n"
        "popwatch:\n"
        "  logfiles: [%s]\n"
        "  grace: %d\n"
        "  skip_networks: [127.0.0.1/32]\n" % (db, dovecot.log_path, GRACE),
        encoding="utf-8")
    pw = ToolProcess(["relaymilter-popwatch", "-c", str(cfg)])
    try:
        wait_for("popwatch to start following", lambda: pw.said("following ") or pw.proc.poll() is not None)
        assert pw.proc.poll() is None, "\n".join(pw.lines)
        yield pw, db
    finally:
        if pw.proc.poll() is None:
            pw.proc.send_signal(signal.SIGTERM)
            try:
                pw.proc.wait(10)
            except subprocess.TimeoutExpired:
                pw.proc.kill()
                pw.proc.wait(5)


def entries(db: Path) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in read_items(str(db))}


def test_logins_recorded_failures_ignored_and_expired_after_grace(dovecot: DovecotServer, popwatch) -> None:
    pw, db = popwatch

    t0 = time.time()
    pop3_login("127.0.0.7", dovecot.pop3_port)
    wait_for("127.0.0.7 in relayers.db", lambda: "127.0.0.7" in entries(db), timeout=5)
    stamp = entries(db)["127.0.0.7"]
    assert int(t0) - 1 <= stamp <= time.time() + 1

    imap = imap_from("127.0.0.9", dovecot.imap_port)
    imap.login(USER, PASSWORD)
    imap.select("INBOX")
    imap.logout()
    wait_for("127.0.0.9 in relayers.db", lambda: "127.0.0.9" in entries(db), timeout=5)

    with pytest.raises(poplib.error_proto):
        pop3_login("127.0.0.8", dovecot.pop3_port, password="wrong")
    log_text = lambda: Path(dovecot.log_path).read_text(encoding="utf-8", errors="replace")  # noqa: E731
    wait_for("the failed login in Dovecot's log", lambda: "rip=127.0.0.8" in log_text())
    # A later success proves the watcher has read past the failure (lines are handled in order).
    pop3_login("127.0.0.10", dovecot.pop3_port)
    wait_for("127.0.0.10 in relayers.db", lambda: "127.0.0.10" in entries(db), timeout=5)
    assert "127.0.0.8" not in entries(db)
    assert pw.said("login from 127.0.0.7 (dovecot, user alice)")

    # Nothing is logged any more: expiry runs on the clock, GRACE seconds after the logouts.
    wait_for("the entries to expire", lambda: not entries(db), timeout=GRACE + 6)
    wait_for("the expiry log line", lambda: pw.said("expired 127.0.0.7"), timeout=5)
    assert pw.stop() == 0
    assert pw.said("stopping:")


def test_entry_written_by_someone_else_is_left_alone(dovecot: DovecotServer, popwatch) -> None:
    """vsmtprelay add with future ticks: a login neither lowers nor expires it."""
    from relaymilter.store.relayers import open_relay_store

    pw, db = popwatch
    future = int(time.time()) + 86400
    store = open_relay_store(str(db))
    store.add({"127.0.0.7": future})
    pop3_login("127.0.0.7", dovecot.pop3_port)
    pop3_login("127.0.0.11", dovecot.pop3_port)
    wait_for("127.0.0.11 in relayers.db", lambda: "127.0.0.11" in entries(db), timeout=5)
    wait_for("127.0.0.11 to expire", lambda: "127.0.0.11" not in entries(db), timeout=GRACE + 6)
    assert entries(db).get("127.0.0.7") == future
    store.close()
    assert pw.stop() == 0
