"""A real `relaymilter` process for tests: start it on a unix socket, wait, stop it by PID.

Used by the milter, scenario, sendmail and popwatch integration tests and by
the benchmarks. The process is the installed console script, so the tests
exercise the entry point, the supervisor and the libmilter child together.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import yaml


def wait_for(what: str, cond: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll *cond* until it holds; AssertionError naming *what* after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError("timed out after %gs waiting for %s" % (timeout, what))


def unix_listening(path: str) -> bool:
    """Whether a unix socket at *path* accepts connections: the file appears at
    bind(), a connection is refused until listen() (flags 00010000 in /proc/net/unix)."""
    try:
        lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        return False
    return any(line.split()[3] == "00010000" and line.endswith(" " + path) for line in lines)


def children(pid: int) -> list[int]:
    try:
        text = Path("/proc/%d/task/%d/children" % (pid, pid)).read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


class MilterProcess:
    """relaymilter -c RUNDIR/relaymilter.yaml --socket unix:RUNDIR/m.sock"""

    def __init__(self, rundir: Path, settings: Optional[dict] = None, config_text: Optional[str] = None,
                 socket_spec: Optional[str] = None, umask: Optional[int] = None,
                 wrapper: Sequence[str] = ()) -> None:
        self.wrapper = list(wrapper)        # a command the milter runs under (setpriv ...)
        self.rundir = Path(rundir)
        self.rundir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.rundir / "relaymilter.yaml"
        if socket_spec is not None and socket_spec.startswith("unix:"):
            self.sock_path = Path(socket_spec[len("unix:"):])
        else:
            self.sock_path = self.rundir / "m.sock"
        self.socket = socket_spec or "unix:%s" % self.sock_path
        self.umask = umask      # as the unit's UMask= (the socket's mode follows it)
        self.log_path = self.rundir / "milter.log"
        self.proc: Optional[subprocess.Popen] = None
        self.write_config(settings, config_text)

    def write_config(self, settings: Optional[dict] = None, config_text: Optional[str] = None) -> None:
        if config_text is None:
            base = {
                "add_host_names": False,
                "local_domains": ["local.test", "mail.local.test"],
                "relay_domains": ["relayed.test"],
                "trusted_networks": ["127.0.0.1/32", "::1/128"],
                "relayers": {"path": str(self.rundir / "relayers.db")},
                "spammers": {"source": str(self.rundir / "spammers"), "path": str(self.rundir / "spammers.db")},
            }
            base.update(settings or {})
            config_text = yaml.safe_dump(base)
        self.config_path.write_text(config_text)

    @property
    def relayers_db(self) -> str:
        return str(self.rundir / "relayers.db")

    def start(self, timeout: float = 15.0) -> "MilterProcess":
        if self.sock_path.exists():
            self.sock_path.unlink()
        self.logfile = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*self.wrapper, "relaymilter", "-c", str(self.config_path), "--socket", self.socket],
            stdout=self.logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=None if self.umask is None else (lambda: os.umask(self.umask or 0)),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("relaymilter exited with %s: %s" % (self.proc.returncode, self.log()))
            if self._listening():
                return self
            time.sleep(0.01)
        self.stop()
        raise RuntimeError("relaymilter did not listen within %gs: %s" % (timeout, self.log()))

    def _listening(self) -> bool:
        if self.socket.startswith("unix:"):
            return unix_listening(str(self.sock_path))
        port = int(self.socket.split(":")[1].split("@")[0])
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                lines = Path(table).read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    return True
        return False

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def worker_pid(self) -> int:
        """A libmilter worker serving connections (the first one)."""
        kids = children(self.pid)
        assert kids, "no libmilter worker"
        return kids[0]

    def workers(self, count: Optional[int] = None, timeout: float = 10.0) -> list[int]:
        """The worker PIDs; with *count*, wait (bounded) until that many are running."""
        deadline = time.monotonic() + timeout
        while True:
            kids = children(self.pid)
            if count is None or len(kids) == count or time.monotonic() > deadline:
                return kids
            time.sleep(0.02)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_for_log(self, text: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log()
            if text in log:
                return log
            time.sleep(0.02)
        raise AssertionError("%r not logged within %gs; log:\n%s" % (text, timeout, self.log()))

    def hup(self) -> None:
        os.kill(self.pid, signal.SIGHUP)

    def stop(self) -> None:
        """Kill the libmilter child and the supervisor by PID (libmilter's own stop takes seconds)."""
        if self.proc is None:
            return
        for pid in children(self.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.logfile.close()
        self.proc = None


class ToolProcess:
    """A relaymilter command run in the background (popwatch, mirror), stderr collected, stopped by PID."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.argv = list(argv)
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def said(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def count(self, text: str) -> int:
        return sum(text in line for line in self.lines)

    def output(self) -> str:
        return "\n".join(self.lines)

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> Optional[int]:
        """SIGTERM by PID, bounded wait, SIGKILL if it hangs; the exit code."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._reader.join(5)
        return self.proc.returncode
