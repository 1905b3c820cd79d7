"""Scenario files: strict loading with FILE:LINE errors, expectations, the pass/fail report,
and the shipped rules/scenarios files."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "data"))

from harness_fakemilter import FakeMilter, pkt, serve  # noqa: E402

from relaymilter.harness import ScenarioError, load_scenarios, run_file  # noqa: E402
from relaymilter.harness.scenario import format_outcome  # noqa: E402

# Every wait in these tests is bounded; this only stops a regression from hanging the suite.
pytestmark = pytest.mark.timeout(60)

TOP = Path(__file__).resolve().parents[2]
SHIPPED = TOP / "rules" / "scenarios" / "default.yaml"
SHIPPED_CONFIG = TOP / "rules" / "scenarios" / "default-config.yaml"

GOOD = """\
socket: inet:1@127.0.0.1
sessions:
  - name: remote refused, local accepted
    client: 192.0.2.10
    helo: client.example
    from: <alice@example.net>
    expect: {connect: continue, mail: continue}
    rcpts:
      - <bob@remote.example>: 550 5.7.1 Relaying denied
      - <carol@example.com>: "regex: ^cont"
      - <dave@example.com>: {regex: "inue$"}
      - <unchecked@example.com>
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "s.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def deny_remote(cmd, data):
    if cmd == b"R" and b"remote" in data:
        return pkt(b"y", b"550 5.7.1 Relaying denied\0")
    return pkt(b"c")


def test_good_file_loads(tmp_path) -> None:
    sf = load_scenarios(write(tmp_path, GOOD))
    assert sf.socket == "inet:1@127.0.0.1" and sf.timeout is None
    (sc,) = sf.scenarios
    assert sc.name == "remote refused, local accepted" and sc.where.endswith("s.yaml:3")
    assert sc.spec.rcpts == ("<bob@remote.example>", "<carol@example.com>", "<dave@example.com>",
                             "<unchecked@example.com>")
    e = sc.rcpt_expect
    assert (e[0].text, e[0].is_regex, e[1].text, e[1].is_regex, e[2].text, e[3]) == (
        "550 5.7.1 Relaying denied", False, "^cont", True, "inue$", None)
    assert e[0].where.endswith("s.yaml:9")


def test_run_and_report_pass(tmp_path) -> None:
    sf = load_scenarios(write(tmp_path, GOOD))
    with FakeMilter(lambda c: serve(c, deny_remote)) as fake:
        (outcome,) = run_file(sf, socket_spec=fake.spec, timeout=2)
    assert outcome.passed
    lines = format_outcome(outcome)
    assert lines[0].startswith("PASS ") and lines[0].endswith("s.yaml:3 remote refused, local accepted")
    assert "  ok   RCPT <bob@remote.example>: 550 5.7.1 Relaying denied" in lines
    assert "  -    RCPT <unchecked@example.com>: continue" in lines
    assert "  -    HELO client.example: continue" in lines


def test_run_and_report_fail_shows_expected_and_got(tmp_path) -> None:
    sf = load_scenarios(write(tmp_path, GOOD))
    with FakeMilter(lambda c: serve(c)) as fake:   # an open relay: continues everything
        (outcome,) = run_file(sf, socket_spec=fake.spec, timeout=2)
    assert not outcome.passed
    lines = format_outcome(outcome)
    assert lines[0].startswith("FAIL ")
    fail = [line for line in lines if line.startswith("  FAIL ")]
    assert len(fail) == 1
    assert fail[0].startswith("  FAIL RCPT <bob@remote.example>: expected 550 5.7.1 Relaying denied (")
    assert fail[0].endswith("s.yaml:9), got continue")


def test_protocol_error_fails_the_session_with_its_step(tmp_path) -> None:
    sf = load_scenarios(write(tmp_path, GOOD))
    with FakeMilter(lambda c: serve(c, lambda cmd, d: pkt(b"Z") if cmd == b"R" else pkt(b"c"))) as fake:
        (outcome,) = run_file(sf, socket_spec=fake.spec, timeout=1)
    assert not outcome.passed
    assert format_outcome(outcome)[-1] == (
        "  ERROR RCPT <bob@remote.example>: protocol error: unknown response byte 'Z'")


def test_not_sent_can_be_expected(tmp_path) -> None:
    path = write(tmp_path, """\
        sessions:
          - name: sender refused
            client: 192.0.2.10
            from: <spammer@x.example>
            expect: {mail: 550 5.7.1 Access denied}
            rcpts: [{<bob@example.com>: not sent}]
    """)
    with FakeMilter(lambda c: serve(c, lambda cmd, d: pkt(b"y", b"550 5.7.1 Access denied\0")
                                     if cmd == b"M" else pkt(b"c"))) as fake:
        (outcome,) = run_file(load_scenarios(path), socket_spec=fake.spec, timeout=2)
    assert outcome.passed, format_outcome(outcome)


def test_socket_from_file_or_missing(tmp_path) -> None:
    text = GOOD.replace("socket: inet:1@127.0.0.1\n", "")
    sf = load_scenarios(write(tmp_path, text))
    with pytest.raises(ScenarioError, match="no socket"):
        run_file(sf)


