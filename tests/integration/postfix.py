"""NAME
    postfix - a throwaway real Postfix on loopback, run from Debian's unpacked package

SYNOPSIS
    import postfix
    with postfix.Postfix(rundir, port, wiring=postfix.snippet("a", milter="inet:127.0.0.1:8894")) as pf:
        mta.rcpt_replies(pf.port, "127.0.0.5", "<a@b.test>", ["<bob@remote.example>"])
        pf.deliveries()     # {"bob@remote.example": "REMOTE", ...}: where Postfix would deliver

DESCRIPTION
    Postfix conflicts with sendmail-bin (both are the mail-transport-agent), so
    it is never installed: package_root() runs `apt-get download postfix` once
    per machine and unpacks it with `dpkg-deb -x` into a shared cache
    (/var/tmp/relaymilter-postfix, under an flock so concurrent test runs
    share one copy). The instance runs from there with a private main.cf and
    master.cf in its run directory: queue, data directory and log are private,
    smtpd listens on 127.0.0.1:PORT only and is chrooted into the queue
    directory as Debian ships it. Two system accounts are created on first use:
    the mail_owner `rmpostfix` and the setgid_group `rmpostdrop`.

    Nothing is delivered: the local, relay and default transports are the
    discard(8) daemon with a next-hop tag (LOCAL, RELAY, REMOTE), which the
    log shows as `status=sent (LOCAL)`, telling "accepted for this host" from
    "relayed". deliveries() reads those lines from the maillog.

    The relay wiring under test is added to main.cf as text, normally one of
    the shipped snippets (snippet()), read from packaging/postfix/ verbatim
    except the socket and map paths, which are substituted (and the
    substitution is checked to have happened).

    Readiness is master's pid file naming a live process plus the port in
    LISTEN state; no probing connection (that would be an SMTP session).
    Stop is `postfix stop` and then, by PID, whatever is left in the master's
    session. Every wait is bounded.

DIAGNOSTICS
    mta.MTAError when the package cannot be downloaded or unpacked, Postfix
    does not start (with the tail of its maillog, where its fatal errors
    land), or does not stop within the bound: never a skip.
"""

from __future__ import annotations

import fcntl
import grp
import os
import pwd
import re
import shutil
import signal
import smtplib
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

import mta

REPO = Path(__file__).resolve().parents[2]
SNIPPETS = {"a": REPO / "packaging" / "postfix" / "main.cf.snippet",
            "b": REPO / "packaging" / "postfix" / "main.cf.snippet-b"}
SHIPPED_SOCKET = "inet:127.0.0.1:8894"
SHIPPED_MAP = "/var/lib/relaymilter/relayers"
CACHE = Path("/var/tmp/relaymilter-postfix")
MAIL_OWNER = "rmpostfix"
SETGID_GROUP = "rmpostdrop"
MYHOSTNAME = "mx.local.test"
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"}

_MAIN_CF = """\
# throwaway Postfix for relaymilter's integration tests (tests/integration/postfix.py)
compatibility_level = 3.6
queue_directory = {d}/queue
data_directory = {d}/data
command_directory = {r}/usr/sbin
daemon_directory = {r}/usr/lib/postfix/sbin
shlib_directory = {r}/usr/lib/postfix
meta_directory = {r}/etc/postfix
mail_owner = {owner}
setgid_group = {group}
import_environment = MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ LANG=C LD_LIBRARY_PATH={r}/usr/lib/postfix
maillog_file = {d}/maillog
maillog_file_prefixes = {d}
syslog_name = postfix-rmtest
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = {host}
mydomain = local.test
myorigin = local.test
mydestination = local.test, localhost
relay_domains = relayed.test
mynetworks = 127.0.0.1/32
smtpd_peername_lookup = no
smtpd_banner = $myhostname ESMTP
biff = no
alias_maps =
alias_database =
local_recipient_maps =
local_transport = discard:LOCAL
relay_transport = discard:RELAY
default_transport = discard:REMOTE
smtpd_error_sleep_time = 0
smtpd_soft_error_limit = 1000
smtpd_hard_error_limit = 1000
in_flow_delay = 0
default_process_limit = 50
"""

_SASL_CF = """\
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = dovecot
smtpd_sasl_path = private/dovecot-auth
"""

