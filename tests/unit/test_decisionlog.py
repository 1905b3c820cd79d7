"""The decision log: lines keep their order and time, are written in batches, never block mail."""

from __future__ import annotations

import logging
import os
import re
import socket
import time

from relaymilter.decisionlog import DecisionLog, stream_sink, syslog_sink


def test_stream_sink_format_order_and_flush_on_close(tmp_path):
    path = tmp_path / "log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    dl = DecisionLog(stream_sink(fd))
    for i in range(2000):
        dl.log("%06X: pass: RCPT from [%s]: to=%s rule=%s", i, "192.0.2.1", "<a%d@b.example>" % i, "local_domain")
    dl.close()
    os.close(fd)
    lines = path.read_text().splitlines()
    assert len(lines) == 2000
    pat = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} relaymilter\[%d\]: ([0-9A-F]{6}): pass: "
                     r"RCPT from \[192\.0\.2\.1\]: to=<a(\d+)@b\.example> rule=local_domain$" % os.getpid())
    for i, line in enumerate(lines):
        m = pat.match(line)
        assert m and int(m.group(1), 16) == i and int(m.group(2)) == i, line


def test_lines_appear_without_close_within_the_interval(tmp_path):
    path = tmp_path / "log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    dl = DecisionLog(stream_sink(fd))
    dl.log("hello %s", "world")
    deadline = time.monotonic() + 5
    while "hello world" not in path.read_text() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert "hello world" in path.read_text()
    dl.close()
    os.close(fd)


def test_percent_in_arguments_and_odd_text_survive(tmp_path):
    path = tmp_path / "log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    dl = DecisionLog(stream_sink(fd))
    dl.log("to=%s", "<a%b@c>")
    dl.log("to=%s", "<j\udcf6rg@c>")          # surrogate-escaped non-UTF-8 byte from pymilter
    dl.log("bad %d", "not a number")
    dl.close()
    os.close(fd)
    text = path.read_text()
    assert "to=<a%b@c>" in text and "to=<j\\udcf6rg@c>" in text and "unformattable log line" in text


def test_syslog_sink_sends_mail_facility_datagrams(tmp_path):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(tmp_path / "log.sock"))
    server.settimeout(5)
    dl = DecisionLog(syslog_sink(str(tmp_path / "log.sock")))
    dl.log("%s: reject: RCPT", "00002A")
    dl.close()
    assert server.recv(4096) == b"<22>relaymilter[%d]: 00002A: reject: RCPT" % os.getpid()


def test_failing_sink_reported_once_and_never_raises(caplog):
    calls = []

    def broken(lines):
        calls.append(len(lines))
        raise BrokenPipeError("stderr closed")

    dl = DecisionLog(broken, interval=10)
    with caplog.at_level(logging.ERROR, logger="relaymilter"):
        for _ in range(3):
            dl.log("x")
            dl.flush()
    dl.close()
    assert calls == [1, 1, 1]
    assert len([r for r in caplog.records if "decision log: cannot write" in r.getMessage()]) == 1


def test_disabled_log_queues_nothing():
    dl = DecisionLog(None)
    dl.log("x %s", 1)
    assert not dl.enabled and len(dl._queue) == 0
    dl.close()


def test_stream_sink_stamps_lines_when_it_writes_them(tmp_path):
    path = tmp_path / "log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    dl = DecisionLog(stream_sink(fd), interval=3600)
    dl.log("first")
    time.sleep(1.2)
    dl.log("second")
    before = time.time()
    dl.flush()
    after = time.time()
    os.close(fd)
    lines = path.read_text().splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == ["first", "second"]
    for line in lines:
        stamp, ms = line.split(" relaymilter[")[0].split(",")
        t = time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1000
        assert before - 0.002 <= t <= after + 0.002      # the write time: one stamp per chunk
    dl.close()


def test_a_plain_callable_gets_the_lines_as_queued():
    written = []
    dl = DecisionLog(written.extend, interval=3600)
    dl.log("%s: pass: RCPT rule=%s", "00002A", "local_domain")
    dl.append("00002B: pass: MAIL rule=sender_ok")      # the milter's hot path: a finished line
    dl.flush()
    dl.close()
    assert written == ["00002A: pass: RCPT rule=local_domain", "00002B: pass: MAIL rule=sender_ok"]


def test_disabled_log_has_no_append():
    dl = DecisionLog(None)
    assert dl.append is None
    dl.close()
