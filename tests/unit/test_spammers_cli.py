"""vnewspammers main(): paths, output, exit codes, and failures that leave spammers.db alone."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest

from relaymilter.cli.vnewspammers import build_parser, main
from relaymilter.config import default_config_path
from relaymilter.store.bdb import read_items
from relaymilter.store.spammers import rebuild

PROG = "vnewspammers"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def digest(path) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def keys(path) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in read_items(str(path))}


def leftovers(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(".tmp"))


@pytest.fixture
def files(tmp_path):
    """A source and a built spammers.db holding the old list."""
    src, db = tmp_path / "spammers", tmp_path / "spammers.db"
    src.write_text("old.example\n")
    assert rebuild(str(src), str(db)) == 1
    return src, db


def test_rebuild_prints_one_line(capsys, files):
    src, db = files
    src.write_text("# list\nSpam.Example\nUser@Host.Example  # why\n\nspam.example.\n")
    code, out, err = run(capsys, "-f", str(src), "-o", str(db))
    assert (code, err) == (0, "")
    assert out == "vnewspammers: wrote 2 entries to %s\n" % db
    assert keys(db) == {"spam.example": "REJECT", "user@host.example": "REJECT"}
    assert leftovers(db.parent) == []


def test_empty_source_writes_an_empty_map(capsys, files):
    src, db = files
    src.write_text("")
    assert run(capsys, "-f", str(src), "-o", str(db)) == (0, "vnewspammers: wrote 0 entries to %s\n" % db, "")
    assert keys(db) == {}


def test_help_mentions_empty_source_and_exits_0(capsys):
    code, out, err = run(capsys, "--help")
    assert code == 0 and err == ""
    assert "An empty source is allowed" in out and "-f SOURCE" in out and "-o DB" in out
    assert build_parser().prog == PROG


@pytest.mark.parametrize("argv", [["--bogus"], ["extra-arg"], ["-f"], ["-o"]])
def test_bad_usage_exits_2_with_one_line(capsys, argv):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("vnewspammers: error: ") and err.count("\n") == 1


def test_source_and_map_the_same_file_is_refused(capsys, files):
    src, db = files
    before = digest(src)
    code, out, err = run(capsys, "-f", str(src), "-o", str(src))
    assert code == 2 and out == ""
    assert err == "vnewspammers: error: the source and the map are the same file: %s\n" % src
    assert digest(src) == before


@pytest.mark.parametrize("content, where", [
    (b"ok.example\n\nbad entry\n", ":3: more than one word"),
    (b"ok.example\nuser@\n", ":2: "),
    (b"\x00\x01\x02binary\xff\n", ":1: binary data (NUL byte)"),
    (b"ok.example\ncaf\xe9.example\n", ":2: not valid UTF-8"),
])
def test_bad_source_changes_nothing(capsys, files, content, where):
    src, db = files
    before = digest(db)
    src.write_bytes(content)
    code, out, err = run(capsys, "-f", str(src), "-o", str(db))
    assert code == 1 and out == ""
    assert err.startswith("vnewspammers: error: %s%s" % (src, where)) and err.count("\n") == 1
    assert digest(db) == before
    assert leftovers(db.parent) == []


def test_missing_source_changes_nothing(capsys, files):
    src, db = files
    before = digest(db)
    src.unlink()
    code, out, err = run(capsys, "-f", str(src), "-o", str(db))
    assert (code, out) == (1, "")
    assert err == "vnewspammers: error: %s: cannot read: No such file or directory\n" % src
    assert digest(db) == before


def test_target_directory_missing(capsys, files, tmp_path):
    src, _ = files
    target = tmp_path / "no-such-dir" / "spammers.db"
    code, out, err = run(capsys, "-f", str(src), "-o", str(target))
    assert (code, out) == (1, "")
    assert err.startswith("vnewspammers: error: %s.lock: cannot open the lock file: No such file" % target)


def test_target_is_a_directory(capsys, files, tmp_path):
    src, _ = files
    (tmp_path / "adir").mkdir()
    code, out, err = run(capsys, "-f", str(src), "-o", str(tmp_path / "adir"))
    assert (code, out) == (1, "")
    assert err == "vnewspammers: error: %s: is a directory\n" % (tmp_path / "adir")


def test_parent_is_a_file_not_a_directory(capsys, files, tmp_path):
    # Root ignores permission bits; a file where the directory should be
    # fails for root too.
    src, _ = files
    (tmp_path / "etc").write_text("not a directory\n")
    target = tmp_path / "etc" / "spammers.db"
    code, out, err = run(capsys, "-f", str(src), "-o", str(target))
    assert (code, out) == (1, "")
    assert "Not a directory" in err and err.count("\n") == 1
    assert (tmp_path / "etc").read_text() == "not a directory\n"


def test_mode_of_the_old_map_is_kept(capsys, files):
    src, db = files
    os.chmod(db, 0o640)
    inode = db.stat().st_ino
    assert run(capsys, "-f", str(src), "-o", str(db))[0] == 0
    assert db.stat().st_ino != inode            # a new file, renamed into place
    assert stat.S_IMODE(db.stat().st_mode) == 0o640


def test_new_map_mode_follows_umask(capsys, files, tmp_path):
    src, _ = files
    old = os.umask(0o027)
    try:
        assert run(capsys, "-f", str(src), "-o", str(tmp_path / "new.db"))[0] == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new.db").stat().st_mode) == 0o640


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file away")
def test_owner_of_the_old_map_is_kept_by_root(capsys, files):
    src, db = files
    os.chown(db, 65534, 65534)
    assert run(capsys, "-f", str(src), "-o", str(db))[0] == 0
    assert (db.stat().st_uid, db.stat().st_gid) == (65534, 65534)


def test_symlinked_map_is_followed(capsys, files, tmp_path):
    src, db = files
    link = tmp_path / "link.db"
    link.symlink_to(db)
    src.write_text("via-link.example\n")
    assert run(capsys, "-f", str(src), "-o", str(link))[0] == 0
    assert link.is_symlink()
    assert keys(db) == {"via-link.example": "REJECT"}


def test_paths_from_the_config(capsys, tmp_path):
    src, db = tmp_path / "list", tmp_path / "out.db"
    src.write_text("conf.example\n")
    conf = tmp_path / "relaymilter.yaml"
    conf.write_text("spammers:\n  source: %s\n  path: %s\n" % (src, db))
    assert run(capsys, "-c", str(conf)) == (0, "vnewspammers: wrote 1 entries to %s\n" % db, "")
    assert keys(db) == {"conf.example": "REJECT"}
    # -f and -o win over the configuration
    other = tmp_path / "other"
    other.write_text("a.example\nb.example\n")
    assert run(capsys, "-c", str(conf), "-f", str(other))[1] == "vnewspammers: wrote 2 entries to %s\n" % db


def test_bad_config_exits_1(capsys, tmp_path):
    conf = tmp_path / "relaymilter.yaml"
    conf.write_text("spammers:\n  sauce: x\n")
    code, out, err = run(capsys, "-c", str(conf))
    assert (code, out) == (1, "")
    assert err.startswith("vnewspammers: error: %s:2: " % conf) and err.count("\n") == 1


def test_classic_defaults_under_home(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RELAYMILTER_CONFIG", default_config_path())
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "spammers").write_text("home.example\n")
    target = tmp_path / "etc" / "spammers.db"
    assert run(capsys) == (0, "vnewspammers: wrote 1 entries to %s\n" % target, "")
    assert keys(target) == {"home.example": "REJECT"}
