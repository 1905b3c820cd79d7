"""The map writers on a full disk and among symlinks planted by another user.

Full disk: a small tmpfs mounted by the test, filled to the last block, then 1,500
`vsmtprelay add` runs (and rebuilds, mirror syncs) while a little space comes and goes.
Every write either exits 0 and is on disk, or says why in one line and changes nothing;
the file always verifies with db5.3_verify.

Symlinks: the tools run as root in a directory owned by an unprivileged user (as a
virtual server's ~/etc is), who plants links to a root-owned file elsewhere.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import subprocess
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from relaymilter.cli import vnewspammers, vsmtprelay
from relaymilter.errors import StoreUnavailable
from relaymilter.store.bdb import read_items
from relaymilter.store.relayers import BDBRelayStore

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def run_cli(module, argv: list[str], capsys) -> tuple[int, str]:
    code = module.main(argv)
    captured = capsys.readouterr()
    return code, captured.err


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str = "640k") -> Iterator[Path]:
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%s,mode=0755" % size, "relaymilter-test", str(where)],
                   check=True, timeout=30)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True, timeout=30)


def fill(path: Path) -> None:
    """Append to *path* until the file system is full."""
    with open(path, "ab", buffering=0) as fh:
        while True:
            try:
                fh.write(b"\0" * 4096)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
        while True:         # the last partial block
            try:
                fh.write(b"\0" * 512)
            except OSError:
                return


def free(path: Path, nbytes: int) -> None:
    size = path.stat().st_size
    os.truncate(path, max(0, size - nbytes))


def verify(path: Path) -> None:
    proc = subprocess.run(["db5.3_verify", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_vsmtprelay_on_a_full_disk_loses_nothing(tmp_path, capsys):
    with small_tmpfs(tmp_path / "mnt") as mnt:
        db = mnt / "relayers.db"
        seed = {"172.16.0.%d" % i: 1000 + i for i in range(1, 51)}
        BDBRelayStore(str(db)).add(seed)
        filler = mnt / "filler"
        fill(filler)
        accepted: dict[str, int] = {}
        refused = 0
        for i in range(1500):
            if i % 25 == 24:
                free(filler, 64 << 10)      # a little room comes and goes
            if i % 25 == 12:
                fill(filler)
            ip = "10.9.%d.%d" % (i >> 8, i & 255)
            code, err = run_cli(vsmtprelay, ["-f", str(db), "add", ip, str(5000 + i)], capsys)
            if code == 0:
                accepted[ip] = 5000 + i
            else:
                refused += 1
                assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
                assert err.startswith("vsmtprelay: error: %s: " % db) and "No space left on device" in err, err
            if i % 50 == 0:
                verify(db)
        verify(db)
        assert refused > 0 and accepted, (refused, len(accepted))
        filler.unlink()
        stored = dict(BDBRelayStore(str(db)).entries())
        assert stored == {**seed, **accepted}
        # expire on a full disk: the compacting rewrite needs room, deletes do not
        fill(mnt / "filler2")
        code, err = run_cli(vsmtprelay, ["-f", str(db), "expire"], capsys)   # removes everything <= now
        verify(db)
        assert code == 0, err
        assert dict(BDBRelayStore(str(db)).entries()) == {}


def test_mirror_sync_and_rebuild_on_a_full_disk_change_nothing(tmp_path, capsys):
    with small_tmpfs(tmp_path / "mnt") as mnt:
        db = mnt / "relayers.db"
        seed = {"172.16.0.%d" % i: 1000 + i for i in range(1, 51)}
        store = BDBRelayStore(str(db))
        store.add(seed)
        source, spam_db = mnt / "spammers", mnt / "spammers.db"
        source.write_text("spam1.example\n")
        assert run_cli(vnewspammers, ["-f", str(source), "-o", str(spam_db)], capsys)[0] == 0
        before_spam = read_items(str(spam_db))
        big = mnt / "spammers.big"
        big.write_text("".join("spam%d.example\n" % i for i in range(20000)))
        fill(mnt / "filler")
        with pytest.raises(StoreUnavailable, match="No space left on device"):
            store.sync({"10.%d.%d.%d" % (i >> 16, (i >> 8) & 255, i & 255): 7 for i in range(1, 20000)})
        verify(db)
        assert dict(store.entries()) == seed
        code, err = run_cli(vnewspammers, ["-f", str(big), "-o", str(spam_db)], capsys)
        assert code == 1 and err.count("\n") == 1 and "No space left on device" in err, err
        assert read_items(str(spam_db)) == before_spam
        assert sorted(p.name for p in mnt.iterdir()) == ["filler", "relayers.db", "spammers", "spammers.big",
                                                         "spammers.db", "spammers.db.lock"]


# -- symlinks ---------------------------------------------------------------------------------

@pytest.fixture
def user_dir(tmp_path) -> tuple[Path, int]:
    """A directory owned by an unprivileged user (nobody), like a virtual server's ~/etc."""
    uid = pwd.getpwnam("nobody").pw_uid
    home = tmp_path / ("vuser-" + uuid.uuid4().hex[:6])
    home.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chown(home, uid, -1)
    return home, uid


