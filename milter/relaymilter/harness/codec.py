"""NAME
    relaymilter.harness.codec - milter protocol packets, MTA side, as bytes

DESCRIPTION
    Pure encode/decode of the sendmail milter protocol, version 6 (the one
    libmilter 8.14+ and pymilter speak). No sockets here: the client module
    owns the conversation; this module only turns commands into bytes and
    response bytes into values, so every packet type is testable byte by byte.

    A packet is a 32-bit big-endian length (counting the command byte and the
    data), one command byte, then the data. Strings are NUL-terminated.

        MTA -> milter    O optneg, D macros, C connect, H helo, M mail,
                         R rcpt, T data, L header, N eoh, B body, E end of
                         message, A abort, Q quit, K quit (new connection),
                         U unknown SMTP command
        milter -> MTA    O optneg, c a r t d y s p 4 f (decisions and
                         progress), + - 2 h i m b e q (modifications)

DIAGNOSTICS
    ProtocolError (without a step; the client adds it) for a length below 1
    or above MAX_PACKET, an unknown response byte, a packet whose data does
    not have the shape its type requires (missing NUL, extra bytes, short
    integers), or a reply code that is not 4xx/5xx. ValueError when asked to
    encode a string holding a NUL, which would corrupt the framing.
"""

from __future__ import annotations

import re
import struct
from typing import Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from relaymilter.harness.errors import ProtocolError
from relaymilter.harness.protocol import (
    DECISIONS,
    MAX_PACKET,
    MILTER_CHUNK_SIZE,
    PROTOCOL_VERSION,
    RESPONSE_NAMES,
    SMFIA_INET,
    SMFIA_INET6,
    SMFIA_UNIX,
    SMFIA_UNKNOWN,
    SMFIC_ABORT,
    SMFIC_BODY,
    SMFIC_BODYEOB,
    SMFIC_CONNECT,
    SMFIC_DATA,
    SMFIC_EOH,
    SMFIC_HEADER,
    SMFIC_HELO,
    SMFIC_MACRO,
    SMFIC_MAIL,
    SMFIC_OPTNEG,
    SMFIC_QUIT,
    SMFIC_QUIT_NC,
    SMFIC_RCPT,
    SMFIC_UNKNOWN,
    SMFIR_ADDHEADER,
    SMFIR_ADDRCPT,
    SMFIR_ADDRCPT_PAR,
    SMFIR_CHGFROM,
    SMFIR_CHGHEADER,
    SMFIR_DELRCPT,
    SMFIR_INSHEADER,
    SMFIR_OPTNEG,
    SMFIR_PROGRESS,
    SMFIR_QUARANTINE,
    SMFIR_REPLBODY,
    SMFIR_REPLYCODE,
    SMFI_CURR_ACTS,
    SMFI_CURR_PROT,
)
from relaymilter.harness.reply import (
    AddHeader,
    AddRcpt,
    ChgFrom,
    ChgHeader,
    DelRcpt,
    InsHeader,
    Modification,
    OptNeg,
    Progress,
    Quarantine,
    ReplBody,
    Reply,
)

Response = Union[Reply, Modification, Progress, OptNeg]

# "550 5.7.1 text" or "550-5.7.1 text" (multi-line); the enhanced code is optional.
_REPLY_LINE = re.compile(r"^([45][0-9][0-9])(?:([ -])(?:([245]\.[0-9]{1,3}\.[0-9]{1,3})(?: |$))?(.*))?$", re.S)

_ENCODING = "utf-8"


# ---------------------------------------------------------------- encoding


def frame(cmd: bytes, data: bytes = b"") -> bytes:
    """One packet: length (command byte + data), command byte, data."""
    if len(cmd) != 1:
        raise ValueError("a milter command is one byte, not %r" % (cmd,))
    return struct.pack("!I", len(data) + 1) + cmd + data


def _cstr(text: str) -> bytes:
    raw = text.encode(_ENCODING)
    if b"\0" in raw:
        raise ValueError("a NUL byte cannot be sent in a milter string: %r" % (text,))
    return raw + b"\0"


def _cstrs(items: Iterable[str]) -> bytes:
    return b"".join(_cstr(item) for item in items)


def encode_optneg(version: int = PROTOCOL_VERSION, actions: int = SMFI_CURR_ACTS,
                  protocol: int = SMFI_CURR_PROT) -> bytes:
    """SMFIC_OPTNEG: the protocol version and what the MTA offers."""
    return frame(SMFIC_OPTNEG, struct.pack("!III", version, actions, protocol))