_MASTER_CF = """\
{port_line}
pickup    unix  n       -       y       60      1       pickup
cleanup   unix  n       -       y       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       y       -       -       trivial-rewrite
bounce    unix  -       -       y       -       0       bounce
defer     unix  -       -       y       -       0       bounce
trace     unix  -       -       y       -       0       bounce
verify    unix  -       -       y       -       1       verify
flush     unix  n       -       y       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
showq     unix  n       -       y       -       -       showq
error     unix  -       -       y       -       -       error
retry     unix  -       -       y       -       -       error
discard   unix  -       -       y       -       -       discard
anvil     unix  -       -       y       -       1       anvil
scache    unix  -       -       y       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

_SENT = re.compile(r"postfix-rmtest/discard\[\d+\]: (\w+): to=<([^>]*)>,.* status=sent \((\w+)\)")
_QUEUED = re.compile(r"queued as (\w+)")

def _run(argv: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False, **kwargs)  # type: ignore[call-overload]


def package_root() -> Path:
    """Debian's postfix package unpacked (downloaded on first use, shared by all test runs)."""
    CACHE.mkdir(mode=0o755, parents=True, exist_ok=True)
    root = CACHE / "root"
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (CACHE / "ready").exists():
            return root
        with tempfile.TemporaryDirectory(dir=CACHE) as work:
            proc = _run(["apt-get", "download", "postfix"], cwd=work)
            if proc.returncode != 0:        # a fresh machine may have no package lists yet
                _run(["apt-get", "-o", "DPkg::Lock::Timeout=600", "update", "-qq"])
                proc = _run(["apt-get", "download", "postfix"], cwd=work)
            debs = sorted(Path(work).glob("postfix_*.deb"))
            if proc.returncode != 0 or not debs:
                raise mta.MTAError("cannot download Debian's postfix package: %s" % proc.stderr.strip()[-300:])
            shutil.rmtree(root, ignore_errors=True)
            proc = _run(["dpkg-deb", "-x", str(debs[0]), str(root)])
            if proc.returncode != 0:
                raise mta.MTAError("dpkg-deb -x %s: %s" % (debs[0].name, proc.stderr.strip()))
        meta = root / "etc" / "postfix"
        meta.mkdir(parents=True, exist_ok=True)
        for name in ("dynamicmaps.cf", "makedefs.out"):
            shutil.copy(root / "usr/share/postfix" / name, meta / name)
        shutil.copy(root / "usr/share/postfix/main.cf.dist", meta / "main.cf.proto")
        shutil.copy(root / "usr/share/postfix/master.cf.dist", meta / "master.cf.proto")
        (meta / "postfix-files").touch()
        (CACHE / "ready").write_text(debs[0].name + "\n")
    return root


def package_version() -> str:
    """The unpacked package's file name, e.g. postfix_3.7.11-0+deb12u1_amd64.deb."""
    package_root()
    return (CACHE / "ready").read_text().strip()


