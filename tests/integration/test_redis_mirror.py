"""relaymilter-mirror keeps a relayers.db in step with Redis, and sendmail's own map code agrees.

A real redis-server on loopback holds the shared map; the installed
relaymilter-mirror copies it to a file; `sendmail -bt` (/map on a
``K relayers hash`` map, tests/integration/mta.py) looks keys up in that file
exactly as a sendmail without the milter would. With keyspace notifications
on, a change reaches the file long before the polling interval; with them
off, polling does it. While Redis is down the file is kept as it is.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from relaymilter.cli import mirror
from relaymilter.store.relayers import BDBRelayStore, open_relay_store

import mta
from redisproc import RedisServer, ToolProcess, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path / "redis", extra=["--notify-keyspace-events", "Kg$x"]).start()
    try:
        yield srv
    finally:
        srv.stop()


def MirrorProcess(*args: str) -> ToolProcess:
    return ToolProcess(["relaymilter-mirror", *args])


def file_entries(path: Path) -> dict[str, int]:
    return dict(BDBRelayStore(str(path)).entries())


def once(url: str, path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["relaymilter-mirror", "--from", url, "--to", str(path), "--once"],
                          capture_output=True, text=True, timeout=60)


def test_once_and_sendmail_agrees(tmp_path, server):
    mta.require_tools()
    url = server.url()
    shared = open_relay_store(url)
    path = tmp_path / "relayers.db"
    try:
        now = int(time.time())
        shared.add({"10.11.12.13": 906502527, "2001:DB8::1": 4102444800})
        shared.add({"192.0.2.7": now}, ttl=3600)
        with server.client() as c:
            c.set("relaymilter:relay:not-an-address", b"5")
            c.set("elsewhere:192.0.2.99", b"5")           # another map's key: not ours
        done = once(url, path)
        assert done.returncode == 0, done.stderr
        assert "skipping relaymilter:relay:not-an-address: not an address" in done.stderr
        assert file_entries(path) == {"10.11.12.13": 906502527, "2001:db8::1": 4102444800, "192.0.2.7": now}
        keys = ["10.11.12.13", "2001:db8::1", "192.0.2.7", "192.0.2.99", "10.0.0.1"]
        assert mta.sendmail_bt_lookups(path, keys) == {
            "10.11.12.13": "906502527<OK>", "2001:db8::1": "4102444800<OK>", "192.0.2.7": "%d<OK>" % now,
            "192.0.2.99": None, "10.0.0.1": None}

        inode = path.stat().st_ino
        shared.delete(["10.11.12.13"])
        shared.add({"192.0.2.7": now + 5, "198.51.100.9": 1600000000})
        assert once(url, path).returncode == 0
        assert path.stat().st_ino == inode          # rewritten in place: sendmail keeps its inode
        assert mta.sendmail_bt_lookups(path, ["10.11.12.13", "192.0.2.7", "198.51.100.9", "2001:db8::1"]) == {
            "10.11.12.13": None, "192.0.2.7": "%d<OK>" % (now + 5), "198.51.100.9": "1600000000<OK>",
            "2001:db8::1": "4102444800<OK>"}
        # The file equals Redis, address for address (bar the key that is no address).
        assert file_entries(path) == {ip: ts for ip, ts in shared.entries() if ip != "not-an-address"}
    finally:
        shared.close()


def test_notifications_bring_changes_long_before_the_interval(tmp_path, server):
    url = server.url()
    path = tmp_path / "relayers.db"
    shared = open_relay_store(url)
    m = MirrorProcess("--from", url, "--to", str(path), "--interval", "60")
    try:
        wait_for(lambda: m.said("subscribed to keyspace notifications"), 10, "the mirror to subscribe")
        wait_for(lambda: path.exists(), 10, "the first round to create the file")
        assert file_entries(path) == {}
        shared.add({"192.0.2.1": 100, "192.0.2.2": 200})
        took = wait_for(lambda: file_entries(path) == {"192.0.2.1": 100, "192.0.2.2": 200}, 10,
                        "an added entry to reach the file")
        assert took < 5, took
        shared.delete(["192.0.2.1"])
        wait_for(lambda: file_entries(path) == {"192.0.2.2": 200}, 10, "a deletion to reach the file")
        # Redis expiring a key by itself (the watcher's grace as TTL) reaches the file too.
        shared.add({"192.0.2.3": int(time.time())}, ttl=1)
        wait_for(lambda: "192.0.2.3" in file_entries(path), 10, "the TTL'd entry to reach the file")
        took = wait_for(lambda: "192.0.2.3" not in file_entries(path), 15, "the expired entry to leave the file")
        assert took < 10
        assert m.proc.poll() is None
    finally:
        shared.close()
        assert m.stop() == 0
    assert m.said("stopped"), m.lines


def test_polling_when_notifications_are_off_and_redis_outage(tmp_path):
    srv = RedisServer(tmp_path / "redis").start()
    url = srv.url()
    path = tmp_path / "relayers.db"
    shared = open_relay_store(url)
    m = MirrorProcess("--from", url, "--to", str(path), "--interval", "0.2")
    try:
        wait_for(lambda: m.said("keyspace notifications off (polling only)"), 10, "the mirror to start")
        shared.add({"192.0.2.1": 1, "192.0.2.2": 2})
        wait_for(lambda: file_entries(path) == {"192.0.2.1": 1, "192.0.2.2": 2}, 10, "polling to copy")

        # Redis dies: the file must stay exactly as it was, the outage logged once.
        port = srv.port
        srv.kill()
        content = path.read_bytes()
        wait_for(lambda: m.said("cannot list entries"), 10, "the outage to be logged")
        time.sleep(0.6)     # watch three failing rounds go by: a negative check needs time to pass
        assert path.read_bytes() == content and file_entries(path) == {"192.0.2.1": 1, "192.0.2.2": 2}
        assert m.count("cannot list entries") == 1

        # Back (empty, nothing was persisted) with other content: the file follows, nothing restarted.
        srv2 = RedisServer(tmp_path / "redis2", port=port).start()
        try:
            shared.add({"192.0.2.9": 9})
            wait_for(lambda: file_entries(path) == {"192.0.2.9": 9}, 10, "the file to follow the new server")
            # The recovery is logged once the round that wrote the file returns: poll for the line too.
            wait_for(lambda: m.said("readable again"), 10, "the recovery to be logged")
        finally:
            srv2.stop()
        assert m.proc.poll() is None
    finally:
        shared.close()
        m.stop()
        srv.stop()


def test_usage_errors_and_once_failure(tmp_path, capsys):
    assert mirror.main(["--to", str(tmp_path / "r.db")]) == 2
    assert "the following arguments are required: --from" in capsys.readouterr().err
    assert mirror.main(["--from", str(tmp_path / "x.db"), "--to", str(tmp_path / "r.db")]) == 2
    assert capsys.readouterr().err == ("relaymilter-mirror: error: --from must be a redis://, rediss://, "
                                       "unix:// or redis+sentinel:// URL\n")
    assert mirror.main(["--from", "redis://127.0.0.1:1/0?nope=1", "--to", str(tmp_path / "r.db")]) == 2
    assert capsys.readouterr().err == "relaymilter-mirror: error: redis://127.0.0.1:1/0?nope=1: unknown option 'nope'\n"
    assert mirror.main(["--from", "redis://127.0.0.1:1/0", "--to", str(tmp_path / "r.db"), "--interval", "0"]) == 2
    capsys.readouterr()
    rc = mirror.main(["--from", "redis://:pw@127.0.0.1:1/0", "--to", str(tmp_path / "r.db"), "--once"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("relaymilter-mirror: error: redis://:***@127.0.0.1:1/0: cannot list entries:")
    assert not (tmp_path / "r.db").exists()      # nothing written on a failed read
    done = subprocess.run([sys.executable, "-m", "relaymilter.cli.mirror", "--version"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("relaymilter-mirror ")