def encode_macro(cmd: bytes, macros: Mapping[str, str]) -> bytes:
    """SMFIC_MACRO: macros for the command ``cmd`` that follows (name, value pairs)."""
    if len(cmd) != 1:
        raise ValueError("a macro stage is one command byte, not %r" % (cmd,))
    pairs: List[str] = []
    for name, value in macros.items():
        pairs.extend((name, value))
    return frame(SMFIC_MACRO, cmd + _cstrs(pairs))


def encode_connect(hostname: str, family: bytes = SMFIA_UNKNOWN, port: int = 0,
                   address: str = "") -> bytes:
    """SMFIC_CONNECT: client host name, family, port (network order), address."""
    if family not in (SMFIA_UNKNOWN, SMFIA_UNIX, SMFIA_INET, SMFIA_INET6):
        raise ValueError("unknown address family %r" % (family,))
    data = _cstr(hostname) + family
    if family != SMFIA_UNKNOWN:
        if not 0 <= port <= 0xFFFF:
            raise ValueError("port out of range: %d" % port)
        data += struct.pack("!H", port) + _cstr(address)
    return frame(SMFIC_CONNECT, data)


def encode_helo(name: str) -> bytes:
    return frame(SMFIC_HELO, _cstr(name))


def encode_mail(args: Sequence[str]) -> bytes:
    """SMFIC_MAIL: the sender (with angle brackets, as sendmail sends it) and ESMTP args."""
    if not args:
        raise ValueError("MAIL needs a sender")
    return frame(SMFIC_MAIL, _cstrs(args))


def encode_rcpt(args: Sequence[str]) -> bytes:
    """SMFIC_RCPT: the recipient (with angle brackets) and ESMTP args."""
    if not args:
        raise ValueError("RCPT needs a recipient")
    return frame(SMFIC_RCPT, _cstrs(args))


def encode_data() -> bytes:
    return frame(SMFIC_DATA)


def encode_header(name: str, value: str) -> bytes:
    return frame(SMFIC_HEADER, _cstr(name) + _cstr(value))


def encode_eoh() -> bytes:
    return frame(SMFIC_EOH)


def encode_body(chunk: bytes) -> bytes:
    """SMFIC_BODY: raw body bytes (CRLF line ends), at most MILTER_CHUNK_SIZE."""
    if len(chunk) > MILTER_CHUNK_SIZE:
        raise ValueError("body chunk of %d bytes exceeds %d" % (len(chunk), MILTER_CHUNK_SIZE))
    return frame(SMFIC_BODY, chunk)


def encode_eom() -> bytes:
    return frame(SMFIC_BODYEOB)


def encode_abort() -> bytes:
    return frame(SMFIC_ABORT)


def encode_quit() -> bytes:
    return frame(SMFIC_QUIT)


def encode_quit_nc() -> bytes:
    return frame(SMFIC_QUIT_NC)


def encode_unknown(command: str) -> bytes:
    return frame(SMFIC_UNKNOWN, _cstr(command))


# ---------------------------------------------------------------- decoding


def packet_length(header: bytes) -> int:
    """Validate a 4-byte length header; return the length (command byte + data)."""
    if len(header) != 4:
        raise ProtocolError("truncated length header: %d of 4 bytes" % len(header))
    (length,) = struct.unpack("!I", header)
    if length < 1:
        raise ProtocolError("packet length %d is too short (a packet holds at least its command byte)" % length)
    if length > MAX_PACKET:
        raise ProtocolError("packet length %d is too large (limit %d)" % (length, MAX_PACKET))
    return length


def split_packet(buffer: bytes) -> Optional[Tuple[bytes, bytes, bytes]]:
    """Take one packet off ``buffer``: (command, data, rest), or None if incomplete."""
    if len(buffer) < 4:
        return None
    length = packet_length(buffer[:4])
    if len(buffer) < 4 + length:
        return None
    return buffer[4:5], buffer[5:4 + length], buffer[4 + length:]


def response_name(cmd: bytes) -> str:
    """A readable name for a response byte, for error messages."""
    name = RESPONSE_NAMES.get(cmd)
    shown = cmd.decode("latin-1") if cmd[:1].isalnum() or cmd in (b"+", b"-") else "\\x%02x" % cmd[0]
    return "%r (%s)" % (shown, name) if name else "unknown response byte %r" % shown


def _text(raw: bytes) -> str:
    return raw.decode(_ENCODING, errors="replace")