@pytest.mark.parametrize("text, line, message", [
    ("sessions: []\nbogus: 1\n", 2, "unknown key 'bogus'"),
    ("sessions: []\n", 1, "no sessions"),
    ("socket: x\n", 1, "missing key 'sessions'"),
    ("sessions:\n  - name: a\n    client: 192.0.2.1\n    from: <a@b>\n", 2, "missing key 'rcpts'"),
    ("sessions:\n  - name: a\n    client: 300.1.1.1\n    from: <a@b>\n    rcpts: [<b@c>]\n", 3, "client"),
    ("sessions:\n  - name: a\n    client: 192.0.2.1\n    from: <a@b>\n    rcpts: [<b@c>]\n    colour: red\n",
     6, "unknown key 'colour' in a session"),
    ("sessions:\n  - name: a\n    client: 192.0.2.1\n    from: <a@b>\n    rcpts:\n      - <b@c>: 'regex: ('\n",
     6, "bad regular expression"),
    ("sessions:\n  - name: a\n    client: 192.0.2.1\n    from: <a@b>\n    rcpts: <b@c>\n", 5, "must be a list"),
    ("sessions:\n  - name: a\n    client: 192.0.2.1\n    from: <a@b>\n    rcpts: []\n", 5, "at least one"),
    ("sessions:\n  - name: a\n    client: 192.0.2.1\n    from: <a@b>\n    rcpts: [<b@c>]\n"
     "    expect: {helo: continue}\n", 6, "sends no HELO"),
    ("sessions:\n  - name: a\n    client: 192.0.2.1\n    from: <a@b>\n    rcpts: [<b@c>]\n"
     "    expect: {eom: continue}\n", 6, "no headers or body"),
    ("sessions:\n  - name: a\n    client: 192.0.2.1\n    from: <a@b>\n    rcpts: [<b@c>]\n"
     "    expect: {rcpt: continue}\n", 6, "unknown key 'rcpt' in expect"),
    ("sessions:\n  - name: a\n    client: 192.0.2.1\n    from: <a@b>\n    rcpts: [<b@c>]\n"
     "    headers: [Subject hi]\n", 6, "Name: value"),
    ("sessions:\n  - name: a\n    client: 192.0.2.1\n    from: <a@b>\n    rcpts: [<b@c>]\n"
     "  - name: a\n    client: 192.0.2.1\n    from: <a@b>\n    rcpts: [<b@c>]\n", 6, "duplicate session name"),
    ("sessions:\n  - name: a\n    client: 192.0.2.1\n    from:\n    rcpts: [<b@c>]\n", 4, "from must be a string"),
    ("timeout: soon\nsessions: []\n", 1, "timeout must be a number"),
    ("sessions:\n  - name: [a\n", 3, "YAML syntax error"),
    ("", 1, "empty scenario file"),
])
def test_errors_name_file_and_line(tmp_path, text, line, message) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ScenarioError) as info:
        load_scenarios(path)
    assert str(info.value).startswith("%s:%d: " % (path, line)), str(info.value)
    assert message in str(info.value)


def test_unreadable_file(tmp_path) -> None:
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenarios(str(tmp_path / "missing.yaml"))


# ------------------------------------------------------------ the shipped files


def test_shipped_scenarios_load_and_cover_the_default_rule_set() -> None:
    sf = load_scenarios(str(SHIPPED))
    assert sf.socket == "inet:8894@127.0.0.1"
    expected = {}
    for sc in sf.scenarios:
        for rcpt, exp in zip(sc.spec.rcpts, sc.rcpt_expect):
            assert exp is not None, "every shipped recipient has an expectation: %s" % rcpt
            expected.setdefault((sc.spec.client, sc.spec.auth, rcpt), str(exp))
    denied = "550 5.7.1 Relaying denied"
    unknown = [(k[2], v) for k, v in expected.items() if k[0].startswith("192.0.2.") and not k[1]]
    refused = {r for r, v in unknown if v == denied}
    accepted = {r for r, v in unknown if v == "continue"}
    # remote, trailing dot, percent hack, bang path, source route, quoted, literal: refused
    for form in ("<bob@remote.example>", "<bob@remote.example.>", "<user%remote.example@example.com>",
                 "<remote.example!user@example.com>", "<@example.com:user@remote.example>",
                 '<"user@remote.example"@example.com>', "<user@[192.0.2.1]>"):
        assert form in refused, form
    # local in any case, trailing dot, postmaster; relay domain and subdomain: accepted
    for form in ("<user@example.com>", "<user@EXAMPLE.COM>", "<user@example.com.>", "<postmaster>",
                 "<user@relayed.example>", "<user@sub.relayed.example>"):
        assert form in accepted, form
    clients = {(sc.spec.client, sc.spec.auth): sc for sc in sf.scenarios}
    assert expected[("127.0.0.1", None, "<bob@remote.example>")] == "continue"
    assert expected[("::1", None, "<bob@remote.example>")] == "continue"
    assert expected[("192.0.2.20", "alice", "<bob@remote.example>")] == "continue"
    local_sender = [sc for (c, a), sc in clients.items() if sc.spec.mail_from.endswith("@example.com>") and not a]
    assert any(dict(zip(sc.spec.rcpts, map(str, sc.rcpt_expect))).get("<bob@remote.example>") == denied
               for sc in local_sender), "a local MAIL FROM must not grant relay"


def test_shipped_config_is_accepted_by_relaymilter() -> None:
    from relaymilter.config import load_config

    config = load_config(str(SHIPPED_CONFIG))
    assert "example.com" in config.local_domains
    assert "relayed.example" in config.relay_domains
    assert config.permit_authenticated is True
