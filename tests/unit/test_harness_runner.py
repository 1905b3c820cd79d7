"""run_session() follows sendmail after each answer: what is sent, what is reported not sent."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "data"))

from harness_fakemilter import FakeMilter, pkt, serve  # noqa: E402

from relaymilter.harness import ProtocolError, SessionSpec, run_session  # noqa: E402
from relaymilter.harness import protocol as P  # noqa: E402
from relaymilter.harness.runner import body_bytes  # noqa: E402

# Every wait in these tests is bounded; this only stops a regression from hanging the suite.
pytestmark = pytest.mark.timeout(60)

DENY = pkt(b"y", b"550 5.7.1 Relaying denied\0")


def policy(**by_cmd):
    """A milter answering by command letter (C H M R T L N B E), else continue."""
    def answer(cmd, data):
        rule = by_cmd.get(cmd.decode())
        if callable(rule):
            return rule(data)
        return rule if rule is not None else pkt(b"c")
    return answer


def spec(**kw) -> SessionSpec:
    base = dict(client="192.0.2.10", helo="client.example", mail_from="<alice@example.net>",
                rcpts=["<bob@remote.example>"])
    base.update(kw)
    return SessionSpec(**base)


def run(answer, session: SessionSpec, protocol: int = 0):
    with FakeMilter(lambda c: serve(c, answer, protocol=protocol)) as fake:
        result = run_session(fake.spec, session, timeout=2)
        end = time.monotonic() + 5
        while b"Q" not in fake.commands() and time.monotonic() < end:
            time.sleep(0.01)
    assert result.error is None, result.error
    return result, fake.commands()


def answers(result) -> list:
    return [(step.label, step.answer) for step in result]


def test_whole_session_one_result_per_step() -> None:
    result, cmds = run(policy(R=lambda d: DENY if b"remote" in d else pkt(b"c")),
                       spec(rcpts=["bob@remote.example", "<carol@example.com>"]))
    assert answers(result) == [
        ("CONNECT 192.0.2.10", "continue"),
        ("HELO client.example", "continue"),
        ("MAIL <alice@example.net>", "continue"),
        ("RCPT <bob@remote.example>", "550 5.7.1 Relaying denied"),   # a rejected RCPT drops itself only
        ("RCPT <carol@example.com>", "continue"),
    ]
    assert cmds == [b"O", b"D", b"C", b"H", b"D", b"M", b"D", b"R", b"D", b"R", b"A", b"Q"]


def test_rejected_mail_sends_no_rcpt_and_aborts() -> None:
    result, cmds = run(policy(M=pkt(b"y", b"550 5.7.1 Access denied\0")),
                       spec(rcpts=["<a@x>", "<b@x>"]))
    assert answers(result)[2:] == [("MAIL <alice@example.net>", "550 5.7.1 Access denied"),
                                   ("RCPT <a@x>", "not sent"), ("RCPT <b@x>", "not sent")]
    assert result[3].describe() == "not sent (MAIL got 550 5.7.1)"
    assert b"R" not in cmds
    assert cmds[-2:] == [b"A", b"Q"]


def test_tempfailed_mail_is_the_same() -> None:
    result, cmds = run(policy(M=pkt(b"t")), spec())
    assert [s.answer for s in result][2:] == ["tempfail", "not sent"]
    assert result[3].reason == "MAIL got tempfail"
    assert b"R" not in cmds


def test_rejected_connect_ends_everything() -> None:
    result, cmds = run(policy(C=pkt(b"r")), spec(headers=[("Subject", "x")], body="hi\n"))
    assert [s.answer for s in result] == ["reject"] + ["not sent"] * 8
    assert {s.reason for s in result.steps[1:]} == {"CONNECT got reject"}
    assert cmds == [b"O", b"D", b"C", b"Q"]


def test_tempfailed_helo_ends_everything() -> None:
    result, cmds = run(policy(H=pkt(b"y", b"421 4.3.2 Shutting down\0")), spec())
    assert [s.answer for s in result] == ["continue", "421 4.3.2 Shutting down", "not sent", "not sent"]
    assert b"M" not in cmds


def test_accept_at_rcpt_ends_the_milters_part_of_the_message() -> None:
    result, cmds = run(policy(R=pkt(b"a")), spec(rcpts=["<a@x>", "<b@x>"], body="hi\n"))
    assert [s.answer for s in result][3:] == ["accept"] + ["not sent"] * 5
    assert cmds.count(b"R") == 1 and b"T" not in cmds


def test_no_accepted_recipient_means_no_data() -> None:
    result, cmds = run(policy(R=DENY), spec(rcpts=["<a@x>", "<b@x>"], headers=[("Subject", "x")]))
    assert [s.answer for s in result][3:] == ["550 5.7.1 Relaying denied"] * 2 + ["not sent"] * 4
    assert result[5].reason == "no recipient was accepted"
    assert cmds.count(b"R") == 2 and b"T" not in cmds and cmds[-2:] == [b"A", b"Q"]


def test_data_phase_headers_body_chunks_and_eom_modifications() -> None:
    body = "x" * 70000 + "\n"
    eom = pkt(b"h", b"X-Checked\0yes\0") + pkt(b"c")
    result, cmds = run(policy(E=eom), spec(headers=[("Subject", "hi"), ("To", "<bob@remote.example>")],
                                           body=body))
    labels = [s.label for s in result][4:]
    assert labels == ["DATA", "HEADER Subject: hi", "HEADER To: <bob@remote.example>", "EOH",
                      "BODY 65535 bytes", "BODY 4467 bytes", "EOM"]
    assert result[-1].answer == "continue"
    assert [str(m) for m in result[-1].reply.modifications] == ["addheader X-Checked: yes"]
    assert cmds[-6:] == [b"L", b"N", b"B", b"B", b"E", b"Q"]  # no abort after end of message


def test_skip_stops_the_body() -> None:
    result, cmds = run(policy(B=pkt(b"s")), spec(body="y" * 140000), protocol=P.SMFIP_SKIP)
    assert [s.answer for s in result if s.step in ("body", "eom")] == ["skip", "not sent", "not sent", "continue"]
    assert cmds.count(b"B") == 1 and b"E" in cmds


def test_reject_in_data_phase_aborts() -> None:
    result, cmds = run(policy(N=pkt(b"r")), spec(headers=[("Subject", "x")], body="hi\n"))
    assert [s.answer for s in result][-3:] == ["reject", "not sent", "not sent"]
    assert b"E" not in cmds and cmds[-2:] == [b"A", b"Q"]


def test_declined_steps_report_continue_and_flow_on() -> None:
    result, cmds = run(policy(R=DENY), spec(), protocol=P.SMFIP_NOHELO | P.SMFIP_NOMAIL)
    assert [(s.answer, s.reply.sent) for s in result] == [
        ("continue", True), ("continue", False), ("continue", False), ("550 5.7.1 Relaying denied", True)]
    assert b"H" not in cmds and b"M" not in cmds


def test_protocol_error_keeps_earlier_steps_and_names_the_step() -> None:
    with FakeMilter(lambda c: serve(c, policy(R=b"\x00\x00\x00\x01Z"))) as fake:
        result = run_session(fake.spec, spec(rcpts=["<bob@x>", "<carol@x>"]), timeout=1)
    assert not result.ok
    assert isinstance(result.error, ProtocolError)
    assert str(result.error).startswith("RCPT <bob@x>: protocol error: unknown response byte 'Z'")
    assert [s.label for s in result] == ["CONNECT 192.0.2.10", "HELO client.example", "MAIL <alice@example.net>"]


def test_unreachable_milter_is_an_error_result() -> None:
    result = run_session("unix:/nonexistent/relaymilter/m.sock", spec(), timeout=1)
    assert len(result) == 0 and "cannot reach milter" in str(result.error)


def test_session_without_helo_has_no_helo_step() -> None:
    result, cmds = run(policy(), spec(helo=None, auth="alice"))
    assert [s.step for s in result] == ["connect", "mail", "rcpt"]
    assert b"H" not in cmds


def test_body_bytes_uses_crlf() -> None:
    assert body_bytes("a\nb\r\nc") == b"a\r\nb\r\nc"
    assert body_bytes(b"\xff\n") == b"\xff\r\n"
