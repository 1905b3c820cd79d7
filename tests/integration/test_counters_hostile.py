"""The host counter file changed under processes that have it mapped: cut short, removed.

An admin who empties it (``: > relayers-counters``) or removes it to start
counting afresh while the milter runs: no process may die of SIGBUS
(touching a mapping past the end of its file), and none may go on counting
in a removed file that the others no longer see.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import pytest

from relaymilter.store.counters import SIZE, CounterFile

pytestmark = pytest.mark.integration

LIMITS = {"recipients": 1000}


def _worker(path: str, conn) -> None:
    """A milter worker's view: one CounterFile kept open, charged at each request."""
    store = CounterFile(path)
    while True:
        if conn.recv() is None:
            return
        conn.send(store.charge("alice", time.time(), {"recipients": 1}, LIMITS).counts["recipients"])


@pytest.fixture
def worker(tmp_path):
    ctx = multiprocessing.get_context("fork")
    ours, theirs = ctx.Pipe()
    path = str(tmp_path / "relayers-counters")
    proc = ctx.Process(target=_worker, args=(path, theirs))
    proc.start()

    def charge() -> int:
        ours.send(True)
        if not ours.poll(20):
            proc.join(1)
            raise AssertionError("the worker did not answer (exit code %r%s)" % (
                proc.exitcode, ", SIGBUS" if proc.exitcode == -signal.SIGBUS else ""))
        return ours.recv()

    yield path, charge
    if proc.is_alive():
        ours.send(None)
        proc.join(10)
    if proc.is_alive():
        proc.kill()
        proc.join(10)


def test_a_counter_file_emptied_under_a_worker_starts_afresh(worker):
    path, charge = worker
    assert [charge(), charge()] == [1, 2]
    with open(path, "r+b") as f:          # : > relayers-counters
        f.truncate(0)
    assert charge() == 1                  # no SIGBUS: a fresh table, as for a new file
    assert os.path.getsize(path) == SIZE
    assert CounterFile(path).charge("alice", time.time(), {"recipients": 1}, LIMITS).counts["recipients"] == 2


def test_a_counter_file_removed_under_a_worker_is_shared_again(worker):
    path, charge = worker
    assert [charge(), charge()] == [1, 2]
    os.unlink(path)
    other = CounterFile(path)             # the watcher, or a new worker: a new file at the path
    assert other.charge("alice", time.time(), {"recipients": 1}, LIMITS).counts["recipients"] == 1
    assert charge() == 2                  # counted in the file the others use, not in the removed one
    assert other.charge("alice", time.time(), {"recipients": 1}, LIMITS).counts["recipients"] == 3
