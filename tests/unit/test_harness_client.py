"""MilterSession against scripted milters on loopback sockets: negotiation, macros,
replies, and deliberately broken milters (every failure names its step, in time)."""

from __future__ import annotations

import socket
import struct
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "data"))

from harness_fakemilter import FakeMilter, optneg_data, pkt, serve  # noqa: E402

from relaymilter.harness import MilterSession, MilterUnreachable, ProtocolError  # noqa: E402
from relaymilter.harness import protocol as P  # noqa: E402
from relaymilter.harness.channel import PROGRESS_CAP  # noqa: E402
from relaymilter.harness.client import address_parts, bracket  # noqa: E402
from relaymilter.harness.reply import AddHeader, ChgFrom, DelRcpt  # noqa: E402
from relaymilter.harness.sockspec import parse_socket_spec  # noqa: E402
from relaymilter.harness.errors import SocketSpecError  # noqa: E402

# Every wait in these tests is bounded; this only stops a regression from hanging the suite.
pytestmark = pytest.mark.timeout(60)

T = 0.5  # harness timeout in the broken-milter tests: every failure must come within it


def macros_of(data: bytes) -> dict:
    parts = data[1:].split(b"\0")[:-1]
    return {parts[i].decode(): parts[i + 1].decode() for i in range(0, len(parts), 2)}


def packets(fake: FakeMilter, cmd: bytes) -> list:
    return [data for c, data in fake.received if c == cmd]


def wait_for(predicate, limit: float = 5.0) -> None:
    end = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < end, "condition not reached in %ss" % limit
        time.sleep(0.01)


# ------------------------------------------------------------------ negotiation


def test_optneg_sent_and_answer_kept() -> None:
    with FakeMilter(lambda c: serve(c, protocol=P.SMFIP_NOHELO | P.SMFIP_SKIP)) as fake:
        with MilterSession(fake.spec, timeout=2) as s:
            assert s.negotiated.version == 6
            assert s.negotiated.protocol == P.SMFIP_NOHELO | P.SMFIP_SKIP
        wait_for(lambda: b"Q" in fake.commands())
    assert fake.received[0] == (b"O", b"\x00\x00\x00\x06\x00\x00\x01\xff\x00\x1f\xff\xff")
    assert fake.received[-1] == (b"Q", b"")


def test_declined_steps_are_not_sent_but_their_macros_are() -> None:
    flags = P.SMFIP_NOHELO | P.SMFIP_NOMAIL | P.SMFIP_NODATA | P.SMFIP_NOHDRS | P.SMFIP_NOEOH | P.SMFIP_NOBODY
    with FakeMilter(lambda c: serve(c, protocol=flags)) as fake:
        with MilterSession(fake.spec, timeout=2) as s:
            assert s.connect("127.0.0.5").action == "continue"
            helo = s.helo("client.example")
            mail = s.mail("<alice@example.com>", auth="alice")
            assert (helo.action, helo.sent, mail.sent) == ("continue", False, False)
            assert "SMFIP_NOMAIL" in mail.note and str(mail) == "continue"
            assert s.rcpt("<bob@remote.example>").sent
            for reply in (s.data(), s.header("Subject", "x"), s.eoh(), s.body(b"hi\r\n")):
                assert (reply.action, reply.sent) == ("continue", False)
            assert s.end_of_message().action == "continue"
        wait_for(lambda: b"Q" in fake.commands())
    cmds = fake.commands()
    assert b"H" not in cmds and b"M" not in cmds and b"T" not in cmds and b"L" not in cmds
    assert b"N" not in cmds and b"B" not in cmds
    assert cmds.count(b"R") == 1 and cmds.count(b"E") == 1
    stages = [data[:1] for data in packets(fake, b"D")]
    assert stages == [b"C", b"M", b"R"]  # MAIL's macros went although MAIL did not
    assert macros_of(packets(fake, b"D")[1])["{auth_authen}"] == "alice"


