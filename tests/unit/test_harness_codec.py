"""Byte-exact tests of the milter codec: every command we send, every response we decode."""

from __future__ import annotations

import pytest

from relaymilter.harness import codec
from relaymilter.harness import protocol as P
from relaymilter.harness.errors import ProtocolError
from relaymilter.harness.reply import (
    AddHeader,
    AddRcpt,
    ChgFrom,
    ChgHeader,
    DelRcpt,
    InsHeader,
    OptNeg,
    Progress,
    Quarantine,
    ReplBody,
    Reply,
)

# ----------------------------------------------------------- commands (MTA -> milter)


def test_frame_counts_the_command_byte() -> None:
    assert codec.frame(b"T") == b"\x00\x00\x00\x01T"
    assert codec.frame(b"H", b"ab\0") == b"\x00\x00\x00\x04Hab\0"


def test_frame_refuses_a_multibyte_command() -> None:
    with pytest.raises(ValueError):
        codec.frame(b"HH")


def test_optneg_offers_version_6_all_actions_all_protocol_steps() -> None:
    assert codec.encode_optneg() == (
        b"\x00\x00\x00\x0d" b"O" b"\x00\x00\x00\x06" b"\x00\x00\x01\xff" b"\x00\x1f\xff\xff")


def test_optneg_with_chosen_values() -> None:
    assert codec.encode_optneg(2, 0x3F, 0x7F) == b"\x00\x00\x00\x0dO\x00\x00\x00\x02\x00\x00\x00\x3f\x00\x00\x00\x7f"


def test_macro_packet_names_its_stage_then_pairs() -> None:
    got = codec.encode_macro(b"M", {"{auth_authen}": "alice", "i": "Q1"})
    data = b"M{auth_authen}\0alice\0i\0Q1\0"
    assert got == len(data + b"D").to_bytes(4, "big") + b"D" + data


def test_macro_packet_with_empty_value() -> None:
    assert codec.encode_macro(b"C", {"{if_addr}": ""}) == b"\x00\x00\x00\x0d" b"DC{if_addr}\0\0"


def test_connect_inet() -> None:
    got = codec.encode_connect("[127.0.0.5]", P.SMFIA_INET, 25, "127.0.0.5")
    data = b"[127.0.0.5]\0" b"4" b"\x00\x19" b"127.0.0.5\0"
    assert got == len(data + b"C").to_bytes(4, "big") + b"C" + data


def test_connect_inet6_port_in_network_order() -> None:
    got = codec.encode_connect("[IPv6:2001:db8::5]", P.SMFIA_INET6, 0xABCD, "2001:db8::5")
    data = b"[IPv6:2001:db8::5]\0" b"6" b"\xab\xcd" b"2001:db8::5\0"
    assert got == len(data + b"C").to_bytes(4, "big") + b"C" + data


def test_connect_unix() -> None:
    assert codec.encode_connect("localhost", P.SMFIA_UNIX, 0, "/run/s") == (
        b"\x00\x00\x00\x15" b"C" b"localhost\0" b"L" b"\x00\x00" b"/run/s\0")


def test_connect_unknown_family_has_no_port_or_address() -> None:
    assert codec.encode_connect("unknown") == b"\x00\x00\x00\x0a" b"C" b"unknown\0" b"U"


def test_connect_rejects_bad_family_and_port() -> None:
    with pytest.raises(ValueError):
        codec.encode_connect("h", b"X", 0, "a")
    with pytest.raises(ValueError):
        codec.encode_connect("h", P.SMFIA_INET, 70000, "1.2.3.4")


def test_helo() -> None:
    assert codec.encode_helo("client.example") == b"\x00\x00\x00\x10Hclient.example\0"


def test_mail_with_brackets_and_esmtp_args() -> None:
    assert codec.encode_mail(["<alice@example.com>", "SIZE=100"]) == (
        b"\x00\x00\x00\x1e" b"M" b"<alice@example.com>\0" b"SIZE=100\0")


def test_rcpt() -> None:
    assert codec.encode_rcpt(["<bob@remote.example>"]) == b"\x00\x00\x00\x16R<bob@remote.example>\0"


def test_mail_and_rcpt_need_an_address() -> None:
    with pytest.raises(ValueError):
        codec.encode_mail([])
    with pytest.raises(ValueError):
        codec.encode_rcpt([])


def test_header() -> None:
    assert codec.encode_header("Subject", "hi") == b"\x00\x00\x00\x0cLSubject\0hi\0"


def test_body_is_raw_bytes() -> None:
    assert codec.encode_body(b"a\r\n.\r\n") == b"\x00\x00\x00\x07Ba\r\n.\r\n"


def test_body_chunk_limit() -> None:
    assert len(codec.encode_body(b"x" * 65535)) == 4 + 1 + 65535
    with pytest.raises(ValueError):
        codec.encode_body(b"x" * 65536)


