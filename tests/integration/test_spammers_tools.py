"""spammers.db against the real tools: makemap, sendmail's own map code, the installed script,
and failures the kernel produces (read-only directory, file size limit) that must change nothing.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mta
from relaymilter.store.spammers import SpammersMap, rebuild

pytestmark = pytest.mark.integration

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "spammers_sample"
SAMPLE_KEYS = {
    "spam.example", "bulk.example", "user@mail.other.example", "quoted@quoted.example",
    "user#tag@hash.example", "[192.0.2.7]", "[ipv6:2001:db8::25]", "who@[198.51.100.9]",
    "tabbed.example",
}


def digest(path) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def script(name: str) -> str:
    """The console script installed beside this Python (a venv), else the one on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    assert found, "%s is not installed: pip install -e . first" % name
    return found


def cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "relaymilter.cli.vnewspammers", *argv]


@pytest.fixture
def built(tmp_path):
    db = tmp_path / "spammers.db"
    assert rebuild(str(SAMPLE), str(db)) == len(SAMPLE_KEYS)
    return db


def test_makemap_dumps_our_map(built):
    out = subprocess.run(["makemap", "-u", "hash", str(built)], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    pairs = [line.split("\t") for line in out.splitlines()]
    assert sorted(k for k, _ in pairs) == sorted(SAMPLE_KEYS)
    assert {v for _, v in pairs} == {"REJECT"}


def test_sendmail_k_hash_map_reads_our_map(built):
    queries = ["spam.example", "SPAM.Example", "user@mail.other.example", "[192.0.2.7]",
               "[ipv6:2001:db8::25]", "who@[198.51.100.9]", "sub.spam.example", "other.example"]
    got = mta.sendmail_bt_lookups(built, queries, flags="-a<LISTED>")
    assert got == {
        "spam.example": "REJECT<LISTED>",
        "SPAM.Example": "REJECT<LISTED>",            # sendmail folds the key, as we store it
        "user@mail.other.example": "REJECT<LISTED>",
        "[192.0.2.7]": "REJECT<LISTED>",
        "[ipv6:2001:db8::25]": "REJECT<LISTED>",
        "who@[198.51.100.9]": "REJECT<LISTED>",
        "sub.spam.example": None,     # parent domains are walked by the caller, not the map
        "other.example": None,
    }


def test_a_map_built_by_makemap_is_read(tmp_path):
    base = tmp_path / "spammers"
    subprocess.run(["makemap", "hash", str(base)], input="Spam.Example REJECT\nuser@host.example REJECT\n",
                   text=True, timeout=30, check=True)
    smap = SpammersMap(str(base) + ".db")
    assert smap.contains("spam.example") and smap.contains("USER@host.example")
    assert not smap.contains("other.example")
    subprocess.run(["makemap", "-N", "hash", str(base)], input="nul.example REJECT\n",
                   text=True, timeout=30, check=True)            # postmap style, rewritten in place
    assert smap.contains("nul.example") and not smap.contains("spam.example")


def test_installed_script(tmp_path):
    src, db = tmp_path / "spammers", tmp_path / "spammers.db"
    src.write_text("spam.example\nuser@host.example\n")
    proc = subprocess.run([script("vnewspammers"), "-f", str(src), "-o", str(db)],
                          capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout == "vnewspammers: wrote 2 entries to %s\n" % db
    assert SpammersMap(str(db)).lookup(["user@host.example"])


def test_read_only_directory_changes_nothing(tmp_path):
    # Root ignores permission bits, and this Python lives under /root where an
    # unprivileged user cannot run it, so the directory is made unwritable the
    # way root cannot override: a read-only bind mount over it, in a private
    # mount namespace that ends with the command.
    etc = tmp_path / "etc"
    etc.mkdir()
    db = etc / "spammers.db"
    assert rebuild(str(SAMPLE), str(db)) == len(SAMPLE_KEYS)
    before, listing = digest(db), sorted(os.listdir(etc))
    src = tmp_path / "spammers"
    src.write_text("new.example\n")
    sh = 'mount --bind -o ro "$1" "$1" && shift && exec "$@"'
    for lock_exists in (True, False):
        lock = etc / "spammers.db.lock"
        if not lock_exists and lock.exists():
            lock.unlink()
            listing.remove(lock.name)
        proc = subprocess.run(["unshare", "--mount", "--", "sh", "-c", sh, "sh", str(etc),
                               *cli("-f", str(src), "-o", str(db))],
                              capture_output=True, text=True, timeout=60)
        assert (proc.returncode, proc.stdout) == (1, "")
        assert proc.stderr.startswith("vnewspammers: error: %s.lock: " % db)
        assert proc.stderr.endswith(": Read-only file system\n") and proc.stderr.count("\n") == 1
        assert digest(db) == before
        assert sorted(os.listdir(etc)) == listing


def test_failure_while_writing_removes_the_temporary_file(tmp_path):
    # A file size limit makes Berkeley DB's writes fail half way (EFBIG; Python
    # ignores SIGXFSZ): a real I/O error in the middle of the rebuild.
    db = tmp_path / "spammers.db"
    assert rebuild(str(SAMPLE), str(db)) == len(SAMPLE_KEYS)
    before = digest(db)
    src = tmp_path / "big"
    src.write_text("".join("host%d.example\n" % i for i in range(20000)))
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536)); "
            "from relaymilter.cli.vnewspammers import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "-f", str(src), "-o", str(db)],
                          capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr.startswith("vnewspammers: error: %s: cannot write the new map: File too large" % db)
    assert proc.stderr.count("\n") == 1
    assert digest(db) == before
    assert sorted(os.listdir(tmp_path)) == ["big", "spammers.db", "spammers.db.lock"]