def test_no_reply_steps_are_not_awaited() -> None:
    with FakeMilter(lambda c: serve(c, protocol=P.SMFIP_NR_RCPT | P.SMFIP_NR_CONN)) as fake:
        with MilterSession(fake.spec, timeout=T) as s:
            conn = s.connect("192.0.2.1")
            assert (conn.action, conn.awaited) == ("continue", False)
            r = s.rcpt("bob@remote.example")
            assert (r.action, r.sent, r.awaited) == ("continue", True, False)
            assert "SMFIP_NR_RCPT" in r.note
            # The stream is still in step: the next answered command gets its own answer.
            assert s.end_of_message().action == "continue"


def test_symlist_restricts_macros_per_stage() -> None:
    extra = struct.pack(">L", P.SMFIM_ENVFROM) + b"{auth_authen}\0"
    with FakeMilter(lambda c: serve(c, extra=extra)) as fake:
        with MilterSession(fake.spec, timeout=2) as s:
            s.connect("127.0.0.5")
            s.mail("<a@b>", auth="alice")
    mail_macros = [macros_of(d) for d in packets(fake, b"D") if d[:1] == b"M"]
    assert mail_macros == [{"{auth_authen}": "alice"}]
    connect_macros = [macros_of(d) for d in packets(fake, b"D") if d[:1] == b"C"][0]
    assert connect_macros["{client_addr}"] == "127.0.0.5"  # no list for CONNECT: all sent


@pytest.mark.parametrize("answer, message", [
    (optneg_data(version=7), "version 7"),
    (optneg_data(version=1), "version 1"),
    (optneg_data(protocol=0x40000000), "protocol flags"),
    (optneg_data(actions=0x200), "actions"),
    (b"\x00\x00\x00\x06", "needs 12"),
])
def test_bad_negotiation(answer, message) -> None:
    def handler(conn):
        conn.read()
        conn.send(pkt(b"O", answer))
        conn.hang()

    with FakeMilter(handler) as fake:
        with pytest.raises(ProtocolError, match=message) as info:
            MilterSession(fake.spec, timeout=T).open()
    assert info.value.step == "OPTNEG"


def test_negotiation_answered_with_something_else() -> None:
    def handler(conn):
        conn.read()
        conn.send(pkt(b"c"))

    with FakeMilter(handler) as fake:
        with pytest.raises(ProtocolError, match=r"OPTNEG: protocol error: expected the optneg answer, got 'c'"):
            MilterSession(fake.spec, timeout=T).open()


# --------------------------------------------------------------- steps, macros


def test_connect_ipv4_packet_and_default_macros() -> None:
    with FakeMilter(serve) as fake:
        with MilterSession(fake.spec, timeout=2, mta_hostname="mx.example.com") as s:
            s.connect("127.0.0.5", port=4242)
    assert packets(fake, b"C") == [b"[127.0.0.5]\0" b"4" b"\x10\x92" b"127.0.0.5\0"]
    assert macros_of(packets(fake, b"D")[0]) == {
        "j": "mx.example.com", "{daemon_name}": "MTA", "{client_name}": "[127.0.0.5]",
        "{client_addr}": "127.0.0.5"}


def test_connect_ipv6_and_mapped_and_unix_and_unknown() -> None:
    with FakeMilter(serve) as fake:
        with MilterSession(fake.spec, timeout=2) as s:
            s.connect("2001:DB8::5", hostname="client6.example")
            s.connect("::ffff:192.0.2.7")
            s.connect(unix_path="/run/smtp.sock")
            s.connect()
    assert packets(fake, b"C") == [
        b"client6.example\0" b"6" b"\x00\x00" b"2001:db8::5\0",
        b"[192.0.2.7]\0" b"4" b"\x00\x00" b"192.0.2.7\0",   # sendmail reports mapped clients as inet
        b"localhost\0" b"L" b"\x00\x00" b"/run/smtp.sock\0",
        b"unknown\0" b"U",
    ]


