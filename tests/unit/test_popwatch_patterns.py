"""The shipped log patterns on realistic lines, and the strict pattern-file checks.

tests/data/logs/SERVER.log holds real-shaped lines of one server (successes,
failures, look-alikes); SERVER.expect lists, by line number, the events they
must give. A line not listed must give nothing.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest

from relaymilter.errors import ConfigError
from relaymilter.popwatch.matcher import Matcher
from relaymilter.popwatch.patterns import PatternSet, load_patterns

LOGS = Path(__file__).resolve().parent.parent / "data" / "logs"
SERVERS = sorted(p.stem for p in LOGS.glob("*.log"))
NOW = time.mktime((2024, 11, 22, 12, 0, 0, 0, 0, -1))


def expected(server: str) -> list[tuple[int, str, str, str]]:
    out = []
    for raw in (LOGS / (server + ".expect")).read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            no, kind, pattern, what = line.split()
            out.append((int(no), kind, pattern, what))
    return out


def describe(ev) -> tuple[str, str, str]:
    what = ev.ip if ev.ip is not None else "session:%s" % ev.session
    if ev.kind == "logout" and ev.session is not None:
        what = "session:%s" % ev.session
    return ev.kind, ev.pattern, what


def line_by_line(matcher: Matcher, path: Path) -> list[tuple[int, str, str, str]]:
    got = []
    for no, line in enumerate(path.read_bytes().splitlines(), 1):
        for ev in matcher.scan(line + b"\n", NOW):
            got.append((no,) + describe(ev))
    return got


@pytest.fixture(scope="module")
def shipped() -> PatternSet:
    return load_patterns()


def test_every_server_has_samples_and_expectations(shipped: PatternSet) -> None:
    for server in SERVERS:
        assert (LOGS / (server + ".expect")).exists(), server
    covered = {e[2] for s in SERVERS for e in expected(s)}
    assert covered == set(shipped.names), "patterns without sample lines: %s" % (set(shipped.names) - covered)


@pytest.mark.parametrize("server", SERVERS)
def test_samples_line_by_line(shipped: PatternSet, server: str) -> None:
    assert line_by_line(Matcher(shipped), LOGS / (server + ".log")) == expected(server)


@pytest.mark.parametrize("server", SERVERS)
def test_whole_file_in_one_block_gives_the_same_events(shipped: PatternSet, server: str) -> None:
    data = (LOGS / (server + ".log")).read_bytes()
    events = [describe(ev) for ev in Matcher(shipped).scan(data, NOW)]
    assert events == [e[1:] for e in expected(server)]


@pytest.mark.parametrize("server", SERVERS)
def test_prefilters_hide_no_match(shipped: PatternSet, server: str) -> None:
    """The regexes alone (no prefilter) find exactly what the prefiltered matcher finds."""
    bare = PatternSet(shipped.source, tuple(
        dataclasses.replace(p, rules=tuple(dataclasses.replace(r, prefilters=()) for r in p.rules))
        for p in shipped.patterns))
    path = LOGS / (server + ".log")
    assert line_by_line(Matcher(bare), path) == line_by_line(Matcher(shipped), path)


def test_all_servers_mixed_in_one_log(shipped: PatternSet) -> None:
    data = b"".join((LOGS / (s + ".log")).read_bytes() for s in SERVERS)
    got = [describe(ev) for ev in Matcher(shipped).scan(data, NOW)]
    assert got == [e[1:] for s in SERVERS for e in expected(s)]


def test_line_timestamps(shipped: PatternSet) -> None:
    m = Matcher(shipped)
    syslog, dovecot_iso, rfc3339 = m.scan(
        b"Nov 21 18:14:14 mail dovecot: pop3-login: Login: user=<a>, method=PLAIN, rip=192.0.2.1, lip=192.0.2.2\n"
        b"2024-11-21 18:14:26.5 imap-login: Info: Login: user=<a>, method=PLAIN, rip=192.0.2.3, lip=192.0.2.2\n"
        b"2024-11-21T18:14:27+01:00 mail dovecot: pop3-login: Login: user=<a>, method=PLAIN, rip=192.0.2.4, "
        b"lip=192.0.2.2\n", NOW)
    assert syslog.ts == time.mktime((2024, 11, 21, 18, 14, 14, 0, 0, -1))
    assert dovecot_iso.ts == time.mktime((2024, 11, 21, 18, 14, 26, 0, 0, -1)) + 0.5
    assert rfc3339.ts == 1732209267.0


def test_binary_garbage_and_non_utf8_are_counted(shipped: PatternSet) -> None:
    m = Matcher(shipped)
    events = m.scan(
        b"\x00\x01\xffpop3-login: Login: user=<\x00\x00 rip=1.2.3.4\n"
        b"Nov 21 18:14:14 mail dovecot: pop3-login: Login: user=<j\xf6rg>, method=PLAIN, rip=192.0.2.5, "
        b"lip=192.0.2.2\n"
        b"\x00\x00\x00Nov 21 18:14:15 mail dovecot: pop3-login: Login: user=<a>, method=PLAIN, rip=192.0.2.6, "
        b"lip=192.0.2.2\n", NOW)
    assert [(e.ip, e.user) for e in events] == [("192.0.2.5", "j\ufffdrg"), ("192.0.2.6", "a")]
    assert m.stats["binary"] == 1
    assert m.stats["nonutf8"] == 1


# -- the pattern file is checked strictly ------------------------------------------


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "pat.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


GOOD = """\
patterns:
  - name: mine
    server: a test server
    prefilter: "ok "
    regex: '\\S+ mine\\[\\d+\\]: ok (?P<ip>\\S+)'
