"""What sits at relayers.db's path never hangs the milter or passes for an empty map.

A running relaymilter, real files: a FIFO (and a directory) where the map was, a map cut
at a page boundary or emptied to 0 bytes, a writer holding the map's lock. Each relay
attempt must get a prompt 451 whose log line names the cause, and the good file, put
back, must be used again at once.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path

import pytest

from relaymilter.harness import MilterSession
from relaymilter.store.relayers import BDBRelayStore

from milterproc import MilterProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

TEMPFAIL = "451 4.3.0 Relay check temporarily unavailable, try again later"
PROMPT = 4.0        # seconds: well inside sendmail's and Postfix's 10 s milter timeouts


def relay_answer(m: MilterProcess, client: str = "192.0.2.5") -> tuple[str, float]:
    """The RCPT answer for a remote recipient, and how long it took."""
    with MilterSession(m.socket, timeout=12) as s:
        s.connect(client_ip=client)
        s.helo("client.example")
        assert s.mail("<someone@example.net>").action == "continue"
        start = time.monotonic()
        answer = str(s.rcpt("<a@remote.example>"))
        took = time.monotonic() - start
        assert str(s.rcpt("<a@local.test>")) == "continue"      # local mail never needs the map
        return answer, took


def _good_map(m: MilterProcess) -> bytes:
    BDBRelayStore(m.relayers_db).add({"192.0.2.5": int(time.time())})
    assert relay_answer(m)[0] == "continue"
    return Path(m.relayers_db).read_bytes()


def test_fifo_or_directory_at_the_map_path_is_refused_at_once(milter):
    path = Path(milter.relayers_db)
    good = _good_map(milter)
    path.unlink()
    os.mkfifo(path)
    for _ in range(4):          # every attempt answered: no thread left stuck in open()
        answer, took = relay_answer(milter)
        assert answer == TEMPFAIL and took < PROMPT, (answer, took)
    milter.wait_for_log('rule=relayers_unavailable cause="%s: is a FIFO"' % path)
    path.unlink()
    path.mkdir()
    assert relay_answer(milter)[0] == TEMPFAIL
    milter.wait_for_log('cause="%s: is a directory"' % path)
    path.rmdir()
    path.write_bytes(good)
    assert relay_answer(milter)[0] == "continue"


@pytest.mark.parametrize("cut", ["page_boundary", "zero_bytes"])
def test_truncated_map_is_unavailable_not_empty(milter, cut):
    path = Path(milter.relayers_db)
    now = int(time.time())
    store = BDBRelayStore(str(path))
    store.add({"10.%d.%d.%d" % (i >> 16, (i >> 8) & 255, i & 255): now for i in range(1, 5000)})
    store.add({"192.0.2.5": now})
    assert relay_answer(milter)[0] == "continue"
    good = path.read_bytes()
    size = len(good) // 2 // 4096 * 4096 if cut == "page_boundary" else 0
    with open(path, "r+b") as fh:          # in place, as a full disk or a bad copy leaves it
        fh.truncate(size)
    answer, _ = relay_answer(milter)
    assert answer == TEMPFAIL, "a cut-down relayers.db must not read as a map without the client"
    why = "is truncated (%d bytes, its header says %d)" % (size, len(good)) if size else \
        "is empty (0 bytes): not a hash database"
    milter.wait_for_log('cause="%s: %s"' % (path, why))
    with open(path, "r+b") as fh:
        fh.write(good)
    assert relay_answer(milter)[0] == "continue"


def test_a_held_lock_gives_prompt_451s_that_do_not_queue(milter):
    path = Path(milter.relayers_db)
    _good_map(milter)
    BDBRelayStore(str(path)).add({"192.0.2.6": int(time.time())})      # a new version: no cached answer
    fd = os.open(path, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)          # a writer that does not let go
    try:
        results: list[tuple[str, float]] = []
        clients = ["192.0.2.%d" % i for i in range(5, 10)]
        start = time.monotonic()
        threads = [threading.Thread(target=lambda c=c: results.append(relay_answer(milter, c))) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        total = time.monotonic() - start
        assert [a for a, _ in results] == [TEMPFAIL] * len(clients)
        assert all(took < PROMPT for _, took in results), results
        assert total < PROMPT + 2, "lookups queued behind each other: %.1fs for %d" % (total, len(clients))
        milter.wait_for_log('cause="%s: lock not obtained in 2000 ms' % path)
    finally:
        os.close(fd)
    assert relay_answer(milter)[0] == "continue"