def test_connect_refuses_a_malformed_address_before_sending() -> None:
    with FakeMilter(serve) as fake:
        with MilterSession(fake.spec, timeout=2) as s:
            with pytest.raises(ValueError):
                s.connect("999.1.1.1")
    assert b"C" not in fake.commands()


def test_mail_rcpt_brackets_and_macros() -> None:
    with FakeMilter(serve) as fake:
        with MilterSession(fake.spec, timeout=2) as s:
            s.connect("127.0.0.5")
            s.mail("alice@example.com", "SIZE=10", auth="alice", auth_type="LOGIN")
            s.mail("<>")
            s.rcpt("bob@remote.example")
            s.rcpt("<postmaster>", macros={"{rcpt_mailer}": "local", "{extra}": "x", "{rcpt_host}": None})
    assert packets(fake, b"M") == [b"<alice@example.com>\0SIZE=10\0", b"<>\0"]
    assert packets(fake, b"R") == [b"<bob@remote.example>\0", b"<postmaster>\0"]
    mail1, mail2, rcpt1, rcpt2 = [macros_of(d) for d in packets(fake, b"D")[1:]]
    assert mail1["{mail_addr}"] == "alice@example.com" and mail1["{mail_host}"] == "example.com"
    assert (mail1["{auth_authen}"], mail1["{auth_type}"]) == ("alice", "LOGIN")
    assert mail1["i"] and mail1["i"] != mail2["i"]  # a new queue id per transaction
    assert "{auth_authen}" not in mail2 and mail2["{mail_addr}"] == ""
    assert rcpt1 == {"{rcpt_addr}": "bob@remote.example", "{rcpt_mailer}": "esmtp",
                     "{rcpt_host}": "remote.example."}
    assert rcpt2 == {"{rcpt_addr}": "postmaster", "{rcpt_mailer}": "local", "{extra}": "x"}


def test_bracket_and_address_parts() -> None:
    assert bracket("bob@x") == "<bob@x>"
    assert bracket("<bob@x>") == "<bob@x>"
    assert bracket("<>") == "<>"
    assert bracket("") == "<>"
    assert address_parts("<user%remote@example.com>") == ("user%remote@example.com", "example.com")
    assert address_parts("<postmaster>") == ("postmaster", "")


def test_header_leading_space_when_negotiated() -> None:
    with FakeMilter(lambda c: serve(c, protocol=P.SMFIP_HDR_LEADSPC)) as fake:
        with MilterSession(fake.spec, timeout=2) as s:
            s.header("Subject", "hi")
            s.header("X-Folded", "\tcontinued")
    assert packets(fake, b"L") == [b"Subject\0 hi\0", b"X-Folded\0\tcontinued\0"]


def test_replycode_comes_through_in_full() -> None:
    def answer(cmd, data):
        if cmd == b"R":
            return pkt(b"y", b"550 5.7.1 Relaying denied\0")
        return pkt(b"c")

    with FakeMilter(lambda c: serve(c, answer)) as fake:
        with MilterSession(fake.spec, timeout=2) as s:
            s.connect("127.0.0.5")
            r = s.rcpt("<bob@remote.example>")
    assert (r.action, r.code, r.xcode, r.text) == ("reject", "550", "5.7.1", "Relaying denied")
    assert str(r) == "550 5.7.1 Relaying denied"


def test_end_of_message_collects_modifications_and_progress() -> None:
    def answer(cmd, data):
        if cmd == b"E":
            return (pkt(b"h", b"X-Spam\0no\0") + pkt(b"p") + pkt(b"-", b"<x@y>\0")
                    + pkt(b"e", b"<new@x>\0") + pkt(b"a"))
        return pkt(b"c")

    with FakeMilter(lambda c: serve(c, answer)) as fake:
        with MilterSession(fake.spec, timeout=2) as s:
            r = s.end_of_message()
    assert r.action == "accept"
    assert r.modifications == (AddHeader("X-Spam", "no"), DelRcpt("<x@y>"), ChgFrom("<new@x>"))