def test_a_run_waits_for_the_lock_and_then_reads_the_latest_source(tmp_path):
    db = tmp_path / "spammers.db"
    src = tmp_path / "spammers"
    src.write_text("first.example\n")
    assert rebuild(str(src), str(db)) == 1
    before = digest(db)
    lock = os.open(str(db) + ".lock", os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX)
    proc = subprocess.Popen(cli("-f", str(src), "-o", str(db)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        # Blocked = it holds the lock file open and has not finished.
        deadline = time.monotonic() + 30
        while not holds_open(proc.pid, str(db) + ".lock"):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "vnewspammers never opened the lock file"
            time.sleep(0.01)
        assert proc.poll() is None and digest(db) == before
        src.write_text("second.example\nthird.example\n")   # edited while the other run waits
        fcntl.flock(lock, fcntl.LOCK_UN)
        out, err = proc.communicate(timeout=60)
    finally:
        os.close(lock)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert (proc.returncode, out, err) == (0, "vnewspammers: wrote 2 entries to %s\n" % db, "")
    smap = SpammersMap(str(db))
    assert smap.contains("third.example") and not smap.contains("first.example")


def holds_open(pid: int, path: str) -> bool:
    fd_dir = "/proc/%d/fd" % pid
    try:
        names = os.listdir(fd_dir)
    except FileNotFoundError:
        return False
    for name in names:
        try:
            if os.readlink(os.path.join(fd_dir, name)) == path:
                return True
        except FileNotFoundError:
            continue
    return False


def test_concurrent_runs_do_not_race(tmp_path):
    db = tmp_path / "spammers.db"
    sources = []
    for n in range(4):
        src = tmp_path / ("list%d" % n)
        src.write_text("".join("u%d@list%d.example\n" % (i, n) for i in range(3000 + n)))
        sources.append(src)
    procs = [subprocess.Popen(cli("-f", str(s), "-o", str(db)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for s in sources]
    try:
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    assert [p.returncode for p in procs] == [0, 0, 0, 0], results
    size = len(SpammersMap(str(db)))
    assert size in (3000, 3001, 3002, 3003)
    n = size - 3000
    smap = SpammersMap(str(db))
    assert all(smap.contains("u%d@list%d.example" % (i, n)) for i in range(size))
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
