"""NAME
    conftest - pytest fixtures for integration tests with a real sendmail

DESCRIPTION
    Thin fixtures over mta.py (which benchmarks and scripts import directly):

    free_port           a TCP port on 127.0.0.1 nobody listens on now
    socket_dir          a short private directory for unix sockets (sun_path
                        holds 107 bytes; pytest's tmp_path can be longer)
    sendmail_factory    make(**Sendmail kwargs) -> a started Sendmail, stopped
                        by PID at teardown; function scope
    module_sendmail_factory   the same, shared by one test module
    probe_milter_factory      make(socket_spec=None, start=True) -> the probe
                        milter (tests/data/sendmail_probe_milter.py; default
                        a unix socket), killed by PID at teardown
    milter              a started relaymilter on its default test settings
                        (milterproc.MilterProcess); a module may define its own
    dovecot             a started private Dovecot (dovecot.DovecotServer)
    redis_server        a started private redis-server (redisproc.RedisServer)
    (each stopped by PID at teardown)

DIAGNOSTICS
    Nothing is skipped: when sendmail, sendmail-cf, m4 or unshare are missing
    the fixtures raise mta.MTAError naming the package to install.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest

import mta
from dovecot import DovecotServer
from milterproc import MilterProcess, unix_listening

DATA = Path(__file__).resolve().parent.parent / "data"
PROBE_MILTER = DATA / "sendmail_probe_milter.py"


def socket_listening(spec: str) -> bool:
    """Whether a milter-style socket spec (inet:PORT@HOST, unix:/path) is listening."""
    kind, _, rest = spec.partition(":")
    if kind == "inet":
        port, _, host = rest.partition("@")
        return mta.tcp_listening(int(port), host or "127.0.0.1")
    if kind in ("unix", "local"):
        return unix_listening(rest)
    raise ValueError("unsupported socket spec: %r" % spec)


class SendmailFactory:
    """Starts Sendmail instances in numbered run dirs; stop_all() stops them by PID."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.started: list[mta.Sendmail] = []

    def __call__(self, **kwargs: object) -> mta.Sendmail:
        rundir = self.base / ("sendmail-%d" % len(self.started))
        rundir.mkdir(parents=True)
        kwargs.setdefault("port", mta.free_port())
        mx = mta.Sendmail(rundir, **kwargs)  # type: ignore[arg-type]
        self.started.append(mx)
        return mx.start()

    def stop_all(self) -> None:
        errors = []
        for mx in self.started:
            try:
                mx.stop()
            except mta.MTAError as exc:
                errors.append(str(exc))
        if errors:
            raise mta.MTAError("; ".join(errors))


class ProbeMilter:
    """tests/data/sendmail_probe_milter.py as a subprocess, with its JSON log."""

    def __init__(self, socket_spec: str, workdir: Path, name: str = "probe-milter") -> None:
        self.socket_spec = socket_spec
        self.records_file = workdir / (name + ".jsonl")
        self.output = workdir / (name + ".out")
        self.argv = [sys.executable, str(PROBE_MILTER), socket_spec, str(self.records_file)]
        self._proc: Optional[subprocess.Popen] = None
        self.pid: Optional[int] = None

    def start(self, timeout: float = 10.0) -> "ProbeMilter":
        """Start it and wait (bounded) until its socket is listening."""
        with open(self.output, "ab") as out:
            self._proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                          start_new_session=True)
        self.pid = self._proc.pid
        try:
            mta.wait_until(lambda: socket_listening(self.socket_spec), timeout,
                           "probe milter on %s" % self.socket_spec,
                           alive=lambda: self._proc is not None and self._proc.poll() is None)
        except mta.MTAError as exc:
            self.stop()
            raise mta.MTAError("%s\n%s" % (exc, self.output.read_text(errors="replace")[-2000:])) from None
        return self

    def stop(self) -> None:
        """SIGKILL by PID (pymilter takes ~5 s to exit on SIGTERM) and reap it."""
        proc, self._proc = self._proc, None
        if proc is not None:
            mta.terminate(proc, signal.SIGKILL, 10.0)

    def records(self, event: Optional[str] = None) -> list[dict]:
        """What the milter logged, one dict per callback, optionally of one event."""
        try:
            lines = self.records_file.read_text().splitlines()
        except FileNotFoundError:
            return []
        found = [json.loads(line) for line in lines if line.strip()]
        return [r for r in found if event is None or r["event"] == event]


@pytest.fixture(scope="session")
def mta_tools() -> None:
    """The MTA tools are installed; an error (not a skip) otherwise."""
    mta.require_tools()


@pytest.fixture
def free_port() -> int:
    return mta.free_port()


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="rm-sock-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sendmail_factory(mta_tools: None, tmp_path: Path) -> Iterator[SendmailFactory]:
    factory = SendmailFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture(scope="module")
def module_sendmail_factory(mta_tools: None, tmp_path_factory: pytest.TempPathFactory
                            ) -> Iterator[SendmailFactory]:
    factory = SendmailFactory(tmp_path_factory.mktemp("sendmail"))
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture
def probe_milter_factory(socket_dir: Path, tmp_path: Path) -> Iterator[Callable[..., ProbeMilter]]:
    """make(socket_spec=None, start=True): the probe milter; default a unix socket."""
    made: list[ProbeMilter] = []

    def make(socket_spec: Optional[str] = None, start: bool = True) -> ProbeMilter:
        spec = socket_spec or "unix:%s/probe-%d.sock" % (socket_dir, len(made))
        milter = ProbeMilter(spec, tmp_path, "probe-milter-%d" % len(made))
        made.append(milter)
        return milter.start() if start else milter

    try:
        yield make
    finally:
        for milter in made:
            milter.stop()


@pytest.fixture
def milter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MilterProcess]:
    m = MilterProcess(Path(str(tmp_path_factory.mktemp("milter"))))
    m.start()
    try:
        yield m
    finally:
        m.stop()


@pytest.fixture
def dovecot() -> Iterator[DovecotServer]:
    server = DovecotServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Any]:
    """A redisproc.RedisServer (imported here: redisproc needs redis-py, only these tests do)."""
    from redisproc import RedisServer

    srv = RedisServer(tmp_path / "redis").start()
    try:
        yield srv
    finally:
        srv.stop()
