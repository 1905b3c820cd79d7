"""Every write to a map is seen by a whole-second-mtime reader at its next lookup.

sendmail (db_map_lookup) and Postfix (dict_changed_name) keep a map open and notice a
change only when fstat() of their descriptor shows an mtime *second* other than the one
recorded when they opened it. These tests keep ONE real sendmail process (`sendmail -bt`
on a pseudo-terminal, so it answers line by line) with the map open, and make the
writes that used to be missed: a second write within the same second as the write the
reader had already seen, for relayers.db (written in place) and spammers.db (replaced
by rename).
"""

from __future__ import annotations

import os
import pty
import select
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

import pytest

import mta
from relaymilter.store.relayers import BDBRelayStore
from relaymilter.store.spammers import rebuild

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


class SendmailBt:
    """One long-lived `sendmail -bt` with map *name* declared on *base*; asks /map questions."""

    def __init__(self, work: Path, name: str, base: Path) -> None:
        cf = work / ("%s.cf" % name)
        cf.write_text("V10/Berkeley\nO DontBlameSendmail=TrustStickyBit\n"
                      "Mlocal, P=/bin/false, F=l, A=false\nMprog, P=/bin/false, F=l, A=false\n"
                      "K%s hash -a<OK> %s\n" % (name, base))
        self.name = name
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(mta.namespaced([mta.SENDMAIL, "-bt", "-C", str(cf)]),
                                     stdin=slave, stdout=slave, stderr=slave)
        os.close(slave)

    def lookup(self, key: str) -> Optional[str]:
        os.write(self.master, b"/map %s %s\n" % (self.name.encode(), key.encode()))
        buf = b""
        deadline = time.monotonic() + 20
        marker = b"map_lookup: %s (%s) " % (self.name.encode(), key.encode())
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.master], [], [], 0.5)
            if ready:
                buf += os.read(self.master, 65536)
            at = buf.find(marker)
            if at >= 0 and b"\n" in buf[at:]:
                line = buf[at + len(marker):].split(b"\n", 1)[0].decode().rstrip("\r")
                return None if line.startswith("no match") else line.split("returns ", 1)[1].rsplit(" (", 1)[0]
        raise AssertionError("sendmail -bt did not answer /map %s %s: %r" % (self.name, key, buf))

    def close(self) -> None:
        mta.terminate(self.proc, 15, 5)
        os.close(self.master)


def _within_one_second(steps: Callable[[], None]) -> bool:
    """Run *steps* starting just after a second boundary; True when they all ran in that second."""
    time.sleep(1.0 - time.time() % 1.0 + 0.005)
    start = int(time.time())
    steps()
    return int(time.time()) == start


def _retry_in_one_second(steps: Callable[[], None], tries: int = 8) -> None:
    for _ in range(tries):
        if _within_one_second(steps):
            return
    pytest.skip("the machine is too loaded to make two writes within one second")


def test_relayers_second_write_in_the_same_second_is_seen_by_sendmail(tmp_path, mta_tools):
    path = tmp_path / "relayers.db"
    store = BDBRelayStore(str(path))
    store.add({"192.0.2.1": 1000})
    reader = SendmailBt(tmp_path, "relayers", tmp_path / "relayers")
    try:
        assert reader.lookup("192.0.2.1") == "1000<OK>"
        answers: dict[str, Optional[str]] = {}

        def steps() -> None:
            store.add({"192.0.2.2": 2000})            # the write sendmail sees ...
            answers["first"] = reader.lookup("192.0.2.2")
            store.add({"192.0.2.3": 3000})            # ... and the one in the same second
            answers["second"] = reader.lookup("192.0.2.3")
            store.delete(["192.0.2.1"])               # and a third: a delete
            answers["deleted"] = reader.lookup("192.0.2.1")

        _retry_in_one_second(steps)
        assert answers == {"first": "2000<OK>", "second": "3000<OK>", "deleted": None}
    finally:
        reader.close()


def test_spammers_rebuild_in_the_same_second_is_seen_by_sendmail(tmp_path, mta_tools):
    source = tmp_path / "spammers"
    db_path = tmp_path / "spammers.db"
    source.write_text("spam1.example\n")
    rebuild(str(source), str(db_path))
    reader = SendmailBt(tmp_path, "spammers", tmp_path / "spammers")
    try:
        assert reader.lookup("spam1.example") == "REJECT<OK>"
        answers: dict[str, Optional[str]] = {}

        def steps() -> None:
            source.write_text("spam1.example\nspam2.example\n")
            rebuild(str(source), str(db_path))
            answers["first"] = reader.lookup("spam2.example")
            source.write_text("spam2.example\nspam3.example\n")
            rebuild(str(source), str(db_path))
            answers["second"] = reader.lookup("spam3.example")
            answers["removed"] = reader.lookup("spam1.example")

        _retry_in_one_second(steps)
        assert answers == {"first": "REJECT<OK>", "second": "REJECT<OK>", "removed": None}
    finally:
        reader.close()
