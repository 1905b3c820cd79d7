"""local_recipients sources a local user can shape: :include: files they own, NSS that fails.

Each fault must end in a clear decision (451 when the milter cannot decide,
never 250 for an unknown user nor 550 for a known one) and one log line
naming the cause.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time

import pytest

from relaymilter.address.resolve import Resolved
from relaymilter.errors import StoreUnavailable
from relaymilter.policy.recipients import LOOKUP_FAILED, check, query
from relaymilter.store import recipients as rmod
from relaymilter.store.localfiles import read_list
from relaymilter.store.recipients import LocalRecipients


@pytest.fixture
def settled(monkeypatch):
    """Files count as settled at once (the racy-time rule has its own tests)."""
    monkeypatch.setattr(rmod, "RACY_NS", 0)


def decide(rec: LocalRecipients, local: str):
    q = query(Resolved(local, "local.test"))
    return check(q, rec.snapshot().lookup).decision


def failures(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "relaymilter.store.recipients" and r.levelno >= logging.ERROR]


def refused_include(tmp_path, included, caplog) -> tuple[LocalRecipients, str]:
    """Aliases with a list that :include:s *included*: both kinds of recipient are a 451, logged once."""
    aliases = tmp_path / "aliases"
    aliases.write_text("alice: alice\nlist: :include:%s\n" % included)
    rec = LocalRecipients(aliases=[str(aliases)])
    caplog.set_level(logging.INFO, logger="relaymilter.store.recipients")
    assert decide(rec, "nobody-here") == LOOKUP_FAILED
    assert decide(rec, "alice") == LOOKUP_FAILED
    lines = failures(caplog)
    assert len(lines) == 1, lines
    return rec, lines[0]


def test_a_deep_include_chain_is_a_451_with_one_line(tmp_path, settled, caplog):
    """A user who owns an included file chains 1,500 more: no RecursionError, a 451 naming the depth."""
    home = tmp_path / "home"
    home.mkdir()
    for i in range(1500):
        (home / ("l%d" % i)).write_text(":include:%s\n" % (home / ("l%d" % (i + 1))))
    (home / "l1500").write_text("someone@example.org\n")
    aliases = tmp_path / "aliases"
    aliases.write_text("staff: :include:%s\nalice: alice\n" % (home / "l0"))
    rec = LocalRecipients(aliases=[str(aliases)])
    caplog.set_level(logging.INFO, logger="relaymilter.store.recipients")
    for _ in range(3):
        assert decide(rec, "nobody-here") == LOOKUP_FAILED
        with pytest.raises(StoreUnavailable, match="nested more than 10 deep"):
            rec.lookup(("alice",), "local.test")
    lines = failures(caplog)
    assert len(lines) == 1 and "nested more than 10 deep" in lines[0], lines
    # Ten levels are what sendmail follows: that still works.
    (home / "l9").write_text("someone@example.org\n")
    assert rec.lookup(("alice",), "local.test") == "aliases"


def test_a_huge_included_file_is_not_read_into_memory(tmp_path, settled, caplog):
    """A sparse 16 GiB file a user :include:s is refused at its size: a 451 naming it, nothing read."""
    big = tmp_path / "big.list"
    with open(big, "wb") as f:
        f.truncate(1 << 34)
    rec, line = refused_include(tmp_path, big, caplog)
    assert "%s: too large" % big in line, line
    # A list past the bound is refused the same way.
    lst = tmp_path / "users"
    with open(lst, "wb") as f:
        f.truncate(65 << 20)
    rec = LocalRecipients(lists=[str(lst)])
    assert decide(rec, "nobody-here") == LOOKUP_FAILED
    lst.write_text("alice\n")
    assert rec.lookup(("alice",), "local.test") == "list"


def _own_mount_namespace() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=30).returncode == 0


@pytest.mark.skipif(not _own_mount_namespace(), reason="needs root and mount namespaces (unshare -m)")
def test_nss_that_cannot_answer_is_a_451_not_a_550_for_root(tmp_path):
    """relaymilter-test, in a mount namespace whose /etc has no passwd file: NSS fails, it does not say "no such user"."""
    users = tmp_path / "users"
    users.write_text("alice\n")
    cfg = tmp_path / "relaymilter.yaml"
    cfg.write_text("local_domains: [local.test]\nlocal_recipients: {passwd: true, lists: [%s]}\n" % users)
    tool = shutil.which("relaymilter-test")
    assert tool
    args = ["--lookup", "root@local.test", "--lookup", "alice@local.test", "--lookup", "nobody-here@local.test"]
    healthy = subprocess.run([tool, "-c", str(cfg)] + args, capture_output=True, text=True, timeout=60)
    assert "known (passwd)" in healthy.stdout.splitlines()[0], healthy.stdout
    assert "550 5.1.1" in healthy.stdout.splitlines()[2], healthy.stdout
    script = ('mount -t tmpfs -o mode=755 relaymilter-test /etc && printf "passwd: files\\n" > /etc/nsswitch.conf'
              ' && exec "$0" "$@"')
    down = subprocess.run(["unshare", "-m", "sh", "-c", script, tool, "-c", str(cfg)] + args,
                          capture_output=True, text=True, timeout=60)
    out = down.stdout.splitlines()
    assert down.returncode == 1, (down.stdout, down.stderr)
    assert "451 4.3.0" in out[0] and "rule=recipients_unavailable" in out[0], out     # root: never a 550
    assert "known (list" in out[1], out                                                # another source still answers
    assert "451 4.3.0" in out[2], out                                                  # unknown: never a 550 either
    errors = [line for line in down.stderr.splitlines() if "NSS lookup failed" in line]
    assert len(errors) == 1 and "local recipients passwd" in errors[0], down.stderr


def test_thousands_of_included_files_are_a_451_not_thousands_of_stats_per_rcpt(tmp_path, settled, caplog):
    """Every lookup stats every file a source came from: a user's list of 5,000 empty includes is refused."""
    home = tmp_path / "home"
    home.mkdir()
    for i in range(5000):
        (home / ("f%d" % i)).write_bytes(b"")
    wide = home / "wide.list"
    wide.write_text("".join(":include:%s\n" % (home / ("f%d" % i)) for i in range(5000)))
    rec, line = refused_include(tmp_path, wide, caplog)
    assert "more than 1000 files" in line, line
    wide.write_text("".join(":include:%s\n" % (home / ("f%d" % i)) for i in range(990)))
    assert rec.lookup(("alice",), "local.test") == "aliases"


def test_a_list_rewritten_while_it_is_read_is_not_trusted(tmp_path, settled):
    """`generate > users` finishing while the milter's thread is held up between its read and its stat.

    The reader got the half-written list; the stat then sees the finished one,
    long enough ago to look settled. A user of the finished list must not get
    550 from the half that was read: 451 until the next lookup reads it again.
    """
    users = tmp_path / "users"
    users.write_text("alice\n")                  # the writer is half way: bob is not written yet

    def held_up_reader(path: str):
        table = read_list(path)
        users.write_text("alice\nbob\n")         # the writer finishes meanwhile
        old = time.time() - 5                    # ... long enough ago that the file looks settled
        os.utime(users, (old, old))
        return table

    rec = LocalRecipients()
    rec.sources = (rmod.TextSource("list", str(users), held_up_reader),)
    q = query(Resolved("bob", "local.test"))
    assert check(q, rec.snapshot().lookup).decision == LOOKUP_FAILED     # not 550: the read was half a file
    rec.sources[0]._reader = read_list
    assert rec.lookup(("bob",), "local.test") == "list"
