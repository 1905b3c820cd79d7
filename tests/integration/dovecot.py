"""A private Dovecot POP3/IMAP server for integration tests.

Dovecot (Debian's dovecot-pop3d / dovecot-imapd) runs as a direct child of
the test, on loopback only, on free ports, with a passwd-file user and its
log written to a file (``log_path``) that relaymilter-popwatch can follow.
Nothing under /etc/dovecot is touched: every setting lives in a config file
inside the server's own run directory.

Facts this relies on (see the project notes on Dovecot in tests): the run
directory must be mode 0755 (the auth process runs as ``dovecot`` and must
read the users file); base_dir paths must stay short (unix socket names);
ready means both ports LISTEN *and* run/master.pid exists; SIGTERM on the
master takes about 1.1 s; clients should quit/logout before the stop.

Use::

    with DovecotServer() as dc:
        client = pop3_from("127.0.0.7", dc.pop3_port)
        client.user("alice"); client.pass_("secret"); client.quit()
        dc.log_path   # the file Dovecot writes its log lines to
        pop3_login("127.0.0.7", dc.pop3_port)     # a whole POP3 session of USER

BASE_CONF and prepare_rundir are what saslauth.DovecotAuth (the auth service
alone, for Postfix's SASL) shares with this server; the "dovecot" fixture in
conftest.py starts one for a test.
"""

from __future__ import annotations

import imaplib
import os
import poplib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Callable, Mapping, Optional

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"
USER = "alice"
PASSWORD = "secret"

# What every test Dovecot shares (this server and saslauth.DovecotAuth): every path inside
# its own run directory, plaintext logins checked against a passwd-file with no failure
# delay, no anvil penalty socket. Format with run= (the run directory), instance= and log_path=.
BASE_CONF = """\
base_dir = {run}/run
state_dir = {run}/state
instance_name = {instance}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = 0
log_path = {log_path}
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
"""

CONF = BASE_CONF + """\
listen = 127.0.0.1
protocols = pop3 imap
auth_verbose = yes
log_timestamp = "{log_timestamp}"
mail_location = maildir:~/Maildir
service pop3-login {{
  inet_listener pop3 {{
    port = {pop3_port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
service imap-login {{
  inet_listener imap {{
    port = {imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
"""


def prepare_rundir(run: str, users: Mapping[str, str]) -> None:
    """The run directory's parts BASE_CONF names: run/, state/ and home/ (0755: the auth
    process runs as dovecot), and the passwd-file of *users* (name -> password), readable."""
    os.chmod(run, 0o755)
    for sub in ("run", "state", "home"):
        os.makedirs(os.path.join(run, sub), 0o755, exist_ok=True)
    os.chown(os.path.join(run, "home"), 65534, 65534)
    with open(os.path.join(run, "users"), "w", encoding="ascii") as fh:
        fh.write("".join("%s:{PLAIN}%s\n" % kv for kv in users.items()))
    os.chmod(os.path.join(run, "users"), 0o644)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_ports() -> set[int]:
    """Ports in LISTEN state on IPv4 (from /proc/net/tcp)."""
    ports = set()
    with open("/proc/net/tcp", encoding="ascii") as fh:
        next(fh)
        for line in fh:
            fields = line.split()
            if fields[3] == "0A":
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


class _BoundPOP3(poplib.POP3):
    """poplib.POP3 whose connection leaves from a chosen source address."""

    def __init__(self, source: str, host: str, port: int, timeout: float = 10.0) -> None:
        self._source = source
        super().__init__(host, port, timeout=timeout)

    def _create_socket(self, timeout):  # noqa: ANN001 - poplib's signature
        return socket.create_connection((self.host, self.port), timeout, source_address=(self._source, 0))


class _BoundIMAP4(imaplib.IMAP4):
    """imaplib.IMAP4 whose connection leaves from a chosen source address."""

    def __init__(self, source: str, host: str, port: int, timeout: float = 10.0) -> None:
        self._source = source
        super().__init__(host, port, timeout=timeout)

    def _create_socket(self, timeout):  # noqa: ANN001 - imaplib's signature
        return socket.create_connection((self.host, self.port), timeout, source_address=(self._source, 0))


