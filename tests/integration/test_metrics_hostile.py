"""The milter's metrics endpoint against a local user: idle connections by the hundred.

Any local user can connect to a loopback port. The endpoint is served by the
supervisor, which also reloads the configuration and replaces workers: the
connections must neither pile up threads and descriptors there (run with a
small descriptor limit, as systemd's default soft limit of 1024 is, scaled
down) nor stop a reload, nor hold up a decision; once they are gone a
scrape works again.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from relaymilter.harness import MilterSession

sys.path.insert(0, str(Path(__file__).resolve().parent))
from milterproc import MilterProcess  # noqa: E402

pytestmark = pytest.mark.integration

NOFILE = 128        # the supervisor's descriptor limit here
IDLE = 300          # connections the local user opens and leaves silent


def scrape_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status == 200 and b"relaymilter_workers_alive" in resp.read()
    except (OSError, urllib.error.URLError):
        return False


@pytest.mark.skipif(not shutil.which("prlimit"), reason="needs prlimit (util-linux)")
def test_idle_connections_by_the_hundred_hold_nothing_in_the_supervisor(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < IDLE + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, IDLE + 200), hard))
    (tmp_path / "tmp").mkdir()
    m = MilterProcess(tmp_path, {"metrics": {"listen": "127.0.0.1:0"}, "workers": 2},
                      wrapper=("prlimit", "--nofile=%d:%d" % (NOFILE, NOFILE), "env", "TMPDIR=%s" % (tmp_path / "tmp")))
    m.start()
    idle: list[socket.socket] = []
    try:
        url = re.search(r"metrics on (http://\S+)", m.wait_for_log("metrics on ")).group(1)
        host, port = re.match(r"http://([\d.]+):(\d+)/", url).groups()
        assert scrape_ok(url)
        for _ in range(IDLE):
            try:
                idle.append(socket.create_connection((host, int(port)), timeout=2))
            except OSError:
                break           # the backlog is full: the endpoint is not accepting any more
        time.sleep(1)
        fds = len(os.listdir("/proc/%d/fd" % m.pid))
        threads = len(os.listdir("/proc/%d/task" % m.pid))
        assert fds < 64 and threads < 32, (fds, threads, len(idle))
        # Decisions go on, and the supervisor can still reload (it opens files to do so).
        with MilterSession(m.socket, timeout=10) as s:
            s.connect(client_ip="192.0.2.20")
            s.helo("client.example")
            s.mail("<a@example.net>")
            assert str(s.rcpt("<x@remote.example>")) == "550 5.7.1 Relaying denied"
        m.hup()
        m.wait_for_log("reloading 2 workers")
        assert m.proc is not None and m.proc.poll() is None
        assert "Traceback" not in m.log()
        for c in idle:
            c.close()
        idle.clear()
        deadline = time.monotonic() + 15
        while not scrape_ok(url):
            assert time.monotonic() < deadline, "no scrape answered after the idle connections went"
            time.sleep(0.2)
    finally:
        for c in idle:
            c.close()
        m.stop()
