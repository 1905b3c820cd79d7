"""A SIGHUP reaching the supervisor when it has no descriptor left to open anything.

Whatever makes a reload fail - here the supervisor's descriptor limit,
lowered with prlimit to the descriptors it holds - the old rules stay, one
line says why, and the next reload works: the supervisor never dies of it
(its workers would go with it, and sendmail would tempfail all mail).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from milterproc import MilterProcess  # noqa: E402

pytestmark = pytest.mark.integration


def lowest_free_fd(pid: int) -> int:
    used = {int(fd) for fd in os.listdir("/proc/%d/fd" % pid)}
    return min(set(range(max(used) + 2)) - used)


@pytest.mark.skipif(not shutil.which("prlimit"), reason="needs prlimit (util-linux)")
def test_a_reload_out_of_descriptors_fails_in_one_line_and_the_next_works(tmp_path: Path) -> None:
    m = MilterProcess(tmp_path, {"workers": 1})
    m.start()
    try:
        m.workers(1)
        subprocess.run(["prlimit", "--pid", str(m.pid), "--nofile=%d:" % lowest_free_fd(m.pid)], check=True,
                       timeout=30)
        m.hup()
        m.wait_for_log("reload failed, keeping the running configuration")
        time.sleep(0.5)
        assert m.proc is not None and m.proc.poll() is None, m.log()
        assert "Traceback" not in m.log()
        subprocess.run(["prlimit", "--pid", str(m.pid), "--nofile=1024:"], check=True, timeout=30)
        m.hup()
        m.wait_for_log("reloading 1 workers")
        assert m.proc.poll() is None
    finally:
        m.stop()
