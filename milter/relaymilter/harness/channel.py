"""NAME
    relaymilter.harness.channel - one milter connection as a stream of packets, every read bounded

DESCRIPTION
    The wire under relaymilter.harness.client: Channel.open connects to the
    milter's socket; send() writes a packet, read_packet() reads one whole
    packet before a deadline, and await_reply() reads until the milter
    decides a step, the way sendmail waits:

        SMFIR_PROGRESS      restarts the deadline, but one step never waits
                            longer than PROGRESS_CAP times the timeout, so no
                            call can hang
        modifications       collected, only at end of message
        the decision        returned as a Reply (carrying the modifications)

    What goes into the packets, and which steps and replies are sent or
    awaited at all, is the client's business (and harness.codec's).

DIAGNOSTICS
    MilterUnreachable from open() when the socket cannot be connected.
    ProtocolError naming the step when a send or read fails, the milter
    closes the connection (``milter closed the connection without
    answering``, ``truncated packet``), stays silent past the deadline
    (``timeout: ...``) or answers what the step does not allow.  The first
    such error is kept in Channel.broken: the stream is out of step from
    then on, and the client refuses further steps.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import List, NoReturn, Optional, Tuple

from relaymilter.harness import codec
from relaymilter.harness.errors import MilterUnreachable, ProtocolError
from relaymilter.harness.reply import Modification, OptNeg, Progress, Reply
from relaymilter.harness.sockspec import SocketSpec

log = logging.getLogger(__name__)

# A step may be extended by progress packets up to this many timeouts.
PROGRESS_CAP = 10


class Channel:
    """An open connection to a milter; see the module docstring."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.sock: Optional[socket.socket] = sock
        self.timeout = timeout
        self.broken: Optional[ProtocolError] = None

    @classmethod
    def open(cls, spec: SocketSpec, timeout: float) -> "Channel":
        """Connect to the milter at *spec*; MilterUnreachable if it cannot be reached."""
        sock = socket.socket(spec.family, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(spec.address)
        except OSError as err:
            sock.close()
            raise MilterUnreachable(spec.text, str(err) or err.__class__.__name__) from None
        if spec.family != socket.AF_UNIX:
            # Small request/answer packets: Nagle plus delayed ACKs would add 40 ms a step.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock, timeout)

    def close(self, farewell: bytes = b"") -> None:
        """Send *farewell* (QUIT) if the stream is still in step, and close the socket."""
        if self.sock is None:
            return
        if self.broken is None and farewell:
            try:
                self.sock.sendall(farewell)
            except OSError:
                pass  # the milter may already have hung up after a final reply
        self.sock.close()
        self.sock = None

    def fail(self, step: str, detail: str) -> NoReturn:
        """Raise ProtocolError(detail, step), and keep it: the stream is out of step from now on."""
        err = ProtocolError(detail, step)
        self.broken = err
        raise err

    def send(self, step: str, packet: bytes) -> None:
        """Write *packet* whole (within the timeout)."""
        assert self.sock is not None
        log.debug("%s: send %r", step, packet[:80])
        try:
            self.sock.settimeout(self.timeout)
            self.sock.sendall(packet)
        except socket.timeout:
            self.fail(step, "milter did not take the command within %gs" % self.timeout)
        except OSError as err:
            self.fail(step, "cannot send to milter: %s" % err)

    def await_reply(self, step: str, allow_skip: bool = False, allow_modifications: bool = False) -> Reply:
        """Read until the milter decides *step*; *allow_skip*: skip was negotiated and this is a body chunk."""
        started = time.monotonic()
        deadline = started + self.timeout
        modifications: List[Modification] = []
        while True:
            cmd, data = self.read_packet(step, deadline)
            try:
                response = codec.decode_response(cmd, data)
            except ProtocolError as err:
                self.fail(step, err.detail)
            if isinstance(response, Progress):
                deadline = min(time.monotonic() + self.timeout, started + PROGRESS_CAP * self.timeout)
                continue
            if isinstance(response, Modification):
                if not allow_modifications:
                    self.fail(step, "modification %s is only allowed at end of message" % codec.response_name(cmd))
                modifications.append(response)
                continue
            if isinstance(response, OptNeg):
                self.fail(step, "unexpected optneg packet")
            assert isinstance(response, Reply)
            if response.action == "skip" and not allow_skip:
                self.fail(step, "skip is only allowed after a body chunk, when negotiated (SMFIP_SKIP)")
            if modifications:
                return Reply(response.action, response.code, response.xcode, response.text, response.raw,
                             modifications=tuple(modifications))
            return response

    def read_packet(self, step: str, deadline: float) -> Tuple[bytes, bytes]:
        """One whole packet as (command byte, data), read before *deadline* (time.monotonic)."""
        header = self._read_exact(step, 4, deadline, "packet header")
        try:
            length = codec.packet_length(header)
        except ProtocolError as err:
            self.fail(step, err.detail)
        body = self._read_exact(step, length, deadline, "packet")
        log.debug("%s: received %r", step, (header + body)[:80])
        return body[:1], body[1:]

    def _read_exact(self, step: str, size: int, deadline: float, what: str) -> bytes:
        assert self.sock is not None
        buf = bytearray()
        while len(buf) < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._timeout(step, buf, size, what)
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(min(size - len(buf), 65536))
            except socket.timeout:
                self._timeout(step, buf, size, what)
            except ConnectionResetError:
                chunk = b""  # a reset is the milter hanging up, only more abruptly
            except OSError as err:
                self.fail(step, "cannot read from milter: %s" % err)
            if not chunk:
                if not buf and what == "packet header":
                    self.fail(step, "milter closed the connection without answering")
                self.fail(step, "truncated %s: milter closed the connection after %d of %d bytes"
                          % (what, len(buf), size))
            buf.extend(chunk)
        return bytes(buf)

    def _timeout(self, step: str, buf: bytearray, size: int, what: str) -> NoReturn:
        if buf or what == "packet":
            self.fail(step, "timeout: %s incomplete after %gs (%d of %d bytes)"
                      % (what, self.timeout, len(buf), size))
        self.fail(step, "timeout: no reply within %gs" % self.timeout)

