"""The shipped scenarios (rules/scenarios/default.yaml) against the real relaymilter.

Starts `relaymilter -c rules/scenarios/default-config.yaml --socket unix:...`
in a session of its own (its supervisor forks the libmilter process), waits
for the socket (bounded), runs every shipped scenario through the harness and
expects all of them to pass; then kills the process group it started.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from relaymilter.harness import load_scenarios, run_file
from relaymilter.harness.scenario import format_outcome

from milterproc import unix_listening

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

TOP = Path(__file__).resolve().parents[2]
CONFIG = TOP / "rules" / "scenarios" / "default-config.yaml"
SCENARIOS = TOP / "rules" / "scenarios" / "default.yaml"
START_LIMIT = 30.0


def installed(name: str) -> str:
    here = os.path.join(os.path.dirname(sys.executable), name)
    found = here if os.path.exists(here) else shutil.which(name)
    assert found, "%s is not installed (pip install -e .)" % name
    return found


@pytest.fixture(scope="module")
def relaymilter() -> Iterator[str]:
    rundir = tempfile.mkdtemp(prefix="rms", dir="/tmp")
    sock = os.path.join(rundir, "m.sock")
    log_path = os.path.join(rundir, "relaymilter.log")
    log = open(log_path, "w+b")
    proc = subprocess.Popen([installed("relaymilter"), "-c", str(CONFIG), "--socket", "unix:" + sock],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + START_LIMIT
        while not unix_listening(sock):
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail("relaymilter exited with %s:\n%s" % (proc.returncode, log.read().decode()))
            if time.monotonic() > deadline:
                pytest.fail("relaymilter: no socket %s after %ss" % (sock, START_LIMIT))
            time.sleep(0.05)
        yield "unix:" + sock
    finally:
        # The group holds the supervisor and the libmilter process it forked.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)
        log.close()
        shutil.rmtree(rundir, ignore_errors=True)


def test_shipped_scenarios_all_pass(relaymilter) -> None:
    loaded = load_scenarios(str(SCENARIOS))
    outcomes = run_file(loaded, socket_spec=relaymilter, timeout=10)
    assert len(outcomes) == len(loaded.scenarios) >= 10
    failed = [o for o in outcomes if not o.passed]
    assert not failed, "\n".join(line for o in failed for line in format_outcome(o))


def test_relaymilter_test_command_runs_the_shipped_file(relaymilter) -> None:
    proc = subprocess.run([installed("relaymilter-test"), "--socket", relaymilter, "--timeout", "10", str(SCENARIOS)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1].endswith(" sessions: %d pass, 0 fail" % len(load_scenarios(str(SCENARIOS)).scenarios))