def test_skip_after_body_when_negotiated() -> None:
    def answer(cmd, data):
        return pkt(b"s") if cmd == b"B" else pkt(b"c")

    with FakeMilter(lambda c: serve(c, answer, protocol=P.SMFIP_SKIP)) as fake:
        with MilterSession(fake.spec, timeout=2) as s:
            assert s.body(b"x").action == "skip"


def test_body_chunk_too_large_is_refused_locally() -> None:
    with FakeMilter(serve) as fake:
        with MilterSession(fake.spec, timeout=2) as s:
            with pytest.raises(ValueError):
                s.body(b"x" * 65536)


def test_unix_socket_and_local_spelling() -> None:
    with FakeMilter(serve, unix=True) as fake:
        for spec in (fake.spec, "local:" + fake.path, fake.path):
            with MilterSession(spec, timeout=2) as s:
                assert s.connect("127.0.0.5").action == "continue"


def test_inet6_socket() -> None:
    with FakeMilter(serve, inet6=True) as fake:
        assert fake.spec.startswith("inet6:")
        with MilterSession(fake.spec, timeout=2) as s:
            assert s.connect("::1").action == "continue"
    assert packets(fake, b"C") == [b"[IPv6:::1]\0" b"6" b"\x00\x00" b"::1\0"]


def test_abort_sends_abort() -> None:
    with FakeMilter(serve) as fake:
        with MilterSession(fake.spec, timeout=2) as s:
            s.mail("<a@b>")
            s.abort()
        wait_for(lambda: b"Q" in fake.commands())
    assert fake.commands()[-2:] == [b"A", b"Q"]


# ---------------------------------------------------------------- broken milters


def broken(after_optneg):
    """A milter that negotiates, answers continue until RCPT, then misbehaves."""
    def handler(conn):
        conn.optneg()
        while True:
            packet = conn.read()
            if packet is None:
                return
            cmd, _ = packet
            if cmd == b"R":
                after_optneg(conn)
                return
            if cmd not in (b"D", b"A", b"Q"):
                conn.send(pkt(b"c"))
    return handler


def run_until_rcpt(fake: FakeMilter):
    started = time.monotonic()
    with pytest.raises(ProtocolError) as info:
        with MilterSession(fake.spec, timeout=T) as s:
            s.connect("127.0.0.5")
            s.mail("<a@b>")
            s.rcpt("<bob@x>")
    return info.value, time.monotonic() - started


@pytest.mark.parametrize("behaviour, message", [
    (lambda c: c.send(b"\x00\x00\x00\x00"), "packet length 0 is too short"),
    (lambda c: c.send(b"\x7f\xff\xff\xffc"), "too large"),
    (lambda c: c.send(b"HELLO garbage\r\n"), "too large"),
    (lambda c: c.send(b"\x00\x00\x00\x01Z"), "unknown response byte 'Z'"),
    (lambda c: c.send(pkt(b"y", b"250 2.0.0 fine\0")), "malformed reply code"),
    (lambda c: c.send(pkt(b"c", b"extra")), "unexpected data"),
    (lambda c: c.send(pkt(b"h", b"X\0y\0")), "only allowed at end of message"),
    (lambda c: c.send(pkt(b"s")), "skip is only allowed"),
    (lambda c: c.send(pkt(b"O", optneg_data())), "unexpected optneg"),
    (lambda c: None, "closed the connection without answering"),
    (lambda c: c.send(b"\x00\x00"), "truncated packet header"),
    (lambda c: c.send(b"\x00\x00\x00\x0ay550"), "truncated packet: milter closed the connection after 4 of 10"),
])
def test_broken_milter_is_a_protocol_error_naming_the_step(behaviour, message) -> None:
    with FakeMilter(broken(behaviour)) as fake:
        err, elapsed = run_until_rcpt(fake)
    assert err.step == "RCPT <bob@x>"
    assert str(err).startswith("RCPT <bob@x>: protocol error: ")
    assert message in str(err)
    assert elapsed < T + 1.0


