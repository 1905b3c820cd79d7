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

_DOVECOT_AUTH = """\
base_dir = {run}/run
state_dir = {run}/state
instance_name = rmtest-auth-{tag}
protocols = none
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = 0
log_path = {run}/dovecot.log
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {run}/users
}}
userdb {{
  driver = static
  args = uid=65534 gid=65534 home={run}/home/%u
}}
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
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
        for sub in ("run", "state", "home"):
            (self.dir / sub).mkdir(mode=0o755, exist_ok=True)
        (self.dir / "users").write_text("".join("%s:{PLAIN}%s\n" % kv for kv in self.users.items()))
        for sock in self.sockets:
            sock.parent.mkdir(parents=True, exist_ok=True)
            os.chown(sock.parent, uid, gid)
            os.chmod(sock.parent, 0o700)
        conf = self.dir / "dovecot.conf"
        conf.write_text(_DOVECOT_AUTH.format(run=self.dir, tag=self.dir.name, listeners="".join(
            _LISTENER.format(path=sock, owner=postfix.MAIL_OWNER) for sock in self.sockets)))
        self.proc = subprocess.Popen(["dovecot", "-F", "-c", str(conf)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=open(self.dir / "stderr", "wb"))
        try:
            mta.wait_until(lambda: (self.dir / "run" / "master.pid").exists()
                           and all(_unix_listening(str(s)) for s in self.sockets), timeout, "dovecot auth",
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


def _unix_listening(path: str) -> bool:
    with open("/proc/net/unix", encoding="utf-8", errors="replace") as table:
        next(table)
        return any(len(f) >= 8 and f[7] == path and int(f[3], 16) & 0x10000 for f in (line.split() for line in table))