def plant(link: Path, target: Path, uid: int) -> None:
    link.symlink_to(target)
    os.lchown(link, uid, -1)


def test_links_planted_by_another_user_are_refused(tmp_path, capsys, user_dir):
    home, uid = user_dir
    victim = tmp_path / "victim"
    victim.write_text("root's file\n")
    plant(home / "relayers.db", victim, uid)
    code, err = run_cli(vsmtprelay, ["-f", str(home / "relayers.db"), "add", "192.0.2.1"], capsys)
    assert code == 1 and "is a symlink owned by uid %d (neither root nor the running user): refused" % uid in err
    assert victim.read_text() == "root's file\n"

    # a dangling link: nothing is created through it
    (home / "relayers.db").unlink()
    plant(home / "relayers.db", tmp_path / "created-by-root.db", uid)
    code, err = run_cli(vsmtprelay, ["-f", str(home / "relayers.db"), "add", "192.0.2.1"], capsys)
    assert code == 1 and "refused" in err and not (tmp_path / "created-by-root.db").exists()
    (home / "relayers.db").unlink()

    # a link higher up the path
    elsewhere = tmp_path / "root-dir"
    elsewhere.mkdir()
    plant(home / "etc", elsewhere, uid)
    code, err = run_cli(vsmtprelay, ["-f", str(home / "etc" / "relayers.db"), "add", "192.0.2.1"], capsys)
    assert code == 1 and "%s is a symlink owned by uid %d" % (home / "etc", uid) in err
    assert list(elsewhere.iterdir()) == []

    # vnewspammers: the map, and the lock file beside it
    source = tmp_path / "spammers"
    source.write_text("spam.example\n")
    plant(home / "spammers.db", victim, uid)
    code, err = run_cli(vnewspammers, ["-f", str(source), "-o", str(home / "spammers.db")], capsys)
    assert code == 1 and "is a symlink owned by uid %d" % uid in err, err
    assert victim.read_text() == "root's file\n"
    (home / "spammers.db").unlink()
    plant(home / "spammers.db.lock", victim, uid)
    code, err = run_cli(vnewspammers, ["-f", str(source), "-o", str(home / "spammers.db")], capsys)
    assert code == 1 and "spammers.db.lock: is a symlink: refused" in err, err
    assert victim.read_text() == "root's file\n"
    assert not (home / "spammers.db").exists()


def test_links_owned_by_root_are_followed(tmp_path, capsys, user_dir):
    home, _ = user_dir
    real_dir = tmp_path / "maps"
    real_dir.mkdir()
    (home / "relayers.db").symlink_to(real_dir / "relayers.db")       # root's own link, as an admin makes
    BDBRelayStore(str(real_dir / "relayers.db")).add({"192.0.2.9": 9})
    code, err = run_cli(vsmtprelay, ["-f", str(home / "relayers.db"), "add", "192.0.2.1", "1"], capsys)
    assert code == 0, err
    assert dict(BDBRelayStore(str(real_dir / "relayers.db")).entries()) == {"192.0.2.1": 1, "192.0.2.9": 9}
    assert (home / "relayers.db").is_symlink()
    source = tmp_path / "spammers"
    source.write_text("spam.example\n")
    (real_dir / "spammers.db").write_bytes(b"")
    (home / "spammers.db").symlink_to(real_dir / "spammers.db")
    code, err = run_cli(vnewspammers, ["-f", str(source), "-o", str(home / "spammers.db")], capsys)
    assert code == 0, err
    assert [k for k, _ in read_items(str(real_dir / "spammers.db"))] == [b"spam.example"]
    assert (home / "spammers.db").is_symlink() and sorted(p.name for p in real_dir.iterdir()) == [
        "relayers.db", "spammers.db", "spammers.db.lock"]
