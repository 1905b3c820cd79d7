"""The follower on real files: rotation by rename and copy-truncate under a steady
stream of lines written by a thread, removal and re-creation, partial lines,
overlong lines; with inotify and with polling."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from relaymilter.popwatch.follow import Follower
from relaymilter.popwatch.lines import LineBuffer

MODES = [pytest.param(True, id="inotify"), pytest.param(False, id="poll")]


def collect(f: Follower, until: Callable[[list[bytes]], bool], timeout: float = 10.0,
            lines: list[bytes] | None = None) -> list[bytes]:
    lines = [] if lines is None else lines
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for c in f.read():
            lines.extend(c.data.splitlines())
        if until(lines):
            return lines
        f.wait(0.2)
    raise AssertionError("timed out; got %d lines, last %r" % (len(lines), lines[-3:]))


class Writer(threading.Thread):
    """Appends numbered lines to a log like syslog does (O_APPEND), reopening on request."""

    def __init__(self, path: Path, count: int, pause: float = 0.0005) -> None:
        super().__init__(daemon=True)
        self.path, self.count, self.pause = path, count, pause
        self.lock = threading.Lock()        # held by a "logrotate" while it rotates
        self.reopen = threading.Event()
        self.written = 0

    def run(self) -> None:
        fh = open(self.path, "ab", buffering=0)
        try:
            for i in range(self.count):
                with self.lock:
                    if self.reopen.is_set():
                        fh.close()
                        fh = open(self.path, "ab", buffering=0)
                        self.reopen.clear()
                    fh.write(b"Nov 21 18:00:00 mail dovecot: pop3-login: Login: line %06d\n" % i)
                    self.written = i + 1
                time.sleep(self.pause)
        finally:
            fh.close()


def numbers(lines: list[bytes]) -> list[int]:
    return [int(line.rsplit(b" ", 1)[1]) for line in lines]


@pytest.mark.parametrize("inotify", MODES)
def test_rotation_by_rename_under_load_loses_nothing(tmp_path: Path, inotify: bool) -> None:
    log = tmp_path / "mail.log"
    log.write_bytes(b"old line before start\n")
    f = Follower([str(log)], use_inotify=inotify, drain_idle=0.5)
    f.start()
    w = Writer(log, 3000)

    def rotate() -> None:
        for n in (1, 2):
            while w.written < 1000 * n:
                time.sleep(0.005)
            # syslog's rotation: rename, then the writer reopens (after a little while).
            os.rename(log, str(log) + ".%d" % n)
            time.sleep(0.02)
            w.reopen.set()

    rotator = threading.Thread(target=rotate, daemon=True)
    w.start()
    rotator.start()
    try:
        lines = collect(f, lambda ls: len(ls) >= 3000, timeout=30)
    finally:
        w.join(10)
        rotator.join(10)
        f.close()
    assert numbers(lines) == list(range(3000)), "lost or duplicated lines"
    assert f.stats["rotations"] + f.stats["disappeared"] == 2   # renamed away, then re-created


@pytest.mark.parametrize("inotify", MODES)
def test_copy_truncate_under_load_loses_nothing(tmp_path: Path, inotify: bool) -> None:
    log = tmp_path / "mail.log"
    log.touch()
    f = Follower([str(log)], use_inotify=inotify)
    f.start()
    w = Writer(log, 3000)

    def rotate() -> None:
        for n in (1, 2):
            while w.written < 1000 * n:
                time.sleep(0.005)
            # logrotate copytruncate. Lines written between the copy and the truncate
            # are lost by logrotate itself, so the writer waits while it rotates.
            with w.lock:
                shutil.copyfile(log, str(log) + ".1")
                os.truncate(log, 0)

    rotator = threading.Thread(target=rotate, daemon=True)
    w.start()
    rotator.start()
    try:
        lines = collect(f, lambda ls: len(ls) >= 3000, timeout=30)
    finally:
        w.join(10)
        rotator.join(10)
        f.close()
    assert numbers(lines) == list(range(3000)), "lost or duplicated lines"
    assert f.stats["truncations"] >= 1


def test_copy_truncate_recovers_unread_lines_from_the_copy(tmp_path: Path) -> None:
    log = tmp_path / "mail.log"
    log.write_bytes(b"")
    f = Follower([str(log)], use_inotify=False)
    f.start()
    with open(log, "ab") as fh:
        fh.write(b"line 0\nline 1\n")
    assert collect(f, lambda ls: len(ls) == 2) == [b"line 0", b"line 1"]
    with open(log, "ab") as fh:
        fh.write(b"line 2\nline 3\n")       # written, not read yet...
    shutil.copyfile(log, str(log) + ".1")    # ...when logrotate copies and truncates
    os.truncate(log, 0)
    with open(log, "ab") as fh:
        fh.write(b"line 4\n")
    lines = collect(f, lambda ls: len(ls) >= 3)
    f.close()
    assert lines == [b"line 2", b"line 3", b"line 4"]
    assert f.stats["recovered_bytes"] == len(b"line 2\nline 3\n")


@pytest.mark.parametrize("inotify", MODES)
def test_file_removed_and_created_again(tmp_path: Path, inotify: bool) -> None:
    log = tmp_path / "mail.log"
    log.write_bytes(b"")
    f = Follower([str(log)], use_inotify=inotify, drain_idle=0.2)
    f.start()
    log.write_bytes(b"first\n")
    got = collect(f, lambda ls: ls == [b"first"])
    os.unlink(log)
    collect(f, lambda ls: f.stats["disappeared"] == 1, lines=got)
    log.write_bytes(b"second\nthird\n")
    got = collect(f, lambda ls: len(ls) == 3, lines=got)
    f.close()
    assert got == [b"first", b"second", b"third"]


def test_missing_at_start_is_read_from_its_beginning_when_it_appears(tmp_path: Path) -> None:
    log = tmp_path / "later.log"
    f = Follower([str(log)])
    f.start()
    assert f.read() == []
    log.write_bytes(b"a\nb\n")
    assert collect(f, lambda ls: len(ls) == 2) == [b"a", b"b"]
    f.close()


def test_starts_at_the_end_and_wakes_within_milliseconds(tmp_path: Path) -> None:
    log = tmp_path / "mail.log"
    log.write_bytes(b"history\n" * 100)
    f = Follower([str(log)])
    assert f.inotify is not None, "inotify should be available on Linux"
    f.start()
    assert f.read() == []
    delays = []
    for i in range(20):
        with open(log, "ab") as fh:
            t0 = time.monotonic()
            fh.write(b"new %d\n" % i)
        f.wait(2.0)
        data = b"".join(c.data for c in f.read())
        delays.append(time.monotonic() - t0)
        assert data == b"new %d\n" % i
    f.close()
    assert max(delays) < 0.5 and sorted(delays)[10] < 0.05, delays


def test_idle_wait_sleeps_instead_of_spinning(tmp_path: Path) -> None:
    log = tmp_path / "mail.log"
    log.touch()
    f = Follower([str(log)])
    f.start()
    cpu0, t0 = time.process_time(), time.monotonic()
    while time.monotonic() - t0 < 0.5:
        f.read()
        f.wait(0.25)
    f.close()
    assert time.process_time() - cpu0 < 0.1


@pytest.mark.parametrize("inotify", MODES)
def test_partial_lines_wait_for_their_newline(tmp_path: Path, inotify: bool) -> None:
    log = tmp_path / "mail.log"
    log.touch()
    f = Follower([str(log)], use_inotify=inotify)
    f.start()
    with open(log, "ab", buffering=0) as fh:
        fh.write(b"Nov 21 18:00:00 mail dovecot: pop3-login: Lo")
        f.wait(0.3)
        assert [c.data for c in f.read()] == []
        fh.write(b"gin: user=<a>, rip=192.0.2.1\nnext par")
        lines = collect(f, lambda ls: len(ls) == 1)
        fh.write(b"t\n")
        collect(f, lambda ls: len(ls) == 2, lines=lines)
    f.close()
    assert lines == [b"Nov 21 18:00:00 mail dovecot: pop3-login: Login: user=<a>, rip=192.0.2.1", b"next part"]


def test_line_buffer_caps_long_lines() -> None:
    buf = LineBuffer(max_line=100)
    out = buf.feed(b"short\n" + b"x" * 1_000_000 + b"\nafter\n")
    assert out == b"short\nafter\n" and buf.overlong == 1
    # An overlong line arriving in pieces never grows the buffer past the cap.
    assert buf.feed(b"y" * 60) == b""
    assert buf.feed(b"y" * 60) == b"" and buf.partial == b"" and buf.discarding
    assert buf.feed(b"y" * 500 + b"\nok\n") == b"ok\n"
    assert buf.overlong == 2
    # Many lines, some long, in one block.
    block = b"".join((b"z" * 150 if i % 7 == 0 else b"line %d" % i) + b"\n" for i in range(1000))
    out = LineBuffer(max_line=100).feed(block)
    assert out.splitlines() == [b"line %d" % i for i in range(1000) if i % 7]


def test_megabyte_lines_in_a_followed_file(tmp_path: Path) -> None:
    log = tmp_path / "mail.log"
    log.touch()
    f = Follower([str(log)])
    f.start()
    with open(log, "ab") as fh:
        fh.write(b"a\n" + os.urandom(1 << 20).replace(b"\n", b"-") + b"\nb\n")
    lines = collect(f, lambda ls: b"b" in ls)
    f.close()
    assert lines == [b"a", b"b"] and f.overlong == 1


def test_backlog_is_flagged_when_starting_before_the_end(tmp_path: Path) -> None:
    log = tmp_path / "mail.log"
    log.write_bytes(b"one\ntwo\n")
    f = Follower([str(log)])
    f.start(lambda path, fd, size: 4)
    chunks = f.read()
    with open(log, "ab") as fh:
        fh.write(b"three\n")
    f.wait(1.0)
    chunks += f.read()
    f.close()
    assert [(c.data, c.backlog) for c in chunks] == [(b"two\n", True), (b"three\n", False)]
