"""relaymilter-test: output lines and exit codes (main([...]) and the installed script)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "data"))

from harness_fakemilter import FakeMilter, pkt, serve  # noqa: E402

from relaymilter.cli.harness import main, parse_message  # noqa: E402

# Every wait in these tests is bounded; this only stops a regression from hanging the suite.
pytestmark = pytest.mark.timeout(120)


def deny_remote(cmd, data):
    if cmd == b"R" and b"remote" in data:
        return pkt(b"y", b"550 5.7.1 Relaying denied\0")
    return pkt(b"c")


def session_args(spec: str, *extra: str) -> list:
    return ["--socket", spec, "--client", "127.0.0.5", "--helo", "client.example",
            "--from", "<alice@example.com>", "--rcpt", "<bob@remote.example>", "--rcpt", "carol@example.com",
            *extra]


def test_session_prints_one_line_per_step(capsys) -> None:
    with FakeMilter(lambda c: serve(c, deny_remote)) as fake:
        assert main(session_args(fake.spec, "--auth", "alice", "--timeout", "2")) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        "CONNECT 127.0.0.5: continue",
        "HELO client.example: continue",
        "MAIL <alice@example.com>: continue",
        "RCPT <bob@remote.example>: 550 5.7.1 Relaying denied",
        "RCPT <carol@example.com>: continue",
    ]
    assert err == ""


def test_any_answer_is_exit_zero(capsys) -> None:
    with FakeMilter(lambda c: serve(c, lambda cmd, d: pkt(b"r") if cmd == b"C" else pkt(b"c"))) as fake:
        assert main(session_args(fake.spec)) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "CONNECT 127.0.0.5: reject"
    assert out[1] == "HELO client.example: not sent (CONNECT got reject)"


def test_message_file_runs_the_data_phase(tmp_path, capsys) -> None:
    msg = tmp_path / "m.eml"
    msg.write_bytes(b"Subject: hi\r\nX-Long: a\r\n\tb\r\n\r\nbody line\r\n")
    eom = pkt(b"h", b"X-Checked\0yes\0") + pkt(b"c")
    with FakeMilter(lambda c: serve(c, lambda cmd, d: eom if cmd == b"E" else pkt(b"c"))) as fake:
        assert main(session_args(fake.spec, "--message", str(msg))) == 0
        headers = [d for c, d in fake.received if c == b"L"]
    out = capsys.readouterr().out.splitlines()
    assert out[-2:] == ["EOM: continue", "  addheader X-Checked: yes"]
    assert "BODY 11 bytes: continue" in out
    assert headers == [b"Subject\0hi\0", b"X-Long\0a\n\tb\0"]


def test_protocol_error_is_exit_1_with_one_line_naming_the_step(capsys) -> None:
    with FakeMilter(lambda c: serve(c, lambda cmd, d: b"\x00\x00\x00\x00" if cmd == b"R" else pkt(b"c"))) as fake:
        assert main(session_args(fake.spec, "--timeout", "1")) == 1
    out, err = capsys.readouterr()
    assert out.splitlines()[-1] == "MAIL <alice@example.com>: continue"
    assert err == ("relaymilter-test: error: RCPT <bob@remote.example>: protocol error: "
                   "packet length 0 is too short (a packet holds at least its command byte)\n")


def test_silent_milter_is_exit_1_within_the_timeout(capsys) -> None:
    def silent(conn):
        conn.optneg()
        conn.hang()

    with FakeMilter(silent) as fake:
        assert main(session_args(fake.spec, "--timeout", "0.3")) == 1
    err = capsys.readouterr().err
    assert err == "relaymilter-test: error: CONNECT 127.0.0.5: protocol error: timeout: no reply within 0.3s\n"


def test_unreachable_is_exit_1(capsys) -> None:
    assert main(session_args("unix:/nonexistent/relaymilter/m.sock")) == 1
    err = capsys.readouterr().err
    assert err.startswith("relaymilter-test: error: cannot reach milter at unix:/nonexistent/relaymilter/m.sock: ")


@pytest.mark.parametrize("argv, message", [
    (["--socket", "inet:1@127.0.0.1", "--client", "127.0.0.5", "--rcpt", "a@b"], "missing --from"),
    ([], "missing --socket, --client, --from, --rcpt"),
    (["--socket", "tcp:1", "--client", "127.0.0.5", "--from", "a@b", "--rcpt", "c@d"], "bad socket"),
    (["--socket", "inet:1@127.0.0.1", "--client", "localhost", "--from", "a@b", "--rcpt", "c@d"],
     "--client: invalid IP address"),
    (["--socket", "inet:1@127.0.0.1", "--client", "127.0.0.5", "--from", "a@b", "--rcpt", "c@d",
      "--timeout", "0"], "--timeout must be positive"),
    (["x.yaml", "--client", "127.0.0.5"], "cannot be combined with --client"),
    (["--socket", "inet:1@127.0.0.1", "--client", "127.0.0.5", "--from", "a@b", "--rcpt", "c@d",
      "--message", "/nonexistent/m.eml"], "--message: cannot read"),
])
def test_bad_usage_is_exit_2(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "relaymilter-test: error: " in err and message in err


SCENARIO = """\
socket: inet:1@127.0.0.1
sessions:
  - name: remote refused
    client: 192.0.2.10
    from: <alice@example.net>
    rcpts:
      - <bob@remote.example>: 550 5.7.1 Relaying denied
      - <carol@example.com>: continue