"""


def test_a_good_file_loads(tmp_path: Path) -> None:
    ps = load_patterns(write(tmp_path, GOOD))
    assert ps.names == ("mine",)
    [ev] = Matcher(ps).scan(b"Nov 21 18:14:14 host mine[1]: ok 192.0.2.9\n", NOW)
    assert ev.ip == "192.0.2.9"


@pytest.mark.parametrize("text, line, message", [
    (GOOD.replace("    server:", "    sevrer:"), 3, "unknown pattern key 'sevrer'"),
    (GOOD.replace("(?P<ip>", "(?P<addr>"), 5, "unknown named group addr"),
    (GOOD.replace("(?P<ip>\\S+)", "(\\S+)"), 5, "needs a named group (?P<ip>...)"),
    (GOOD.replace("ok (?P<ip>", "ok ((?P<ip>"), 5, "bad login regex"),
    (GOOD.replace('prefilter: "ok "', 'prefilter: ""'), 4, "prefilter"),
    (GOOD + GOOD.replace("patterns:\n", ""), 6, "duplicate pattern name 'mine'"),
    (GOOD.replace("name: mine", "name: Mine Pattern"), 2, "want a short lowercase word"),
    ("patterns: []\n", 1, "non-empty list"),
    ("pattern:\n  - name: x\n", 1, "unknown key 'pattern'"),
    (GOOD + "    pending: {regex: '(?P<pid>\\\\d+) (?P<ip>\\\\S+)'}\n", 2, "pending and confirm go together"),
    (GOOD + "    logout:\n      - regex: 'bye (?P<session>\\\\S+)'\n", 7, "no session group"),
    (GOOD + "    logout:\n      - regex: 'bye (?P<pid>\\\\d+)'\n", 7, "needs a named group (?P<ip>...) or (?P<session>...)"),
])
def test_mistakes_are_refused_with_file_and_line(tmp_path: Path, text: str, line: int, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_patterns(path)
    assert str(err.value).startswith("%s:%d: " % (path, line)), str(err.value)
    assert message in str(err.value)


def test_selecting_unknown_names_is_refused(shipped: PatternSet) -> None:
    with pytest.raises(ConfigError, match="unknown pattern dovecto"):
        shipped.select(["dovecto"])
    assert shipped.select(["cyrus", "dovecot"]).names == ("dovecot", "cyrus")