@pytest.mark.parametrize("encode, cmd", [
    (codec.encode_data, b"T"), (codec.encode_eoh, b"N"), (codec.encode_eom, b"E"),
    (codec.encode_abort, b"A"), (codec.encode_quit, b"Q"), (codec.encode_quit_nc, b"K"),
])
def test_commands_without_data(encode, cmd) -> None:
    assert encode() == b"\x00\x00\x00\x01" + cmd


def test_unknown_command() -> None:
    assert codec.encode_unknown("VRFY x") == b"\x00\x00\x00\x08UVRFY x\0"


def test_strings_are_utf8() -> None:
    assert codec.encode_helo("h\u00e9") == b"\x00\x00\x00\x05Hh\xc3\xa9\0"


def test_nul_in_a_string_is_refused() -> None:
    with pytest.raises(ValueError, match="NUL"):
        codec.encode_rcpt(["<a\0b>"])


# --------------------------------------------------------- responses (milter -> MTA)


@pytest.mark.parametrize("byte, action", [
    (b"c", "continue"), (b"a", "accept"), (b"r", "reject"), (b"t", "tempfail"),
    (b"d", "discard"), (b"s", "skip"), (b"4", "shutdown"), (b"f", "connfail"),
])
def test_decisions(byte, action) -> None:
    reply = codec.decode_response(byte, b"")
    assert reply == Reply(action)
    assert str(reply) == action


@pytest.mark.parametrize("byte", [b"c", b"a", b"r", b"t", b"d", b"s", b"4", b"f", b"p"])
def test_decision_with_data_is_an_error(byte) -> None:
    with pytest.raises(ProtocolError, match="unexpected data"):
        codec.decode_response(byte, b"x")


def test_replycode_full_text() -> None:
    r = codec.decode_response(b"y", b"550 5.7.1 Relaying denied\0")
    assert (r.action, r.code, r.xcode, r.text) == ("reject", "550", "5.7.1", "Relaying denied")
    assert str(r) == "550 5.7.1 Relaying denied"


def test_replycode_4xx_is_tempfail() -> None:
    r = codec.decode_response(b"y", b"451 4.3.0 Relay check temporarily unavailable, try again later\0")
    assert (r.action, r.code, r.xcode) == ("tempfail", "451", "4.3.0")
    assert r.text == "Relay check temporarily unavailable, try again later"


def test_replycode_without_enhanced_code() -> None:
    r = codec.decode_response(b"y", b"554 go away\0")
    assert (r.code, r.xcode, r.text, str(r)) == ("554", "", "go away", "554 go away")


def test_replycode_multiline() -> None:
    r = codec.decode_response(b"y", b"550-5.7.1 first\r\n550 5.7.1 second\0")
    assert (r.code, r.xcode, r.text) == ("550", "5.7.1", "first\nsecond")
    assert r.raw == "550-5.7.1 first\r\n550 5.7.1 second"
    assert str(r) == "550-5.7.1 first\n550 5.7.1 second"


@pytest.mark.parametrize("data", [
    b"250 2.0.0 ok\0", b"hello\0", b"55\0", b"5500 x\0", b"550 4.7.1 mismatched class\0",
    b"550-5.7.1 a\r\n451 4.3.0 b\0", b"550 5.7.1 no terminator",
])
def test_bad_replycodes(data) -> None:
    with pytest.raises(ProtocolError):
        codec.decode_response(b"y", data)


def test_progress() -> None:
    assert codec.decode_response(b"p", b"") == Progress()


def test_optneg_answer() -> None:
    data = b"\x00\x00\x00\x06\x00\x00\x00\x11\x00\x00\x02\x02"
    assert codec.decode_response(b"O", data) == OptNeg(6, 0x11, 0x202)


def test_optneg_answer_with_macro_lists() -> None:
    data = (b"\x00\x00\x00\x06\x00\x00\x01\x00\x00\x00\x00\x00"
            b"\x00\x00\x00\x02{auth_authen} i\0" b"\x00\x00\x00\x03{rcpt_addr}\0")
    got = codec.decode_optneg(data)
    assert got.symlists == ((2, "{auth_authen} i"), (3, "{rcpt_addr}"))


@pytest.mark.parametrize("data, message", [
    (b"\x00\x00\x00\x06\x00\x00\x00\x00", "needs 12"),
    (b"\x00\x00\x00\x06" + b"\x00" * 8 + b"\x00\x00", "truncated"),
    (b"\x00\x00\x00\x06" + b"\x00" * 8 + b"\x00\x00\x00\x02{i}", "not NUL-terminated"),
])
def test_bad_optneg_answers(data, message) -> None:
    with pytest.raises(ProtocolError, match=message):
        codec.decode_optneg(data)


