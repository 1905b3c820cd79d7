"""Every installed command, with each module relaymilter takes from another project hidden in turn.

tests/data/hide_modules/sitecustomize.py makes a hidden module fail to import
exactly as a missing one does. Each command runs as installed (the console
scripts in the test environment's bin/) on real files, a real redis-server on
loopback and a live milter. An invocation that needs the hidden module must
exit 2 with one line, `PROG: error: ... need the Python package DIST, which is
not installed here: PYTHON -m pip install DIST`, and no traceback; one that
does not need it must still work. With nothing hidden every invocation works,
so a failure above is the hidden module's doing and nothing else's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from relaymilter import pydeps
from milterproc import MilterProcess
from redisproc import RedisServer

pytestmark = pytest.mark.integration

HIDER = Path(__file__).resolve().parent.parent / "data" / "hide_modules"
BIN = Path(sys.executable).parent

# what is hidden (a distribution relaymilter.pydeps knows) -> the modules it provides, comma-separated
HIDDEN: dict[str, str] = {}
for _module, _info in sorted(pydeps.MODULES.items()):
    HIDDEN[_info.pip] = ",".join(filter(None, (HIDDEN.get(_info.pip), _module)))

# invocation -> the distributions it needs (keys of HIDDEN); hidden, any other must not matter
NEEDS = {
    "relaymilter --check-config (file store)": {"PyYAML"},
    "relaymilter --check-config (Redis store)": {"PyYAML", "redis"},
    "relaymilter (serve)": {"PyYAML", "pymilter", "berkeleydb", "dnspython"},
    "relaymilter (serve, metrics)": {"PyYAML", "pymilter", "berkeleydb", "prometheus_client", "dnspython"},
    "vsmtprelay add (file)": {"berkeleydb"},
    "vsmtprelay add (Redis)": {"berkeleydb", "redis"},
    "vnewspammers": {"PyYAML", "berkeleydb"},
    "relaymilter-popwatch --test": {"PyYAML", "berkeleydb"},
    "relaymilter-popwatch --dumpconfig (Redis store)": {"PyYAML", "berkeleydb", "redis"},
    "relaymilter-mirror --once": {"berkeleydb", "redis"},
    "relaymilter-test": {"PyYAML"},
    "relaymilter-guard list (file)": {"PyYAML", "berkeleydb"},
    "relaymilter-guard list (Redis)": {"PyYAML", "berkeleydb", "redis"},
}


class Setup:
    def __init__(self, base: Path, redis_url: str, milter_socket: str) -> None:
        self.base = base
        self.redis_url = redis_url
        self.milter_socket = milter_socket
        self.file_cfg = base / "file.yaml"
        self.redis_cfg = base / "redis.yaml"
        common = ("local_domains: [example.com]\nadd_host_names: false\n"
                  "spammers: {source: %s/spammers, path: %s/spammers.db}\n" % (base, base))
        self.file_cfg.write_text(common + "relayers: {path: %s/relayers.db}\n" % base)
        self.redis_cfg.write_text(common + "relayers: {url: '%s'}\n" % redis_url)
        self.metrics_cfg = base / "metrics.yaml"
        self.metrics_cfg.write_text(common + "relayers: {path: %s/relayers.db}\n"
                                    "metrics: {listen: '127.0.0.1:0'}\n" % base)
        (base / "spammers").write_text("spammer@example.net\n")
        self.log = base / "mail.log"
        self.log.write_text("Nov 21 18:14:14 mail dovecot: pop3-login: Login: user=<a>, method=PLAIN, "
                            "rip=192.0.2.9, lip=192.0.2.1\n")

    def argv(self, name: str, case: str) -> list[str]:
        b = self.base
        return {
            "relaymilter --check-config (file store)": ["relaymilter", "-c", str(self.file_cfg), "--check-config"],
            "relaymilter --check-config (Redis store)": ["relaymilter", "-c", str(self.redis_cfg), "--check-config"],
            "relaymilter (serve)": ["relaymilter", "-c", str(self.file_cfg),
                                    "--socket", "unix:%s/%s.sock" % (b, case)],
            "relaymilter (serve, metrics)": ["relaymilter", "-c", str(self.metrics_cfg),
                                             "--socket", "unix:%s/%s-m.sock" % (b, case)],
            "vsmtprelay add (file)": ["vsmtprelay", "-f", str(b / "relayers.db"), "add", "192.0.2.5"],
            "vsmtprelay add (Redis)": ["vsmtprelay", "-f", self.redis_url, "add", "192.0.2.5"],
            "vnewspammers": ["vnewspammers", "-c", str(self.file_cfg)],
            "relaymilter-popwatch --test": ["relaymilter-popwatch", "-c", str(self.file_cfg), "--test", str(self.log)],
            "relaymilter-popwatch --dumpconfig (Redis store)": ["relaymilter-popwatch", "-c", str(self.redis_cfg),
                                                                "--dumpconfig"],
            "relaymilter-mirror --once": ["relaymilter-mirror", "--from", self.redis_url,
                                          "--to", str(b / ("mirror-%s.db" % case)), "--once"],
            "relaymilter-guard list (file)": ["relaymilter-guard", "-f", str(b / "relayers.db"), "list"],
            "relaymilter-guard list (Redis)": ["relaymilter-guard", "-f", self.redis_url, "list"],
            "relaymilter-test": ["relaymilter-test", "--socket", self.milter_socket, "--client", "192.0.2.7",
                                 "--from", "someone@example.net", "--rcpt", "bob@remote.example", "--timeout", "10"],
        }[name]


def hidden_env(modules: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(HIDER)
    env["RELAYMILTER_HIDE_MODULES"] = modules
    return env


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Iterator[Setup]:
    base = tmp_path_factory.mktemp("hidden")
    server = RedisServer(base / "redis").start()
    # The milter relaymilter-test talks to runs without redis-py: a file store needs none.
    milter = MilterProcess(base / "milter")
    saved = dict(os.environ)
    os.environ.update(hidden_env("redis"))
    try:
        milter.start()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    try:
        yield Setup(base, server.url(), milter.socket)
    finally:
        milter.stop()
        server.stop()


def run_command(argv: list[str], env: dict[str, str], serve: bool) -> subprocess.CompletedProcess:
    argv = [str(BIN / argv[0])] + argv[1:]
    if not serve:
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    # The milter serves until stopped: it works if it answers a session, then stops cleanly on SIGTERM.
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sock = argv[argv.index("--socket") + 1]
    ask = [str(BIN / "relaymilter-test"), "--socket", sock, "--client", "192.0.2.7", "--from", "a@example.net",
           "--rcpt", "b@example.com", "--timeout", "5"]
    try:
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            if subprocess.run(ask, capture_output=True, timeout=30).returncode == 0:
                proc.terminate()
                break
            time.sleep(0.05)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


@pytest.mark.parametrize("hidden", [None] + sorted(HIDDEN))
@pytest.mark.parametrize("name", sorted(NEEDS))
def test_command_with_a_module_hidden(setup, name, hidden):
    case = "%s-%s" % (hidden or "none", abs(hash(name)) % 10**6)
    argv = setup.argv(name, case)
    env = hidden_env(HIDDEN[hidden] if hidden else "")
    proc = run_command(argv, env, serve=name.startswith("relaymilter (serve"))
    assert "Traceback" not in proc.stderr, proc.stderr
    if hidden is None or hidden not in NEEDS[name]:
        assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
        return
    dist = hidden
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr)
    assert lines[0].startswith("%s: error: " % argv[0]), lines
    assert lines[0].endswith("need the Python package %s, which is not installed here: %s -m pip install %s"
                             % (dist, sys.executable, dist)), lines


def test_every_command_is_run():
    from relaymilter.cli import entry

    assert {name.split()[0] for name in NEEDS} == set(entry.COMMANDS)