@pytest.mark.parametrize("behaviour, message", [
    (lambda c: c.hang(), "timeout: no reply within 0.5s"),
    (lambda c: (c.send(b"\x00\x00\x00"), c.hang()), "timeout: packet header incomplete"),
    (lambda c: (c.send(b"\x00\x00\x00\x1ay550 5.7.1"), c.hang()), "timeout: packet incomplete"),
])
def test_silent_milter_times_out(behaviour, message) -> None:
    with FakeMilter(broken(behaviour)) as fake:
        err, elapsed = run_until_rcpt(fake)
    assert err.step == "RCPT <bob@x>"
    assert message in str(err)
    assert T - 0.05 <= elapsed < T + 1.0


def test_progress_extends_the_wait_but_never_forever() -> None:
    def chatter(conn):
        while not conn.stop.is_set():
            try:
                conn.send(pkt(b"p"))
            except OSError:
                return
            time.sleep(0.02)

    timeout = 0.1
    with FakeMilter(broken(chatter)) as fake:
        started = time.monotonic()
        with pytest.raises(ProtocolError, match="timeout"):
            with MilterSession(fake.spec, timeout=timeout) as s:
                s.rcpt("<bob@x>")
        elapsed = time.monotonic() - started
    # Progress kept it alive past one timeout, but not past the cap.
    assert timeout * 2 < elapsed < PROGRESS_CAP * timeout + 1.0


def test_session_is_unusable_after_a_protocol_error() -> None:
    with FakeMilter(broken(lambda c: c.send(b"\x00\x00\x00\x01Z"))) as fake:
        s = MilterSession(fake.spec, timeout=T)
        s.open()
        s.connect("127.0.0.5")
        with pytest.raises(ProtocolError):
            s.rcpt("<bob@x>")
        with pytest.raises(ProtocolError, match="session already failed at RCPT <bob@x>") as info:
            s.rcpt("<carol@x>")
        assert info.value.step == "RCPT <carol@x>"
        s.close()


def test_milter_closing_before_negotiation() -> None:
    with FakeMilter(lambda c: None) as fake:
        with pytest.raises(ProtocolError, match="OPTNEG: protocol error: milter closed"):
            MilterSession(fake.spec, timeout=T).open()


def test_unreachable_tcp_and_unix() -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    with pytest.raises(MilterUnreachable, match="cannot reach milter at inet:%d@127.0.0.1" % port):
        MilterSession("inet:%d@127.0.0.1" % port, timeout=T).open()
    with pytest.raises(MilterUnreachable, match="No such file"):
        MilterSession("unix:/nonexistent/relaymilter/m.sock", timeout=T).open()


def test_steps_before_open_are_refused() -> None:
    s = MilterSession("inet:9@127.0.0.1", timeout=T)
    with pytest.raises(ProtocolError, match="not open"):
        s.helo("x")


# ---------------------------------------------------------------- socket specs


@pytest.mark.parametrize("text, family, address", [
    ("inet:8894@127.0.0.1", socket.AF_INET, ("127.0.0.1", 8894)),
    ("inet:8894@localhost", socket.AF_INET, ("localhost", 8894)),
    ("inet:8894", socket.AF_INET, ("127.0.0.1", 8894)),
    ("inet6:8894@::1", socket.AF_INET6, ("::1", 8894)),
    ("inet6:8894@[::1]", socket.AF_INET6, ("::1", 8894)),
    ("unix:/run/m.sock", socket.AF_UNIX, "/run/m.sock"),
    ("local:/run/m.sock", socket.AF_UNIX, "/run/m.sock"),
    ("/run/m.sock", socket.AF_UNIX, "/run/m.sock"),
])
def test_socket_specs(text, family, address) -> None:
    spec = parse_socket_spec(text)
    assert (spec.family, spec.address) == (family, address)


@pytest.mark.parametrize("text", ["", "inet:", "inet:x@h", "inet:0@h", "inet:70000@h", "unix:", "tcp:25@h",
                                  "8894@127.0.0.1"])
def test_bad_socket_specs(text) -> None:
    with pytest.raises(SocketSpecError):
        parse_socket_spec(text)