def test_addrcpt() -> None:
    assert codec.decode_response(b"+", b"<new@example.com>\0") == AddRcpt("<new@example.com>")


def test_addrcpt_par_with_and_without_args() -> None:
    assert codec.decode_response(b"2", b"<n@x>\0NOTIFY=NEVER\0") == AddRcpt("<n@x>", "NOTIFY=NEVER")
    assert codec.decode_response(b"2", b"<n@x>\0") == AddRcpt("<n@x>")


def test_delrcpt() -> None:
    m = codec.decode_response(b"-", b"<old@example.com>\0")
    assert m == DelRcpt("<old@example.com>")
    assert str(m) == "delrcpt <old@example.com>"


def test_addheader() -> None:
    m = codec.decode_response(b"h", b"X-Spam\0no\0")
    assert m == AddHeader("X-Spam", "no")
    assert str(m) == "addheader X-Spam: no"


def test_insheader() -> None:
    assert codec.decode_response(b"i", b"\x00\x00\x00\x00X-First\0yes\0") == InsHeader(0, "X-First", "yes")


def test_chgheader_and_delete() -> None:
    assert codec.decode_response(b"m", b"\x00\x00\x00\x02Subject\0new\0") == ChgHeader(2, "Subject", "new")
    deleted = codec.decode_response(b"m", b"\x00\x00\x00\x01Subject\0\0")
    assert deleted == ChgHeader(1, "Subject", "")
    assert str(deleted) == "chgheader Subject[1]: (deleted)"


def test_replbody_keeps_bytes() -> None:
    assert codec.decode_response(b"b", b"new\r\nbody\0\xff") == ReplBody(b"new\r\nbody\0\xff")


def test_chgfrom() -> None:
    assert codec.decode_response(b"e", b"<s@x>\0") == ChgFrom("<s@x>")
    assert codec.decode_response(b"e", b"<s@x>\0SIZE=1\0") == ChgFrom("<s@x>", "SIZE=1")


def test_quarantine() -> None:
    assert codec.decode_response(b"q", b"suspicious\0") == Quarantine("suspicious")


@pytest.mark.parametrize("cmd, data, message", [
    (b"h", b"X-Spam\0no", "not NUL-terminated"),
    (b"h", b"X-Spam\0", "needs 2"),
    (b"+", b"<a>\0<b>\0", "at most 1"),
    (b"i", b"\x00\x00", "too short"),
    (b"m", b"\x00\x00\x00\x01Subject\0", "needs 2"),
    (b"q", b"", "not NUL-terminated"),
])
def test_malformed_modifications(cmd, data, message) -> None:
    with pytest.raises(ProtocolError, match=message):
        codec.decode_response(cmd, data)


@pytest.mark.parametrize("byte", [b"Z", b"x", b"\x00", b"C"])
def test_unknown_response_byte(byte) -> None:
    with pytest.raises(ProtocolError, match="unknown response byte"):
        codec.decode_response(byte, b"")


# ---------------------------------------------------------------------- framing


def test_packet_length_bounds() -> None:
    assert codec.packet_length(b"\x00\x00\x00\x01") == 1
    assert codec.packet_length((P.MAX_PACKET).to_bytes(4, "big")) == P.MAX_PACKET
    with pytest.raises(ProtocolError, match="too short"):
        codec.packet_length(b"\x00\x00\x00\x00")
    with pytest.raises(ProtocolError, match="too large"):
        codec.packet_length((P.MAX_PACKET + 1).to_bytes(4, "big"))
    with pytest.raises(ProtocolError, match="too large"):
        codec.packet_length(b"HELL")
    with pytest.raises(ProtocolError, match="truncated"):
        codec.packet_length(b"\x00\x00")


def test_split_packet() -> None:
    stream = b"\x00\x00\x00\x01c" + b"\x00\x00\x00\x05hX\0y\0" + b"\x00\x00"
    cmd, data, rest = codec.split_packet(stream)
    assert (cmd, data) == (b"c", b"")
    cmd, data, rest = codec.split_packet(rest)
    assert (cmd, data, rest) == (b"h", b"X\0y\0", b"\x00\x00")
    assert codec.split_packet(rest) is None
    assert codec.split_packet(b"\x00\x00\x00\x05hX\0") is None  # truncated: wait for more


def test_split_packet_rejects_bad_length() -> None:
    with pytest.raises(ProtocolError, match="too short"):
        codec.split_packet(b"\x00\x00\x00\x00c")


def test_round_trip_of_encoded_frames() -> None:
    packet = codec.encode_rcpt(["<bob@remote.example>", "NOTIFY=NEVER"])
    cmd, data, rest = codec.split_packet(packet)
    assert (cmd, data, rest) == (b"R", b"<bob@remote.example>\0NOTIFY=NEVER\0", b"")
