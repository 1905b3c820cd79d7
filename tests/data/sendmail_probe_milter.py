"""NAME
    sendmail_probe_milter - a minimal pymilter milter for testing the sendmail set-up

SYNOPSIS
    python3 sendmail_probe_milter.py SOCKET LOGFILE

DESCRIPTION
    Proves that a real sendmail, configured with packaging/sendmail/relaymilter.m4,
    talks to a milter and applies its replies; it is independent of relaymilter's
    own code so that a fault in the fixture is not confused with one in the product.

    Recipients at @remote.example are rejected with
    setreply('550', '5.7.1', 'Relaying denied'); every other recipient continues.
    Each callback appends one JSON line to LOGFILE with what it was given and the
    macros sendmail sent, so tests can assert on {client_addr}, hostaddr and
    {auth_authen}.

DIAGNOSTICS
    Exits non-zero when the socket cannot be opened (pymilter raises). An error
    inside a callback tempfails the message (pymilter's default), which a test
    sees as a 451.
"""

from __future__ import annotations

import json
import sys
import threading
from typing import Any

import Milter

REJECT_DOMAIN = "@remote.example"
MACROS = {
    "connect": ("{client_addr}", "{daemon_name}", "{daemon_addr}", "{if_addr}", "j", "_"),
    "envfrom": ("{auth_authen}", "{auth_type}", "{mail_addr}", "{client_addr}"),
    "envrcpt": ("{client_addr}", "{rcpt_addr}", "{rcpt_host}", "{rcpt_mailer}", "{auth_authen}"),
}

_log_lock = threading.Lock()
_log_file: Any = None


def _log(record: dict) -> None:
    # libmilter calls back from a pool of threads; one line per record, whole.
    with _log_lock:
        _log_file.write(json.dumps(record, sort_keys=True) + "\n")
        _log_file.flush()


class ProbeMilter(Milter.Base):
    """Rejects @remote.example recipients; logs every connect, MAIL and RCPT."""

    def __init__(self) -> None:
        self.conn_id = Milter.uniqueID()

    def _macros(self, stage: str) -> dict:
        return {name: self.getsymval(name) for name in MACROS[stage]}

    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        _log({"event": "connect", "conn": self.conn_id, "hostname": hostname,
              "family": family, "hostaddr": list(hostaddr) if hostaddr else None,
              "macros": self._macros("connect")})
        return Milter.CONTINUE

    def envfrom(self, mailfrom: str, *params: str) -> int:
        _log({"event": "envfrom", "conn": self.conn_id, "from": mailfrom,
              "macros": self._macros("envfrom")})
        return Milter.CONTINUE

    def envrcpt(self, to: str, *params: str) -> int:
        rejected = to.strip("<>").lower().endswith(REJECT_DOMAIN)
        _log({"event": "envrcpt", "conn": self.conn_id, "rcpt": to,
              "decision": "reject" if rejected else "continue",
              "macros": self._macros("envrcpt")})
        if rejected:
            self.setreply("550", "5.7.1", "Relaying denied")
            return Milter.REJECT
        return Milter.CONTINUE


def main(argv: list[str]) -> int:
    global _log_file
    if len(argv) != 2:
        sys.stderr.write("usage: sendmail_probe_milter.py SOCKET LOGFILE\n")
        return 2
    socket, logfile = argv
    _log_file = open(logfile, "a", encoding="utf-8")
    Milter.factory = ProbeMilter
    Milter.runmilter("sendmail-probe", socket, timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