def pop3_from(source: str, port: int, host: str = "127.0.0.1") -> poplib.POP3:
    return _BoundPOP3(source, host, port)


def imap_from(source: str, port: int, host: str = "127.0.0.1") -> imaplib.IMAP4:
    return _BoundIMAP4(source, host, port)


def pop3_login(source: str, port: int, password: str = PASSWORD) -> None:
    """A whole POP3 session of USER from *source*: USER, PASS, STAT, QUIT (a wrong password raises)."""
    client = pop3_from(source, port)
    try:
        client.user(USER)
        client.pass_(password)
        client.stat()
    finally:
        client.quit()


class DovecotServer:
    """One private Dovecot instance; start() / stop() or use as a context manager."""

    def __init__(self, log_timestamp: str = "%b %d %H:%M:%S ", start_timeout: float = 15.0,
                 log_to: Optional[str] = None, preexec: Optional[Callable[[], None]] = None,
                 instance_name: Optional[str] = None) -> None:
        """log_to: Dovecot's log_path (default: the file log_path names; "syslog" for syslog(3));
        preexec: run in the child before dovecot is executed (e.g. to connect its stderr to journald);
        instance_name: default rmtest-RUNDIR (it is also Dovecot's syslog identifier: "dovecot" as
        installed)."""
        self.log_timestamp = log_timestamp
        self.start_timeout = start_timeout
        self.log_to = log_to
        self.preexec = preexec
        self.instance_name = instance_name
        self.rundir = ""
        self.pop3_port = 0
        self.imap_port = 0
        self.proc: Optional[subprocess.Popen] = None

    @property
    def log_path(self) -> str:
        return os.path.join(self.rundir, "dovecot.log")

    @property
    def conf_path(self) -> str:
        return os.path.join(self.rundir, "dovecot.conf")

    def _write_files(self) -> None:
        # Short path under /tmp: base_dir socket names are limited to ~82 characters.
        self.rundir = tempfile.mkdtemp(prefix="rmdc", dir="/tmp")
        prepare_rundir(self.rundir, {USER: PASSWORD})
        self.pop3_port = free_port()
        self.imap_port = free_port()
        while self.imap_port == self.pop3_port:
            self.imap_port = free_port()
        with open(self.conf_path, "w", encoding="ascii") as fh:
            fh.write(CONF.format(run=self.rundir, pop3_port=self.pop3_port,
                                 imap_port=self.imap_port, log_timestamp=self.log_timestamp,
                                 log_path=self.log_to or self.log_path,
                                 instance=self.instance_name or "rmtest-" + os.path.basename(self.rundir)))

    def start(self) -> "DovecotServer":
        self._write_files()
        check = subprocess.run(["doveconf", "-n", "-c", self.conf_path], capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise RuntimeError("doveconf refused the test config: %s" % check.stderr.strip())
        self.proc = subprocess.Popen([DOVECOT, "-F", "-c", self.conf_path], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL,
                                     stderr=None if self.preexec else subprocess.PIPE, preexec_fn=self.preexec)
        deadline = time.monotonic() + self.start_timeout
        pidfile = os.path.join(self.rundir, "run", "master.pid")
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode("utf-8", "replace") if self.proc.stderr else ""
                self.stop()
                raise RuntimeError("dovecot exited with %s: %s" % (self.proc.returncode, err.strip()))
            if {self.pop3_port, self.imap_port} <= listening_ports() and os.path.exists(pidfile):
                return self
            time.sleep(0.01)
        self.stop()
        raise RuntimeError("dovecot did not become ready within %gs" % self.start_timeout)

    def reopen_logs(self) -> None:
        """Make Dovecot reopen its log file (after the test renamed it)."""
        subprocess.run(["doveadm", "-c", self.conf_path, "log", "reopen"], check=True, timeout=30,
                       capture_output=True)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the master by PID, wait (bounded), SIGKILL if it hangs; remove the run dir."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc is not None and proc.stderr is not None:
            proc.stderr.close()
        self.proc = None
        if self.rundir:
            shutil.rmtree(self.rundir, ignore_errors=True)
            self.rundir = ""

    def __enter__(self) -> "DovecotServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