"""


def test_scenario_mode_pass_and_socket_override(tmp_path, capsys) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(SCENARIO)
    with FakeMilter(lambda c: serve(c, deny_remote)) as fake:
        assert main(["--socket", fake.spec, str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "PASS %s:3 remote refused" % path
    assert out[-1] == "relaymilter-test: 1 sessions: 1 pass, 0 fail"


def test_scenario_mode_failure_is_exit_1(tmp_path, capsys) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(SCENARIO)
    with FakeMilter(lambda c: serve(c)) as fake:
        assert main(["--socket", fake.spec, str(path)]) == 1
    out = capsys.readouterr().out
    assert "  FAIL RCPT <bob@remote.example>: expected 550 5.7.1 Relaying denied (%s:7), got continue" % path in out
    assert out.splitlines()[-1] == "relaymilter-test: 1 sessions: 0 pass, 1 fail"


def test_scenario_file_error_is_exit_2_with_file_line(tmp_path, capsys) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(SCENARIO.replace("    from:", "    form:"))
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err == "relaymilter-test: error: %s:5: unknown key 'form' in a session (known: auth, body, client, " \
                  "client_name, expect, from, headers, helo, name, rcpts)\n" % path


def test_parse_message() -> None:
    headers, body = parse_message(b"A: 1\nB: two\n  more\n\nline\n")
    assert headers == [("A", "1"), ("B", "two\n  more")]
    assert body == b"line\n"
    assert parse_message(b"just a body\n") == ([], b"just a body\n")


def _installed_script() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "relaymilter-test")
    found = here if os.path.exists(here) else shutil.which("relaymilter-test")
    assert found, "relaymilter-test is not installed (pip install -e .)"
    return found


def test_installed_script(tmp_path) -> None:
    script = _installed_script()
    with FakeMilter(lambda c: serve(c, deny_remote)) as fake:
        proc = subprocess.run([script, *session_args(fake.spec, "--timeout", "5")],
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "RCPT <bob@remote.example>: 550 5.7.1 Relaying denied\n" in proc.stdout
    proc = subprocess.run([script, "--socket", "unix:/nonexistent/m.sock", "--client", "127.0.0.5",
                           "--from", "a@b", "--rcpt", "c@d"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.startswith("relaymilter-test: error: cannot reach milter")
    proc = subprocess.run([script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("relaymilter-test ")


def test_help_text_mentions_socket_spellings(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "inet:PORT@HOST" in out and "unix:/path" in out