def _strings(cmd: bytes, data: bytes, required: int, optional: int = 0) -> List[str]:
    """Split data made of NUL-terminated strings: ``required`` then up to ``optional`` more."""
    what = RESPONSE_NAMES[cmd]
    if not data.endswith(b"\0"):
        raise ProtocolError("%s data is not NUL-terminated" % what)
    parts = data[:-1].split(b"\0")
    if len(parts) < required:
        raise ProtocolError("%s needs %d string(s), got %d" % (what, required, len(parts)))
    if len(parts) > required + optional:
        raise ProtocolError("%s has %d string(s), at most %d allowed" % (what, len(parts), required + optional))
    return [_text(p) for p in parts]


def _index_and_strings(cmd: bytes, data: bytes) -> Tuple[int, str, str]:
    if len(data) < 4:
        raise ProtocolError("%s data too short for its header index" % RESPONSE_NAMES[cmd])
    (index,) = struct.unpack("!I", data[:4])
    name, value = _strings(cmd, data[4:], 2)
    return index, name, value


def parse_reply_code(text: str) -> Reply:
    """Decode SMFIR_REPLYCODE text (``550 5.7.1 Relaying denied``, maybe multi-line)."""
    lines = text.split("\r\n")
    codes, xcodes, texts = [], [], []
    for line in lines:
        match = _REPLY_LINE.match(line)
        if not match:
            raise ProtocolError("malformed reply code %r (want 4xx or 5xx, then text)" % text)
        codes.append(match.group(1))
        xcodes.append(match.group(3) or "")
        texts.append(match.group(4) or "")
    if len(set(codes)) != 1:
        raise ProtocolError("multi-line reply mixes codes: %r" % text)
    code, xcode = codes[0], xcodes[0]
    if xcode and xcode[0] != code[0]:
        raise ProtocolError("enhanced code %s does not match reply code %s" % (xcode, code))
    action = "tempfail" if code.startswith("4") else "reject"
    return Reply(action=action, code=code, xcode=xcode, text="\n".join(texts), raw=text)


def decode_optneg(data: bytes) -> OptNeg:
    """The milter's SMFIC_OPTNEG answer, with any SMFIR_SETSYMLIST macro lists."""
    if len(data) < 12:
        raise ProtocolError("optneg data is %d bytes, needs 12" % len(data))
    version, actions, protocol = struct.unpack("!III", data[:12])
    rest = data[12:]
    symlists = []
    while rest:
        if len(rest) < 5:
            raise ProtocolError("optneg macro list truncated")
        (stage,) = struct.unpack("!I", rest[:4])
        end = rest.find(b"\0", 4)
        if end < 0:
            raise ProtocolError("optneg macro list for stage %d is not NUL-terminated" % stage)
        symlists.append((stage, _text(rest[4:end])))
        rest = rest[end + 1:]
    return OptNeg(version=version, actions=actions, protocol=protocol, symlists=tuple(symlists))


def decode_response(cmd: bytes, data: bytes) -> Response:
    """Turn one response packet into a value; raise ProtocolError if it is malformed."""
    if cmd in DECISIONS:
        if data:
            raise ProtocolError("%s carries %d unexpected data bytes" % (response_name(cmd), len(data)))
        return Reply(action=DECISIONS[cmd])
    if cmd == SMFIR_PROGRESS:
        if data:
            raise ProtocolError("progress carries %d unexpected data bytes" % len(data))
        return Progress()
    if cmd == SMFIR_REPLYCODE:
        (text,) = _strings(cmd, data, 1)
        return parse_reply_code(text)
    if cmd == SMFIR_OPTNEG:
        return decode_optneg(data)
    if cmd == SMFIR_ADDRCPT:
        return AddRcpt(*_strings(cmd, data, 1))
    if cmd == SMFIR_ADDRCPT_PAR:
        return AddRcpt(*_strings(cmd, data, 1, 1))
    if cmd == SMFIR_DELRCPT:
        return DelRcpt(*_strings(cmd, data, 1))
    if cmd == SMFIR_ADDHEADER:
        return AddHeader(*_strings(cmd, data, 2))
    if cmd == SMFIR_INSHEADER:
        return InsHeader(*_index_and_strings(cmd, data))
    if cmd == SMFIR_CHGHEADER:
        return ChgHeader(*_index_and_strings(cmd, data))
    if cmd == SMFIR_CHGFROM:
        return ChgFrom(*_strings(cmd, data, 1, 1))
    if cmd == SMFIR_QUARANTINE:
        return Quarantine(*_strings(cmd, data, 1))
    if cmd == SMFIR_REPLBODY:
        return ReplBody(bytes(data))
    raise ProtocolError(response_name(cmd))
