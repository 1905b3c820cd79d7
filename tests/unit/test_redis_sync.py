"""BDBRelayStore.sync, the one write relaymilter-mirror makes per round, on real Berkeley DB files."""

from __future__ import annotations

import os
import subprocess

import pytest
from berkeleydb import db as bdb

from relaymilter.store.relayers import BDBRelayStore


def raw_items(path: str) -> dict[bytes, bytes]:
    handle = bdb.DB()
    handle.open(path, dbtype=bdb.DB_HASH, flags=bdb.DB_RDONLY)
    try:
        return dict(handle.items())
    finally:
        handle.close()


def test_sync_creates_updates_and_removes(tmp_path):
    path = str(tmp_path / "relayers.db")
    store = BDBRelayStore(path)
    assert store.sync({"192.0.2.1": 10, "2001:DB8::1": 20}) == (2, 0)
    assert raw_items(path) == {b"192.0.2.1": b"10", b"2001:db8::1": b"20"}
    assert store.sync({"192.0.2.1": 10, "2001:db8::1": 21, "::ffff:192.0.2.3": 30}) == (2, 0)
    assert store.sync({"192.0.2.3": 30}) == (0, 2)
    assert raw_items(path) == {b"192.0.2.3": b"30"}
    assert store.sync({}) == (0, 1)
    assert raw_items(path) == {}
    assert store.lookup("192.0.2.3") is None


def test_sync_without_changes_leaves_the_file_alone(tmp_path):
    path = str(tmp_path / "relayers.db")
    store = BDBRelayStore(path)
    store.sync({"192.0.2.%d" % i: i for i in range(1, 200)})
    before = os.stat(path)
    with open(path, "rb") as fh:
        content = fh.read()
    assert store.sync({"192.0.2.%d" % i: i for i in range(1, 200)}) == (0, 0)
    after = os.stat(path)
    assert after.st_ino == before.st_ino
    with open(path, "rb") as fh:
        assert fh.read() == content


def test_sync_keeps_the_files_nul_style(tmp_path):
    subprocess.run(["makemap", "-N", "hash", str(tmp_path / "n")], input=b"192.0.2.1 1\n192.0.2.2 2\n",
                   check=True, timeout=60)
    path = str(tmp_path / "n.db")
    assert BDBRelayStore(path).sync({"192.0.2.2": 2, "192.0.2.3": 3}) == (1, 1)
    assert raw_items(path) == {b"192.0.2.2\0": b"2\0", b"192.0.2.3\0": b"3\0"}


def test_sync_refuses_a_bad_address_before_touching_the_file(tmp_path):
    path = str(tmp_path / "relayers.db")
    store = BDBRelayStore(path)
    store.sync({"192.0.2.1": 1})
    with open(path, "rb") as fh:
        content = fh.read()
    with pytest.raises(ValueError):
        store.sync({"192.0.2.2": 2, "not-an-address": 3})
    with open(path, "rb") as fh:
        assert fh.read() == content
