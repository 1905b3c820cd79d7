"""relaymilter's worker processes, for real: one socket shared by N libmilter workers, the supervisor
replacing a dead one, reloading all of them, stopping all of them; sessions the milter cannot place.

Every check runs the installed console script and talks to it over its socket with the harness.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml

from relaymilter.harness import MilterSession
from relaymilter.harness import codec
from relaymilter.harness.errors import ProtocolError

from milterproc import MilterProcess, children

DENIED = "550 5.7.1 Relaying denied"


def decided_by(m: MilterProcess, sender: str, timeout: float = 10.0) -> int:
    """The PID of the worker whose decision line names *sender*."""
    pattern = re.compile(r"relaymilter\[(\d+)\]: \w+: pass: MAIL from \S+: from=%s " % re.escape(sender))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = pattern.search(m.log())
        if found:
            return int(found.group(1))
        time.sleep(0.02)
    raise AssertionError("no decision line for %s:\n%s" % (sender, m.log()))


def gone(pid: int) -> bool:
    try:
        state = Path("/proc/%d/stat" % pid).read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def wait_until(check, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out waiting for %s" % what
        time.sleep(0.02)


@pytest.fixture
def milter3(tmp_path):
    m = MilterProcess(tmp_path, {"workers": 3}).start()
    m.workers(3)
    try:
        yield m
    finally:
        m.stop()


def test_workers_share_the_socket(milter3):
    pids = set(milter3.workers(3))
    assert len(pids) == 3
    seen: set[int] = set()
    counter = iter(range(100000))
    lock = threading.Lock()

    def client() -> None:
        while not pids <= seen:
            with lock:
                n = next(counter)
            if n >= 600:
                return
            with MilterSession(milter3.socket, timeout=10) as s:
                s.connect(client_ip="192.0.2.%d" % (n % 200 + 1))
                s.mail("<s%d@example.net>" % n)
                assert str(s.rcpt("<bob@remote.example>")) == DENIED
            if n % 10 == 0:
                seen.update(int(p) for p in re.findall(r"relaymilter\[(\d+)\]: \w+: pass: MAIL", milter3.log()))

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    seen.update(int(p) for p in re.findall(r"relaymilter\[(\d+)\]: \w+: pass: MAIL", milter3.log()))
    assert seen == pids, "decision lines from %s, workers %s" % (seen, pids)


def test_a_killed_worker_is_replaced_and_the_others_keep_serving(tmp_path):
    m = MilterProcess(tmp_path, {"workers": 2}).start()
    try:
        first = set(m.workers(2))
        sessions: list[tuple[MilterSession, str, int]] = []
        n = 0
        # Open sessions (each in a transaction) until both workers hold some.
        while {pid for _, _, pid in sessions} != first:
            assert n < 200, "sessions never reached both workers"
            s = MilterSession(m.socket, timeout=10)
            s.open()
            s.connect(client_ip="192.0.2.9")
            sender = "<held%d@example.net>" % n
            s.mail(sender)
            sessions.append((s, sender, decided_by(m, sender)))
            n += 1
        victim = sessions[0][2]
        os.kill(victim, signal.SIGKILL)
        for s, _, pid in sessions:
            if pid == victim:
                with pytest.raises(ProtocolError):
                    s.rcpt("<bob@remote.example>")
            else:       # the other worker's sessions go on as if nothing happened
                assert str(s.rcpt("<bob@remote.example>")) == DENIED
                assert str(s.rcpt("<bob@local.test>")) == "continue"
            s.close()
        m.wait_for_log("worker %d was killed by SIGKILL" % victim)
        wait_until(lambda: len(children(m.pid)) == 2 and victim not in children(m.pid), what="a replacement")
        for k in range(10):     # new sessions: all answered
            with MilterSession(m.socket, timeout=10) as s:
                s.connect(client_ip="192.0.2.10")
                s.mail("<after%d@example.net>" % k)
                assert str(s.rcpt("<bob@remote.example>")) == DENIED
    finally:
        m.stop()


def test_a_crash_loop_backs_off_and_is_logged(tmp_path):
    m = MilterProcess(tmp_path, {"workers": 1}).start()
    try:
        delays = []
        for _ in range(3):
            pid = m.workers(1)[0]
            os.kill(pid, signal.SIGKILL)
            line = m.wait_for_log("worker %d was killed by SIGKILL" % pid).split("worker %d was killed" % pid)[1]
            delays.append(float(re.search(r"starting another in ([\d.]+)s", line.splitlines()[0]).group(1)))
            wait_until(lambda: children(m.pid) and children(m.pid)[0] != pid, what="the next worker")
        assert delays == sorted(delays) and delays[0] > 0 and delays[-1] >= 2 * delays[0], delays
        assert "crash loop: 3 quick deaths in a row" in m.log()
    finally:
        m.stop()


def reloaded_by(m: MilterProcess, mark: int) -> set[int]:
    return {int(p) for p in re.findall(r"relaymilter\[(\d+)\]: reloaded ", m.log()[mark:])}


def test_sighup_reloads_every_worker_and_a_broken_file_none(tmp_path):
    m = MilterProcess(tmp_path, {"workers": 2}).start()
    try:
        pids = set(m.workers(2))
        good = yaml.safe_load(m.config_path.read_text())
        # A broken file, then one nested past the parser's recursion limit: the supervisor says why once,
        # no worker swaps anything, and the next good file still reloads.
        for broken in (m.config_path.read_text() + "no_such_key: 1\n", "local_domains: " + "[" * 5000 + "]" * 5000):
            mark = len(m.log())
            m.config_path.write_text(broken)
            m.hup()
            wait_until(lambda: "reload failed, keeping the running configuration" in m.log()[mark:],
                       what="the reload failure line")
            time.sleep(0.3)
            assert reloaded_by(m, mark) == set()
            assert len(re.findall("reload failed", m.log()[mark:])) == 1
        assert set(children(m.pid)) == pids
        good["local_domains"] = ["mail.local.test"]           # local.test removed
        m.write_config(config_text=yaml.safe_dump(good))
        mark = len(m.log())
        m.hup()
        wait_until(lambda: reloaded_by(m, mark) == pids, what="every worker to reload")
        answered: set[int] = set()
        for k in range(200):
            with MilterSession(m.socket, timeout=10) as s:
                s.connect(client_ip="192.0.2.7")
                s.mail("<r%d@example.net>" % k)
                assert str(s.rcpt("<bob@local.test>")) == DENIED
            answered.add(decided_by(m, "<r%d@example.net>" % k))
            if answered == pids:
                break
        assert answered == pids
    finally:
        m.stop()


def test_supervisor_death_stops_every_worker(tmp_path):
    m = MilterProcess(tmp_path, {"workers": 2}).start()
    try:
        workers = m.workers(2)
        assert len(workers) == 2
        m.proc.kill()
        m.proc.wait(10)
        wait_until(lambda: all(gone(pid) for pid in workers), timeout=20, what="the workers to stop")
    finally:
        for pid in children(m.pid):
            os.kill(pid, signal.SIGKILL)
        m.proc = None
        m.logfile.close()


def test_sigterm_on_inet_leaves_no_process_and_no_listener(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    m = MilterProcess(tmp_path, {"workers": 2}, socket_spec="inet:%d@127.0.0.1" % port).start()
    workers = m.workers(2)
    os.kill(m.pid, signal.SIGTERM)
    assert m.proc.wait(40) == 0
    assert all(gone(pid) for pid in workers)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    m.proc = None
    m.logfile.close()


def run_milter(tmp_path: Path, *args: str, user: str | None = None) -> subprocess.CompletedProcess:
    m = MilterProcess(tmp_path)
    argv = ["relaymilter", "-c", str(m.config_path), *args]
    if user:
        argv = ["setpriv", "--reuid", user, "--regid", user, "--clear-groups", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_a_socket_in_use_is_named(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = run_milter(tmp_path, "--socket", "inet:%d@127.0.0.1" % port)
    assert proc.returncode == 1
    assert "cannot listen on inet:%d@127.0.0.1: Address already in use (EADDRINUSE)" % port in proc.stderr


def test_a_socket_it_may_not_create_is_named():
    base = Path(tempfile.mkdtemp(prefix="rm-eacces-", dir="/tmp"))     # readable by the unprivileged user
    try:
        base.chmod(0o755)
        sock_dir = base / "root-only"
        sock_dir.mkdir(mode=0o755)
        proc = run_milter(base, "--socket", "unix:%s/m.sock" % sock_dir, user="65534")
        assert proc.returncode == 1, proc.stderr
        assert "cannot listen on unix:%s/m.sock: Permission denied (EACCES)" % sock_dir in proc.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("spec", ["inet:%d", "inet6:%d"])
def test_a_socket_with_no_host_is_refused(tmp_path, spec):
    proc = run_milter(tmp_path, "--socket", spec % 8894)
    assert proc.returncode == 2
    assert "names no host, and libmilter would listen on every interface" in proc.stderr


# ---------------------------------------------------------------- sessions the milter cannot place


@pytest.fixture
def milter(tmp_path):
    m = MilterProcess(tmp_path, {"workers": 1}).start()
    try:
        yield m
    finally:
        m.stop()


def test_local_socket_and_unknown_family_are_strangers(milter):
    for how in ({"unix_path": "/var/run/sendmail.sock"}, {}):
        with MilterSession(milter.socket, timeout=10) as s:
            s.connect(**how)
            s.mail("<a@example.net>")
            assert str(s.rcpt("<bob@remote.example>")) == DENIED
            assert str(s.rcpt("<bob@local.test>")) == "continue"


def test_trust_local_socket_trusts_a_unix_socket_client(tmp_path):
    m = MilterProcess(tmp_path, {"workers": 1, "trust_local_socket": True}).start()
    try:
        with MilterSession(m.socket, timeout=10) as s:
            s.connect(unix_path="/var/run/sendmail.sock")
            s.mail("<a@example.net>")
            assert str(s.rcpt("<bob@remote.example>")) == "continue"
        with MilterSession(m.socket, timeout=10) as s:
            s.connect()
            s.mail("<a@example.net>")
            assert str(s.rcpt("<bob@remote.example>")) == DENIED
    finally:
        m.stop()


def test_mail_with_no_connect_is_a_stranger(milter):
    with MilterSession(milter.socket, timeout=10) as s:
        s.mail("<a@example.net>")
        assert str(s.rcpt("<bob@remote.example>")) == DENIED


@pytest.mark.parametrize("end", ["eom", "abort"])
def test_a_session_after_quit_nc_does_not_inherit_the_client(milter, end):
    with MilterSession(milter.socket, timeout=10) as s:
        s.connect(client_ip="127.0.0.1")
        s.mail("<a@example.net>")
        assert str(s.rcpt("<bob@remote.example>")) == "continue"      # trusted
        if end == "eom":
            s.data()
            s.eom()
        else:
            s.abort()
        s.channel.send("QUIT_NC", codec.encode_quit_nc())
        s.mail("<a@example.net>")          # the next SMTP session, with no CONNECT
        assert str(s.rcpt("<bob@remote.example>")) == DENIED


def allowed(pid: int) -> set[int]:
    return os.sched_getaffinity(pid)


def test_cpu_affinity_auto_pins_each_worker_and_its_replacement(tmp_path):
    cpus = sorted(os.sched_getaffinity(0))
    m = MilterProcess(tmp_path, {"workers": 3, "cpu_affinity": "auto"}).start()
    try:
        pids = m.workers(3)
        for pid in pids:
            m.wait_for_log("worker %d pinned to CPU " % pid)
        pinned = {pid: allowed(pid) for pid in pids}
        assert all(len(s) == 1 for s in pinned.values()), pinned
        used = sorted(next(iter(s)) for s in pinned.values())
        assert used == sorted(cpus[i % len(cpus)] for i in range(3)), (used, cpus)    # round robin
        assert allowed(m.pid) == set(cpus)          # the supervisor itself is not pinned
        # A replacement takes its slot's CPU.
        victim = pids[-1]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: len(children(m.pid)) == 3 and victim not in children(m.pid), what="a replacement")
        (new,) = set(children(m.pid)) - set(pids)
        m.wait_for_log("worker %d pinned to CPU " % new)
        assert allowed(new) == pinned[victim]
        # A reload cannot unpin them: logged, kept.
        m.write_config({"workers": 3, "cpu_affinity": "none"})
        m.hup()
        m.wait_for_log("cpu_affinity cannot change while running (still auto)")
    finally:
        m.stop()


def test_cpu_affinity_is_off_by_default(milter3):
    cpus = os.sched_getaffinity(0)
    assert all(allowed(pid) == cpus for pid in milter3.workers(3))
    assert "pinned to CPU" not in milter3.log()
