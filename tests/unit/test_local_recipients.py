"""local_recipients: the source formats, their lookups, change detection, the policy and the config section.

Real files throughout: aliases files and lists on disk, maps built by the real
makemap (both NUL styles) and by Berkeley DB with postmap-style keys, passwd
through NSS.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

import pytest
from berkeleydb import db

from relaymilter import replies
from relaymilter.config import load_config
from relaymilter.errors import ConfigError, StoreUnavailable
from relaymilter.address.resolve import Resolved
from relaymilter.policy.recipients import KNOWN, LOOKUP_FAILED, USER_UNKNOWN, Query, check, query
from relaymilter.store import recipients as rmod
from relaymilter.store.localfiles import SourceError, read_aliases, read_list
from relaymilter.store.recipients import LocalRecipients, TextSource, map_source


@pytest.fixture
def settled(monkeypatch):
    """Files count as settled at once (the racy-time rule has its own tests)."""
    monkeypatch.setattr(rmod, "RACY_NS", 0)


def write(tmp_path: Path, name: str, text: str | bytes) -> str:
    p = tmp_path / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text)
    return str(p)


# --- aliases(5) ----------------------------------------------------------------------------

ALIASES_GOOD = [
    ("plain", "root: admin\n", {"root"}),
    ("case folded", "Staff: a\nMAILER-DAEMON: postmaster\n", {"staff", "mailer-daemon"}),
    ("continuation lines", "staff: alice,\n  bob,\n\tcarol\nnext: x\n", {"staff", "next"}),
    ("comment and blank line inside a continuation", "staff: alice,\n# gone: x\n\n  bob\n", {"staff"}),
    ("indented comment", "  # note\nroot: x\n", {"root"}),
    ("quoted name with blank", '"John Doe": jdoe\n', {"john doe"}),
    ("quoted name with colon and @", '"a:b@c": x\n', {"a:b@c"}),
    ("colon in a quoted value", 'x: "|/usr/bin/prog a:b"\n', {"x"}),
    ("value on the continuation line only", "x:\n  target\n", {"x"}),
    ("blanks around the colon", "name  :  target\n", {"name"}),
    ("CRLF and a BOM", "\ufeffroot: a\r\nadmin: b\r\n", {"root", "admin"}),
    ("no final newline", "root: a", {"root"}),
    ("duplicate names", "root: a\nroot: b\n", {"root"}),
    ("empty file", "", set()),
    ("only comments", "# nothing\n\n", set()),
]


@pytest.mark.parametrize("text,names", [(t, n) for _, t, n in ALIASES_GOOD], ids=[c for c, _, _ in ALIASES_GOOD])
def test_aliases_names(tmp_path, text, names):
    assert set(read_aliases(write(tmp_path, "aliases", text)).names) == names


ALIASES_BAD = [
    ("blank value", "root: a\nnobody:\n", 2, "alias 'nobody' has no value"),
    ("blank value after commas", "x: , ,\n", 1, "alias 'x' has no value"),
    ("missing colon", "root admin\n", 1, "missing colon"),
    ("missing name", ": admin\n", 1, "missing alias name"),
    ("continuation with nothing above", "  stray\nroot: a\n", 1, "continuation line with no entry"),
    ("unterminated quote", '"john: x\n', 1, "unterminated quote"),
    ("text after a quoted name", '"john"x: y\n', 1, "text after the quoted name"),
    ("non-local name", "a@b.example: x\n", 1, "cannot alias non-local names"),
    ("NUL byte", "root: a\nx\0: b\n", 2, "NUL byte"),
    ("not UTF-8", "root: a\n\xff: b\n".encode("latin-1"), 2, "not valid UTF-8"),
    ("relative include", "list: :include:lists/staff\n", 1, ":include: needs an absolute path"),
    ("missing include", "root: a\nlist: :include:/nonexistent/staff\n", 2, "cannot read: No such file"),
]


@pytest.mark.parametrize("text,line,reason", [c[1:] for c in ALIASES_BAD], ids=[c[0] for c in ALIASES_BAD])
def test_aliases_errors_name_file_and_line(tmp_path, text, line, reason):
    path = write(tmp_path, "aliases", text)
    with pytest.raises(SourceError) as err:
        read_aliases(path)
    assert str(err.value).startswith("%s:%d: " % (path, line)), str(err.value)
    assert reason in str(err.value)
    assert path in err.value.files


def test_aliases_includes_followed_and_loops_end(tmp_path):
    inc1, inc2 = tmp_path / "inc1", tmp_path / "inc2"
    inc1.write_text("# members\nalice, bob\n:include:%s\n" % inc2)
    inc2.write_text("carol\n:include:%s\n" % inc1)            # back to inc1: a loop
    path = write(tmp_path, "aliases", "staff: :include:%s\nself: :include:%s\nroot: a\n" % (inc1, inc1))
    table = read_aliases(path)
    assert set(table.names) == {"staff", "self", "root"}
    assert table.files == (path, str(inc1), str(inc2))


def test_aliases_include_problems_name_the_including_line(tmp_path):
    inc = tmp_path / "inc"
    inc.write_text("a\n:include:%s\n" % (tmp_path / "gone"))
    path = write(tmp_path, "aliases", "root: x\nlist: :include:%s\n" % inc)
    with pytest.raises(SourceError) as err:
        read_aliases(path)
    assert str(err.value).startswith("%s:2: %s:2: %s: cannot read" % (path, inc, tmp_path / "gone")) or \
        str(err.value).startswith("%s:2: %s: cannot read" % (inc, tmp_path / "gone")), str(err.value)
    inc.write_text('"open\n')
    with pytest.raises(SourceError, match=r"^%s:1: unterminated quote" % inc):
        read_aliases(path)


def test_aliases_include_of_a_directory_is_an_error(tmp_path):
    (tmp_path / "dir").mkdir()
    path = write(tmp_path, "aliases", "list: :include:%s\n" % (tmp_path / "dir"))
    with pytest.raises(SourceError, match=r"^%s:1: .*cannot read: Is a directory" % path):
        read_aliases(path)


# --- lists ----------------------------------------------------------------------------------

LIST_GOOD = [
    ("users, addresses, catch-all, comments",
     "# staff\nAlice\nbob@Local.Test.  # trailing dot and comment\n@catch.test\n\n",
     ({"alice"}, {"bob@local.test"}, {"catch.test"})),
    ("CRLF", "alice\r\n", ({"alice"}, set(), set())),
    ("empty", "", (set(), set(), set())),
]


@pytest.mark.parametrize("text,want", [c[1:] for c in LIST_GOOD], ids=[c[0] for c in LIST_GOOD])
def test_list_entries(tmp_path, text, want):
    table = read_list(write(tmp_path, "users", text))
    assert (set(table.users), set(table.addresses), set(table.domains)) == want


LIST_BAD = [
    ("two words", "alice\nbob carol\n", 2, "more than one word"),
    ("bad domain", "alice@bad..test\n", 1, "bad domain"),
    ("two @", "a@b@c.test\n", 1, "more than one @"),
    ("control character", "alice\x07\n", 1, "control character 0x07"),
    ("NUL", "alice\0\n", 1, "NUL byte"),
]


@pytest.mark.parametrize("text,line,reason", [c[1:] for c in LIST_BAD], ids=[c[0] for c in LIST_BAD])
def test_list_errors_name_file_and_line(tmp_path, text, line, reason):
    path = write(tmp_path, "users", text)
    with pytest.raises(SourceError) as err:
        read_list(path)
    assert str(err.value).startswith("%s:%d: " % (path, line)) and reason in str(err.value), str(err.value)


# --- the policy: lookup keys and decisions --------------------------------------------------

QUERIES = [
    ("plain", Resolved("Alice", "local.test"), "", Query(("alice",), "local.test")),
    ("quoted", Resolved('"John Doe"', "local.test"), "", Query(("john doe",), "local.test")),
    ("delimiter", Resolved("alice+tag", "local.test"), "+", Query(("alice+tag", "alice"), "local.test")),
    ("no delimiter configured", Resolved("alice+tag", "local.test"), "", Query(("alice+tag",), "local.test")),
    ("two delimiters, first wins", Resolved("a-b+c", "l.test"), "+-", Query(("a-b+c", "a"), "l.test")),
    ("leading delimiter kept", Resolved("+alice", "l.test"), "+", Query(("+alice",), "l.test")),
    ("unqualified", Resolved("alice", None), "", Query(("alice",), None)),
    ("postmaster", Resolved("Postmaster", "local.test"), "", None),
    ("MAILER-DAEMON", Resolved("MAILER-DAEMON", "local.test"), "", None),
    ("postmaster+tag", Resolved("postmaster+x", "local.test"), "+", None),
]


@pytest.mark.parametrize("resolved,delim,want", [c[1:] for c in QUERIES], ids=[c[0] for c in QUERIES])
def test_query_keys(resolved, delim, want):
    assert query(resolved, delim) == want


def _raise(*args):
    raise StoreUnavailable("x: cannot read")


CHECKS = [
    ("known", Query(("alice",), "l.test"), lambda locals_, dom: "aliases", KNOWN, "aliases"),
    ("unknown", Query(("nobody",), "l.test"), lambda locals_, dom: None, USER_UNKNOWN, None),
    ("unreadable", Query(("alice",), "l.test"), _raise, LOOKUP_FAILED, None),
    ("always known, never looked up", None, _raise, KNOWN, "postmaster"),
]


@pytest.mark.parametrize("q,lookup,decision,source", [c[1:] for c in CHECKS], ids=[c[0] for c in CHECKS])
def test_check_decisions(q, lookup, decision, source):
    got = check(q, lookup)
    assert (got.decision, got.source) == (decision, source)


def test_replies_are_the_contract():
    assert str(USER_UNKNOWN.reply) == "550 5.1.1 User unknown" and USER_UNKNOWN.rule == "unknown_recipient"
    assert str(LOOKUP_FAILED.reply) == "451 4.3.0 Temporary lookup failure"
    assert USER_UNKNOWN.reply is replies.USER_UNKNOWN and LOOKUP_FAILED.reply is replies.RECIPIENT_LOOKUP_FAILED


# --- maps -----------------------------------------------------------------------------------

def makemap(tmp_path: Path, name: str, lines: str, nul: bool = False) -> str:
    base = tmp_path / name
    argv = ["makemap"] + (["-N"] if nul else []) + ["hash", str(base)]
    subprocess.run(argv, input=lines, text=True, check=True, capture_output=True, timeout=60)
    return str(base) + ".db"


def postmap_style(tmp_path: Path, name: str, entries: dict[str, str]) -> str:
    path = str(tmp_path / name)
    handle = db.DB()
    handle.open(path, dbtype=db.DB_HASH, flags=db.DB_CREATE)
    for k, v in entries.items():
        handle.put(k.encode() + b"\0", v.encode() + b"\0")
    handle.close()
    return path


MAP_LINES = "alice@local.test alice\nbob bob\n@catch.test catchall\nghost@catch.test error:nouser User unknown\n"
MAP_CASES = [
    ("user@domain", ("alice",), "local.test", True),
    ("user@domain at another domain", ("alice",), "other.test", False),
    ("bare user at any domain", ("bob",), "other.test", True),
    ("bare user, unqualified", ("bob",), None, True),
    ("catch-all", ("anyone",), "catch.test", True),
    ("error: value refuses", ("ghost",), "catch.test", False),
    ("unknown", ("carol",), "local.test", False),
    ("base after the delimiter", ("alice+tag", "alice"), "local.test", True),
]


@pytest.mark.parametrize("style", ["makemap", "makemap -N", "postmap"])
@pytest.mark.parametrize("locals_,domain,want", [c[1:] for c in MAP_CASES], ids=[c[0] for c in MAP_CASES])
def test_map_lookups_in_either_nul_style(tmp_path, settled, style, locals_, domain, want):
    if style == "postmap":
        entries = dict(line.split(None, 1) for line in MAP_LINES.splitlines())
        path = postmap_style(tmp_path, "virt.db", entries)
    else:
        path = makemap(tmp_path, "virt", MAP_LINES, nul=style.endswith("-N"))
    source = map_source(path)
    assert source.knows(locals_, domain) is want
    assert source.knows(locals_, domain) is want        # again, from the table read once


def test_map_change_seen_at_the_next_lookup(tmp_path, settled):
    path = makemap(tmp_path, "virt", "alice alice\n")
    source = map_source(path)
    assert source.knows(("alice",), "l.test") and not source.knows(("bob",), "l.test")
    makemap(tmp_path, "virt", "bob bob\n")                # makemap rewrites in place
    assert source.knows(("bob",), "l.test") and not source.knows(("alice",), "l.test")
    new = makemap(tmp_path, "new", "carol carol\n")
    os.rename(new, path)                                  # postmap-like replacement by rename
    assert source.knows(("carol",), "l.test") and not source.knows(("bob",), "l.test")


def test_map_unreadable_or_gone_is_unavailable(tmp_path, settled):
    path = makemap(tmp_path, "virt", "alice alice\n")
    source = map_source(path)
    assert source.knows(("alice",), "l.test")
    good = Path(path).read_bytes()
    Path(path).write_bytes(b"not a database at all" * 300)
    with pytest.raises(StoreUnavailable, match="not a hash database"):
        source.knows(("alice",), "l.test")
    os.unlink(path)
    with pytest.raises(StoreUnavailable, match="No such file"):
        source.knows(("alice",), "l.test")
    os.mkdir(path)
    with pytest.raises(StoreUnavailable, match="(?i)is a directory"):
        source.knows(("alice",), "l.test")
    os.rmdir(path)
    os.mkfifo(path)
    with pytest.raises(StoreUnavailable, match="(?i)is a FIFO"):
        source.knows(("alice",), "l.test")
    os.unlink(path)
    Path(path).write_bytes(good)
    assert source.knows(("alice",), "l.test")


# --- text sources: change detection and failures --------------------------------------------

def test_list_edit_seen_at_the_next_lookup(tmp_path, settled):
    path = write(tmp_path, "users", "alice\n")
    rec = LocalRecipients(lists=[path])
    assert rec.lookup(("alice",), "l.test") == "list" and rec.lookup(("bob",), "l.test") is None
    Path(path).write_text("bob\n")
    assert rec.lookup(("bob",), "l.test") == "list" and rec.lookup(("alice",), "l.test") is None


def test_aliases_include_edit_seen_at_the_next_lookup(tmp_path, settled):
    inc = tmp_path / "inc"
    inc.write_text("a\n")
    path = write(tmp_path, "aliases", "list: :include:%s\n" % inc)
    rec = LocalRecipients(aliases=[path])
    assert rec.lookup(("list",), None) == "aliases"
    inc.write_text("a\n:include:/nonexistent\n")          # the included file breaks
    with pytest.raises(StoreUnavailable, match="/nonexistent: cannot read"):
        rec.lookup(("list",), None)
    inc.write_text("a\n")
    assert rec.lookup(("list",), None) == "aliases"


@pytest.mark.parametrize("breakage", ["directory", "syntax", "deleted", "fifo"])
def test_broken_text_source_is_unavailable_until_fixed(tmp_path, settled, breakage):
    path = write(tmp_path, "users", "alice\n")
    rec = LocalRecipients(lists=[path])
    assert rec.lookup(("alice",), None) == "list"
    os.unlink(path)
    if breakage == "directory":
        os.mkdir(path)
    elif breakage == "fifo":
        os.mkfifo(path)             # opening it must not wait for a writer
    elif breakage == "syntax":
        Path(path).write_text("alice bob\n")
    with pytest.raises(StoreUnavailable):
        rec.lookup(("alice",), None)
    if breakage == "directory":
        os.rmdir(path)
    elif breakage == "fifo":
        os.unlink(path)
    Path(path).write_text("alice\n")
    assert rec.lookup(("alice",), None) == "list"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads through chmod 000")
def test_chmod_000_is_unavailable(tmp_path, settled):
    path = write(tmp_path, "users", "alice\n")
    rec = LocalRecipients(lists=[path])
    assert rec.lookup(("alice",), None) == "list"
    os.chmod(path, 0)
    Path(path).touch()
    with pytest.raises(StoreUnavailable, match="Permission denied"):
        rec.lookup(("alice",), None)


def test_known_by_one_source_wins_over_a_broken_other(tmp_path, settled):
    good = write(tmp_path, "users", "alice\n")
    bad = write(tmp_path, "aliases", "root: a\n")
    rec = LocalRecipients(aliases=[bad], lists=[good])
    Path(bad).write_text("broken\n")
    assert rec.lookup(("alice",), None) == "list"         # known: 250 even though aliases is broken
    with pytest.raises(StoreUnavailable):
        rec.lookup(("nobody",), None)                    # unknown to what can be read: 451, not 550


def test_a_miss_from_a_file_changed_a_moment_ago_is_not_trusted(tmp_path):
    path = write(tmp_path, "users", "alice\n")
    rec = LocalRecipients(lists=[path])
    assert rec.lookup(("alice",), None) == "list"         # a hit is a hit
    with pytest.raises(StoreUnavailable, match="changed a moment ago"):
        rec.lookup(("nobody",), None)
    old = rmod.time.time_ns() - 10 * rmod.RACY_NS
    os.utime(path, ns=(old, old))
    # ctime is still recent: the file is not settled until RACY_NS has passed
    deadline = rmod.time.monotonic() + 5
    while True:
        try:
            assert rec.lookup(("nobody",), None) is None
            break
        except StoreUnavailable:
            assert rmod.time.monotonic() < deadline
            rmod.time.sleep(0.02)


def test_passwd_through_nss():
    someone = pwd.getpwuid(0).pw_name
    rec = LocalRecipients(passwd=True)
    assert rec.lookup((someone,), "l.test") == "passwd"
    assert rec.lookup((someone.upper(),), "l.test") is None or someone.upper() == someone
    assert rec.lookup(("no-such-user-here",), "l.test") is None
    assert rec.lookup(("nul\0name",), "l.test") is None


def test_sources_asked_in_order(tmp_path, settled):
    lst = write(tmp_path, "users", "root\nalice\n")
    ali = write(tmp_path, "aliases", "alice: root\n")
    mp = makemap(tmp_path, "virt", "alice a\ncarol c\n")
    rec = LocalRecipients(passwd=True, aliases=[ali], lists=[lst], maps=[mp])
    assert [rec.lookup((u,), "l.test") for u in ("root", "alice", "carol", "dave")] == [
        "passwd", "aliases", "map", None]


def test_tables_are_not_walked_by_the_garbage_collector(tmp_path, settled):
    import gc
    rec = LocalRecipients(aliases=[write(tmp_path, "aliases", "a: b\n")], lists=[write(tmp_path, "users", "u\n")],
                          maps=[makemap(tmp_path, "virt", "k v\n")])
    snap = rec.snapshot()
    for _, table in snap.entries:
        for name in ("names", "users", "addresses", "domains", "known", "refused"):
            if hasattr(table, name):
                assert not gc.is_tracked(getattr(table, name)), name


def test_one_hundred_thousand_entries_are_lookups_not_scans(tmp_path, settled):
    lst = write(tmp_path, "users", "".join("user%d\n" % i for i in range(100_000)))
    rec = LocalRecipients(lists=[lst])
    assert rec.lookup(("user99999",), "l.test") == "list" and rec.lookup(("user100000",), "l.test") is None
    table = rec.sources[0].table()
    assert isinstance(rec.sources[0], TextSource) and len(table.users) == 100_000


# --- the configuration section --------------------------------------------------------------

def config(tmp_path: Path, section: str) -> str:
    return write(tmp_path, "c.yaml", "local_domains: [local.test]\nadd_host_names: false\n" + section)


def test_section_absent_or_sourceless_is_off(tmp_path):
    assert not load_config(config(tmp_path, "")).local_recipients.enabled
    c = load_config(config(tmp_path, "local_recipients:\n  recipient_delimiter: '+'\n"))
    assert not c.local_recipients.enabled and c.local_recipients.recipient_delimiter == "+"


def test_section_loads(tmp_path):
    ali = write(tmp_path, "aliases", "root: a\n")
    lst = write(tmp_path, "users", "alice\n")
    mp = makemap(tmp_path, "virt", "alice a\n")
    c = load_config(config(tmp_path, "local_recipients:\n  passwd: true\n  aliases: [%s]\n  lists: %s\n"
                           "  maps: [%s]\n  recipient_delimiter: '+-'\n" % (ali, lst, mp)))
    lr = c.local_recipients
    assert lr.enabled and lr.passwd and lr.aliases == (ali,) and lr.lists == (lst,) and lr.maps == (mp,)
    assert lr.recipient_delimiter == "+-"


CONFIG_BAD = [
    ("missing aliases file", "  aliases:\n    - {tmp}/aliases\n    - /nonexistent/aliases\n", 6,
     "local_recipients.aliases: /nonexistent/aliases: No such file or directory"),
    ("missing list", "  lists: [/nonexistent/users]\n", 4, "local_recipients.lists: /nonexistent/users: No such file"),
    ("missing map", "  maps: [/nonexistent/virt.db]\n", 4, "local_recipients.maps: /nonexistent/virt.db: No such file"),
    ("map that is not a hash file", "  maps: [{tmp}/aliases]\n", 4, "not a Berkeley DB hash file"),
    ("directory as a list", "  lists: [{tmp}]\n", 4, "not a regular file"),
    ("unknown key", "  password: true\n", 4, "unknown local_recipients key 'password'"),
    ("passwd not a bool", "  passwd: yes please\n", 4, "local_recipients.passwd: must be true or false"),
    ("bad delimiter", "  recipient_delimiter: '@'\n", 4, "recipient_delimiter: must be"),
    ("section not a mapping", "  - passwd\n", 4, "must be a mapping"),
]


@pytest.mark.parametrize("section,line,reason", [c[1:] for c in CONFIG_BAD], ids=[c[0] for c in CONFIG_BAD])
def test_config_errors_name_file_and_line(tmp_path, section, line, reason):
    write(tmp_path, "aliases", "root: a\n")
    path = config(tmp_path, "local_recipients:\n" + section.format(tmp=tmp_path))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith("%s:%d: " % (path, line)), str(err.value)
    assert reason in str(err.value), str(err.value)


def test_config_error_in_a_source_names_the_source_line(tmp_path):
    ali = write(tmp_path, "aliases", "root: a\n\nbroken line\n")
    with pytest.raises(ConfigError, match=r"^%s:3: missing colon" % ali):
        load_config(config(tmp_path, "local_recipients:\n  aliases: [%s]\n" % ali))


def test_makemap_is_installed():
    assert shutil.which("makemap"), "makemap is missing: packaging/scripts/deps.sh --test installs sendmail-bin"


def test_snapshot_answers_as_find_does_without_file_io(tmp_path, settled):
    lst = write(tmp_path, "users", "alice\n")
    ali = write(tmp_path, "aliases", "staff: a\n")
    rec = LocalRecipients(passwd=True, aliases=[ali], lists=[lst])
    snap = rec.snapshot()
    root = pwd.getpwuid(0).pw_name
    for user in ("alice", "staff", root, "nobody-such"):
        assert snap.lookup((user,), "l.test") == rec.lookup((user,), "l.test")
    Path(lst).write_text("bob\n")
    assert snap.lookup(("alice",), "l.test") == "list" and snap.lookup(("bob",), "l.test") is None
    fresh = rec.snapshot()
    assert fresh.lookup(("bob",), "l.test") == "list" and fresh.lookup(("alice",), "l.test") is None
    os.unlink(lst)
    broken = rec.snapshot()
    assert broken.lookup(("staff",), "l.test") == "aliases"         # known elsewhere
    with pytest.raises(StoreUnavailable, match="cannot read"):
        broken.lookup(("bob",), "l.test")


def test_snapshot_of_a_file_changed_a_moment_ago_does_not_refuse(tmp_path):
    rec = LocalRecipients(lists=[write(tmp_path, "users", "alice\n")])
    snap = rec.snapshot()
    assert snap.lookup(("alice",), None) == "list"
    with pytest.raises(StoreUnavailable, match="changed a moment ago"):
        snap.lookup(("nobody",), None)


def test_check_config_names_the_sources(tmp_path, capsys):
    from relaymilter.cli.milter import main as milter_main

    ali = write(tmp_path, "aliases", "root: a\n")
    mp = makemap(tmp_path, "virt", "a b\n")
    path = config(tmp_path, "local_recipients:\n  passwd: true\n  aliases: [%s]\n  maps: [%s, %s]\n" % (ali, mp, mp))
    assert milter_main(["-c", path, "--check-config"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("local recipients from passwd, 1 aliases, 2 maps")
    Path(ali).write_text("broken\n")
    assert milter_main(["-c", path, "--check-config"]) == 2
    assert "%s:1: missing colon" % ali in capsys.readouterr().err
