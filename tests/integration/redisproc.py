"""Real redis-server and redis-sentinel processes for tests, on loopback, stopped by PID.

RedisServer runs ``redis-server --save '' --appendonly no --bind 127.0.0.1
--port N --daemonize no`` in a temporary directory (a replica adds
``--replicaof``); SentinelProcess runs ``redis-sentinel`` (or
``redis-server --sentinel``) from a small config file; ToolProcess runs a relaymilter
command (popwatch, mirror) in the background and collects its log. Readiness is polled
with PING over a raw socket, every wait is bounded, and a missing binary is
an error, never a skip: the mail-farm tests must run wherever the suite runs
(packaging/scripts/deps.sh --test installs redis-server and redis-sentinel).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import redis

from milterproc import ToolProcess  # noqa: F401 - re-exported for the Redis tests

HOST = "127.0.0.1"


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll *cond* until true; AssertionError after *timeout* s. Returns the seconds waited."""
    start = time.monotonic()
    pause = 0.005
    while not cond():
        if time.monotonic() - start >= timeout:
            raise AssertionError("%s: not within %gs" % (what, timeout))
        time.sleep(pause)
        pause = min(pause * 2, 0.05)
    return time.monotonic() - start


def ping(port: int, timeout: float = 0.5) -> bool:
    """Whether a Redis (or sentinel) on loopback *port* answers PING with +PONG."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            # A server with requirepass answers -NOAUTH: it is up all the same.
            return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError("%s is not installed (apt-get install redis-server redis-sentinel, "
                           "or packaging/scripts/deps.sh --test)" % name)
    return path


class _Proc:
    """A server process with a log file in *workdir*, found by port, stopped by PID."""

    name = "redis"

    def __init__(self, workdir: Path, port: Optional[int] = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.log_path = self.workdir / ("%s-%d.log" % (self.name, self.port))
        self.proc: Optional[subprocess.Popen] = None

    def argv(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout: float = 15.0) -> "_Proc":
        self.proc = subprocess.Popen(self.argv(), cwd=self.workdir, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: self.proc.poll() is not None or ping(self.port), timeout,
                     "%s on port %d to answer PING" % (self.name, self.port))
        except AssertionError:
            self.stop()
            raise AssertionError("%s on port %d did not start: %s" % (self.name, self.port, self.log()))
        if self.proc.poll() is not None:
            code = self.proc.returncode
            self.proc = None
            raise RuntimeError("%s exited with %s: %s" % (self.name, code, self.log()))
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not running"
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """SIGKILL, as a crash would: no shutdown, no last words to clients or replicas."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not gone within 5 s."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None

    def client(self, **kwargs: object) -> redis.Redis:
        return redis.Redis(host=HOST, port=self.port, socket_timeout=5, **kwargs)


class RedisServer(_Proc):
    """redis-server on 127.0.0.1:port, no persistence; optionally a replica of another."""

    name = "redis"

    def __init__(self, workdir: Path, port: Optional[int] = None, replica_of: Optional[int] = None,
                 extra: Sequence[str] = ()) -> None:
        super().__init__(workdir, port)
        self.replica_of = replica_of
        self.extra = list(extra)

    def argv(self) -> list[str]:
        argv = [binary("redis-server"), "--save", "", "--appendonly", "no", "--bind", HOST,
                "--port", str(self.port), "--daemonize", "no", "--dir", str(self.workdir),
                "--logfile", str(self.log_path)]
        if self.replica_of is not None:
            argv += ["--replicaof", HOST, str(self.replica_of)]
        return argv + self.extra

    def url(self, db: int = 0, query: str = "") -> str:
        return "redis://%s:%d/%d%s" % (HOST, self.port, db, "?" + query if query else "")


class SentinelProcess(_Proc):
    """A redis-sentinel watching one primary as SERVICE, with short timeouts for tests."""

    name = "sentinel"

    def __init__(self, workdir: Path, primary_port: int, service: str = "relaymaster", quorum: int = 2,
                 down_after_ms: int = 1000, failover_timeout_ms: int = 3000, port: Optional[int] = None) -> None:
        super().__init__(workdir, port)
        self.service = service
        self.conf = self.workdir / ("sentinel-%d.conf" % self.port)
        # Sentinel rewrites its config file as it learns the topology: one file each, writable.
        self.conf.write_text(
            "port %d\nbind %s\ndaemonize no\ndir %s\nlogfile %s\n"
            "sentinel monitor %s %s %d %d\n"
            "sentinel down-after-milliseconds %s %d\n"
            "sentinel failover-timeout %s %d\n"
            "sentinel parallel-syncs %s 1\n"
            % (self.port, HOST, self.workdir, self.log_path, service, HOST, primary_port, quorum,
               service, down_after_ms, service, failover_timeout_ms, service))

    def argv(self) -> list[str]:
        exe = shutil.which("redis-sentinel")
        if exe:
            return [exe, str(self.conf)]
        return [binary("redis-server"), str(self.conf), "--sentinel"]

    def master_state(self) -> dict:
        with self.client() as c:
            return c.sentinel_master(self.service)

    def master_port(self) -> Optional[int]:
        with self.client() as c:
            addr = c.sentinel_get_master_addr_by_name(self.service)
        return int(addr[1]) if addr else None