def ensure_accounts() -> tuple[int, int]:
    """The mail_owner and setgid_group accounts (system accounts, created once); (uid, gid of owner)."""
    for argv, exists in ((["groupadd", "--system", SETGID_GROUP], lambda: grp.getgrnam(SETGID_GROUP)),
                         (["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                           "--shell", "/usr/sbin/nologin", MAIL_OWNER], lambda: pwd.getpwnam(MAIL_OWNER))):
        try:
            exists()
        except KeyError:
            proc = _run(argv)
            if proc.returncode not in (0, 9):      # 9: created meanwhile by another run
                raise mta.MTAError("%s: %s" % (" ".join(argv), proc.stderr.strip()))
    pw = pwd.getpwnam(MAIL_OWNER)
    return pw.pw_uid, pw.pw_gid


def snippet(variant: str, milter: str = SHIPPED_SOCKET, relayers_map: Optional[str] = None) -> str:
    """A shipped snippet's text, verbatim but for the milter socket and relayers map path."""
    text = SNIPPETS[variant].read_text()
    if milter != SHIPPED_SOCKET:
        if ("{ %s," % SHIPPED_SOCKET) not in text:
            raise AssertionError("%s no longer names %s" % (SNIPPETS[variant].name, SHIPPED_SOCKET))
        text = text.replace("{ %s," % SHIPPED_SOCKET, "{ %s," % milter)
    if relayers_map is not None:
        if "hash:" + SHIPPED_MAP not in text:
            raise AssertionError("%s no longer names hash:%s" % (SNIPPETS[variant].name, SHIPPED_MAP))
        text = text.replace("hash:" + SHIPPED_MAP, "hash:" + relayers_map)
    return text


def active_lines(text: str) -> list[str]:
    """main.cf lines that set something (continuations joined), comments dropped."""
    lines: list[str] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace() and lines:
            lines[-1] += " " + line.strip()
        else:
            lines.append(line.strip())
    return lines


class Postfix:
    """One private Postfix on 127.0.0.1:*port*; see the module header."""

    def __init__(self, rundir: Path, port: int, wiring: str = "", sasl: bool = False,
                 settings: Optional[Mapping[str, str]] = None) -> None:
        self.dir = Path(rundir).resolve()
        self.port = port
        self.wiring = wiring
        self.sasl = sasl
        self.settings = dict(settings or {})
        self.root = package_root()
        self.conf = self.dir / "conf"
        self.queue = self.dir / "queue"
        self.maillog = self.dir / "maillog"
        self.pid: Optional[int] = None
        self.env = {**CLEAN_ENV, "LD_LIBRARY_PATH": str(self.root / "usr/lib/postfix")}

    # -- configuration -------------------------------------------------------------

    def main_cf(self) -> str:
        text = _MAIN_CF.format(d=self.dir, r=self.root, owner=MAIL_OWNER, group=SETGID_GROUP, host=MYHOSTNAME)
        if self.sasl:
            text += _SASL_CF
        text += "".join("%s = %s\n" % kv for kv in self.settings.items())
        return text + "\n# --- the wiring under test ---\n" + self.wiring

    def configure(self) -> None:
        uid, gid = ensure_accounts()
        os.chmod(self.dir, 0o755)
        self.conf.mkdir(exist_ok=True)
        self.queue.mkdir(exist_ok=True)
        os.chmod(self.queue, 0o755)
        data = self.dir / "data"
        data.mkdir(exist_ok=True)
        os.chown(data, uid, gid)
        os.chmod(data, 0o700)
        (self.conf / "main.cf").write_text(self.main_cf())
        (self.conf / "master.cf").write_text(_MASTER_CF.format(
            port_line="127.0.0.1:%d inet n       -       y       -       -       smtpd" % self.port))

    def postfix(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run `postfix -c CONF ARGS` (or another command: postconf, postmap) from the package."""
        tool, rest = (args[0], args[1:]) if args and args[0].startswith("post") else ("postfix", args)
        proc = subprocess.run([str(self.root / "usr/sbin" / tool), "-c", str(self.conf), *rest], env=self.env,
                              capture_output=True, text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise mta.MTAError("%s %s failed (%d): %s\nmaillog:\n%s" % (tool, " ".join(rest), proc.returncode,
                                                                         proc.stderr.strip(), self.log()[-2000:]))
        return proc

    # -- process ---------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> "Postfix":
        self.configure()
        self.postfix("start")
        try:
            mta.wait_until(self.ready, timeout, "postfix on 127.0.0.1:%d" % self.port)
        except mta.MTAError as exc:
            self.stop()
            raise mta.MTAError("%s\nmaillog:\n%s" % (exc, self.log()[-2000:])) from None
        return self

    def master_pid(self) -> Optional[int]:
        try:
            pid = int((self.queue / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if not mta.pid_gone(pid) else None

    def ready(self) -> bool:
        self.pid = self.master_pid()
        return self.pid is not None and mta.tcp_listening(self.port)

    def processes(self, name: str) -> list[int]:
        """PIDs of this instance's daemons called *name* (smtpd, cleanup, ...)."""
        found = []
        for pid in mta.session_members(self.pid) if self.pid else []:
            try:
                if Path("/proc/%d/comm" % pid).read_text().strip() == name:
                    found.append(pid)
            except OSError:
                pass
        return found

    def reload(self, timeout: float = 20.0) -> None:
        """`postfix reload`, and wait until the master did it and every smtpd of before is gone."""
        before = self.log().count(": reload -- version")
        old = self.processes("smtpd")
        self.postfix("reload")
        mta.wait_until(lambda: self.log().count(": reload -- version") > before, timeout, "postfix reload")
        mta.wait_until(lambda: all(mta.pid_gone(pid) for pid in old), timeout, "old smtpd processes to exit")

    def stop(self, timeout: float = 10.0) -> None:
        """`postfix stop`, then by PID whatever is left of the master's session."""
        pid = self.pid or self.master_pid()
        self.postfix("stop", check=False)
        if pid is None:
            return
        try:
            mta.wait_until(lambda: mta.pid_gone(pid), timeout, "postfix master %d" % pid)
        except mta.MTAError:
            os.kill(pid, signal.SIGKILL)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for member in mta.session_members(pid):
                try:
                    os.kill(member, sig)
                except ProcessLookupError:
                    pass
            try:
                mta.wait_until(lambda: not mta.session_members(pid), timeout, "postfix children")
                break
            except mta.MTAError:
                if sig == signal.SIGKILL:
                    raise
        self.pid = None

    def __enter__(self) -> "Postfix":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what happened -----------------------------------------------------------

    def log(self) -> str:
        try:
            return self.maillog.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def deliveries(self, queue_id: str) -> dict[str, str]:
        """recipient -> discard tag (LOCAL, RELAY, REMOTE) for one queued message, as logged so far."""
        return {m.group(2): m.group(3) for m in _SENT.finditer(self.log()) if m.group(1) == queue_id}

    def wait_delivered(self, queue_id: Optional[str], timeout: float = 20.0) -> dict[str, str]:
        """Wait (bounded) until *queue_id* is done (qmgr's "removed"); recipient -> discard tag.

        Recipients that rewrite to the same address are delivered once (Postfix's
        duplicate filter), so there may be fewer entries than accepted RCPTs."""
        if queue_id is None:
            raise AssertionError("no message was queued")
        mta.wait_until(lambda: ("%s: removed" % queue_id) in self.log(), timeout, "delivery of %s" % queue_id)
        return self.deliveries(queue_id)


class Sent:
    """One SMTP session with DATA: every reply, and the queue id when Postfix took the message."""

    def __init__(self, transcript: mta.Transcript, data: Optional[mta.Reply]) -> None:
        self.transcript = transcript
        self.rcpts = transcript.rcpts
        self.mail = transcript.mail
        self.data = data
        found = _QUEUED.search(data[1]) if data is not None and data[0] == 250 else None
        self.queue_id = found.group(1) if found else None


def send(port: int, client_ip: str, mail_from: str, rcpts: Sequence[str],
         auth: Optional[tuple[str, str]] = None, timeout: float = 30.0) -> Sent:
    """EHLO, [AUTH], MAIL, RCPTs (sent verbatim) and, when any RCPT got 250, DATA; then QUIT."""
    with smtplib.SMTP(timeout=timeout, source_address=(client_ip, 0)) as smtp:
        greeting = smtp.connect("127.0.0.1", port)
        ehlo = smtp.ehlo("client.example.test")
        auth_reply = None
        if auth is not None:
            smtp.user, smtp.password = auth
            try:
                auth_reply = smtp.auth("PLAIN", smtp.auth_plain)
            except smtplib.SMTPAuthenticationError as exc:
                auth_reply = (exc.smtp_code, exc.smtp_error)
        mail = smtp.docmd("MAIL FROM:", mail_from)
        replies = [smtp.docmd("RCPT TO:", rcpt) for rcpt in rcpts]
        data = None
        if any(code == 250 for code, _ in replies):
            code, text = smtp.docmd("DATA")
            data = (code, text)
            if code == 354:
                smtp.send(b"Subject: relaymilter test\r\n\r\nbody\r\n.\r\n")
                data = smtp.getreply()
        try:
            smtp.docmd("QUIT")
        except smtplib.SMTPServerDisconnected:
            pass
    as_text = [(c, t.decode("utf-8", "replace")) for c, t in [greeting, ehlo, *replies]]
    t = mta.Transcript(as_text[0], as_text[1], None if auth_reply is None else
                       (auth_reply[0], auth_reply[1].decode("utf-8", "replace")),
                       (mail[0], mail[1].decode("utf-8", "replace")), as_text[2:])
    return Sent(t, None if data is None else (data[0], data[1].decode("utf-8", "replace")))


def short_rundir(prefix: str) -> Path:
    """A fresh 0755 directory under /tmp (unix socket paths must stay short)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(path, 0o755)
    return path


def wait_seconds_boundary(margin: float = 0.15) -> None:
    """Sleep until just after a whole second starts, so two quick writes share one second."""
    frac = time.time() % 1.0
    if frac > 1.0 - margin * 3:
        time.sleep(1.0 - frac + 0.01)
