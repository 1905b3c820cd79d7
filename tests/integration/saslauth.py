"""NAME
    saslauth - a Dovecot with its auth service alone, as Postfix's SASL back end in tests

DESCRIPTION
    `protocols = none`: no POP or IMAP, only the auth service, with a
    passwd-file of users and one unix listener per Postfix queue directory at
    QUEUE/private/dovecot-auth (owned by Postfix's mail_owner), which main.cf
    names `smtpd_sasl_type = dovecot`, `smtpd_sasl_path = private/dovecot-auth`.
    Run directory 0755 and short (see the Dovecot notes in dovecot.py);
    ready = master.pid plus every listener accepting; stopped by PID.

DIAGNOSTICS
    mta.MTAError with Dovecot's stderr when it does not come up in time.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Mapping, Optional, Sequence

import mta
import postfix
from dovecot import BASE_CONF, prepare_rundir
from milterproc import unix_listening

# dovecot.BASE_CONF and this, formatted with listeners= (one _LISTENER per socket).
_AUTH_ONLY = """\
protocols = none
service auth {{
{listeners}}}
"""
_LISTENER = """  unix_listener {path} {{
    mode = 0660
    user = {owner}
    group = {owner}
  }}
"""



class DovecotAuth:
    """A Dovecot with its auth service alone (protocols = none), for Postfix's SASL.

    One listener per Postfix queue directory, at QUEUE/private/dovecot-auth,
    owned by the mail_owner (smtpd_sasl_path = private/dovecot-auth).
    """

    def __init__(self, queues: Sequence[Path], users: Mapping[str, str]) -> None:
        self.dir = postfix.short_rundir("rmsa")
        self.queues = [Path(q) for q in queues]
        self.users = dict(users)
        self.proc: Optional[subprocess.Popen] = None

    @property
    def sockets(self) -> list[Path]:
        return [q / "private" / "dovecot-auth" for q in self.queues]

    def start(self, timeout: float = 15.0) -> "DovecotAuth":
        uid, gid = postfix.ensure_accounts()
        prepare_rundir(str(self.dir), self.users)
        for sock in self.sockets:
            sock.parent.mkdir(parents=True, exist_ok=True)
            os.chown(sock.parent, uid, gid)
            os.chmod(sock.parent, 0o700)
        conf = self.dir / "dovecot.conf"
        listeners = "".join(_LISTENER.format(path=sock, owner=postfix.MAIL_OWNER) for sock in self.sockets)
        conf.write_text((BASE_CONF + _AUTH_ONLY).format(run=self.dir, instance="rmtest-auth-" + self.dir.name,
                                                        log_path=self.dir / "dovecot.log", listeners=listeners))
        self.proc = subprocess.Popen(["dovecot", "-F", "-c", str(conf)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=open(self.dir / "stderr", "wb"))
        try:
            mta.wait_until(lambda: (self.dir / "run" / "master.pid").exists()
                           and all(unix_listening(str(s)) for s in self.sockets), timeout, "dovecot auth",
                           alive=lambda: self.proc is not None and self.proc.poll() is None)
        except mta.MTAError as exc:
            self.stop()
            raise mta.MTAError("%s: %s" % (exc, (self.dir / "stderr").read_text(errors="replace"))) from None
        return self

    def stop(self) -> None:
        if self.proc is not None:
            mta.terminate(self.proc, signal.SIGTERM, 10.0)
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

