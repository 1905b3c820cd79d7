"""NAME
    relaymilter.harness.client - talk to a running milter the way an MTA does

DESCRIPTION
    MilterSession opens the milter's socket, negotiates options (protocol
    version 6) and then performs one step per call, returning the milter's
    decoded Reply:

        with MilterSession("inet:8894@127.0.0.1", timeout=5.0) as s:
            s.connect(client_ip="127.0.0.5")
            s.helo("client.example")
            s.mail("<alice@example.com>", auth="alice")
            r = s.rcpt("<bob@remote.example>")     # str(r) '550 5.7.1 Relaying denied'

    It honours what the milter negotiated, as sendmail does: a step declined
    with SMFIP_NO* is not sent (its macros still are) and reports continue;
    a reply declined with SMFIP_NR_* is not waited for. Macro lists the
    milter asked for (SMFIR_SETSYMLIST) restrict the macros sent per stage.
    Default macros follow sendmail's: j, {daemon_name}, {client_addr},
    {client_name} at connect; i, {mail_addr}, {mail_mailer}, {mail_host},
    {auth_authen}, {auth_type} at MAIL; {rcpt_addr}, {rcpt_mailer},
    {rcpt_host} at RCPT. MAIL and RCPT arguments are sent with angle
    brackets, as sendmail passes them.

    The packets go through a harness.channel.Channel (MilterSession.channel
    while open; a test may use it to send a packet no MTA would), where
    every read has a deadline (``timeout`` seconds per step): SMFIR_PROGRESS
    restarts it, as in sendmail, but one step never waits longer than
    PROGRESS_CAP times the timeout, so no call can hang.

DIAGNOSTICS
    MilterUnreachable when the socket cannot be opened; ProtocolError, naming
    the step (``RCPT <bob@x>: protocol error: ...``), when the milter answers
    garbage, an unexpected response, closes the connection or stays silent
    past the deadline. After a ProtocolError the session is unusable (the
    stream is out of step); further steps raise at once.
"""

from __future__ import annotations

import logging
import socket
import time
import uuid
from typing import Dict, Mapping, Optional, Set, Tuple

from relaymilter.harness import codec
from relaymilter.harness import protocol as proto
from relaymilter.harness.channel import Channel
from relaymilter.harness.errors import ProtocolError
from relaymilter.harness.reply import OptNeg, Reply
from relaymilter.harness.sockspec import parse_socket_spec
from relaymilter.ipaddr import parse_ip

log = logging.getLogger(__name__)

Macros = Optional[Mapping[str, Optional[str]]]

_FLAG_NAMES = {
    proto.SMFIP_NOCONNECT: "SMFIP_NOCONNECT", proto.SMFIP_NOHELO: "SMFIP_NOHELO",
    proto.SMFIP_NOMAIL: "SMFIP_NOMAIL", proto.SMFIP_NORCPT: "SMFIP_NORCPT",
    proto.SMFIP_NODATA: "SMFIP_NODATA", proto.SMFIP_NOHDRS: "SMFIP_NOHDRS",
    proto.SMFIP_NOEOH: "SMFIP_NOEOH", proto.SMFIP_NOBODY: "SMFIP_NOBODY",
    proto.SMFIP_NOUNKNOWN: "SMFIP_NOUNKNOWN",
    proto.SMFIP_NR_CONN: "SMFIP_NR_CONN", proto.SMFIP_NR_HELO: "SMFIP_NR_HELO",
    proto.SMFIP_NR_MAIL: "SMFIP_NR_MAIL", proto.SMFIP_NR_RCPT: "SMFIP_NR_RCPT",
    proto.SMFIP_NR_DATA: "SMFIP_NR_DATA", proto.SMFIP_NR_HDR: "SMFIP_NR_HDR",
    proto.SMFIP_NR_EOH: "SMFIP_NR_EOH", proto.SMFIP_NR_BODY: "SMFIP_NR_BODY",
    proto.SMFIP_NR_UNKN: "SMFIP_NR_UNKN",
}


def bracket(address: str) -> str:
    """``bob@x`` -> ``<bob@x>``; ``<bob@x>`` and ``<>`` unchanged; empty -> ``<>``."""
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        return address
    return "<%s>" % address


def address_parts(address: str) -> Tuple[str, str]:
    """(address without brackets, its domain or '') for the {mail_*}/{rcpt_*} macros."""
    bare = bracket(address)[1:-1]
    _, at, host = bare.rpartition("@")
    return bare, host if at else ""


def _macro_key(name: str) -> str:
    return name[1:-1] if name.startswith("{") and name.endswith("}") else name


class MilterSession:
    """One MTA-side milter connection; see the module docstring."""

    def __init__(self, socket_spec: str, timeout: float = 10.0, *,
                 version: int = proto.PROTOCOL_VERSION, actions: int = proto.SMFI_CURR_ACTS,
                 protocol: int = proto.SMFI_CURR_PROT, mta_hostname: Optional[str] = None,
                 daemon_name: str = "MTA") -> None:
        self.spec = parse_socket_spec(socket_spec)
        if timeout <= 0:
            raise ValueError("timeout must be positive, not %r" % timeout)
        self.timeout = float(timeout)
        self.offer = OptNeg(version=version, actions=actions, protocol=protocol)
        self.mta_hostname = mta_hostname or socket.gethostname()
        self.daemon_name = daemon_name
        self.negotiated: Optional[OptNeg] = None
        self.channel: Optional[Channel] = None     # the open connection; None before open()
        self._symlists: Dict[bytes, Set[str]] = {}
        self._queue_seq = 0
        self._queue_base = uuid.uuid4().hex[:8].upper()

    # ------------------------------------------------------------ lifecycle

    def __enter__(self) -> "MilterSession":
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def open(self) -> OptNeg:
        """Connect to the milter and negotiate; return what the milter agreed to."""
        chan = self.channel = Channel.open(self.spec, self.timeout)
        try:
            return self._negotiate(chan)
        except ProtocolError:
            self.close()  # no QUIT: the stream is out of step
            raise

    def _negotiate(self, chan: Channel) -> OptNeg:
        step = "OPTNEG"
        chan.send(step, codec.encode_optneg(self.offer.version, self.offer.actions, self.offer.protocol))
        cmd, data = chan.read_packet(step, time.monotonic() + self.timeout)
        if cmd != proto.SMFIR_OPTNEG:
            chan.fail(step, "expected the optneg answer, got %s" % codec.response_name(cmd))
        try:
            answer = codec.decode_optneg(data)
        except ProtocolError as err:
            chan.fail(step, err.detail)
        if not 2 <= answer.version <= self.offer.version:
            chan.fail(step, "milter protocol version %d is not supported (MTA offers 2-%d)"
                      % (answer.version, self.offer.version))
        if answer.actions & ~self.offer.actions:
            chan.fail(step, "milter asks for actions 0x%x not offered (0x%x)"
                      % (answer.actions, self.offer.actions))
        if answer.protocol & ~self.offer.protocol:
            chan.fail(step, "milter asks for protocol flags 0x%x not offered (0x%x)"
                      % (answer.protocol, self.offer.protocol))
        for stage, names in answer.symlists:
            cmd_byte = proto.MACRO_STAGE_COMMANDS.get(stage)
            if cmd_byte is not None:
                self._symlists[cmd_byte] = {_macro_key(n) for n in names.split()}
        self.negotiated = answer
        log.debug("negotiated version %d actions 0x%x protocol 0x%x",
                  answer.version, answer.actions, answer.protocol)
        return answer

    def close(self) -> None:
        """Say QUIT (if the stream is still in step) and close the socket."""
        if self.channel is not None:
            self.channel.close(codec.encode_quit())

    # ---------------------------------------------------------------- steps

    def connect(self, client_ip: Optional[str] = None, hostname: Optional[str] = None, *,
                port: int = 0, unix_path: Optional[str] = None, if_addr: Optional[str] = None,
                macros: Macros = None) -> Reply:
        """SMFIC_CONNECT for a client at ``client_ip`` (IPv4/IPv6), a unix socket, or unknown."""
        if client_ip is not None:
            addr = parse_ip(client_ip)
            text = str(addr)
            # sendmail reports an IPv4-mapped client as family inet, dotted quad.
            family = proto.SMFIA_INET if addr.version == 4 else proto.SMFIA_INET6
            literal = "[%s]" % text if addr.version == 4 else "[IPv6:%s]" % text
            hostname = hostname or literal
            label = "CONNECT %s" % text
        elif unix_path is not None:
            family, text, port = proto.SMFIA_UNIX, unix_path, 0
            hostname = hostname or "localhost"
            label = "CONNECT unix:%s" % unix_path
        else:
            family, text, port = proto.SMFIA_UNKNOWN, "", 0
            hostname = hostname or "unknown"
            label = "CONNECT unknown"
        defaults: Dict[str, Optional[str]] = {"j": self.mta_hostname, "{daemon_name}": self.daemon_name,
                                              "{client_name}": hostname}
        if text and family != proto.SMFIA_UNIX:
            defaults["{client_addr}"] = text
        # sendmail leaves {if_addr} unset for loopback connections; only a caller knows the interface.
        if if_addr is not None:
            defaults["{if_addr}"] = if_addr
        return self._step(label, proto.SMFIC_CONNECT, codec.encode_connect(hostname, family, port, text),
                          self._merge(defaults, macros), proto.SMFIP_NOCONNECT, proto.SMFIP_NR_CONN)

    def helo(self, name: str, macros: Macros = None) -> Reply:
        return self._step("HELO %s" % name, proto.SMFIC_HELO, codec.encode_helo(name),
                          self._merge({}, macros), proto.SMFIP_NOHELO, proto.SMFIP_NR_HELO)

    def mail(self, sender: str, *esmtp_args: str, auth: Optional[str] = None,
             auth_type: str = "PLAIN", macros: Macros = None) -> Reply:
        """SMFIC_MAIL; ``auth`` sets {auth_authen}/{auth_type} as after a successful AUTH."""
        sender = bracket(sender)
        bare, host = address_parts(sender)
        self._queue_seq += 1
        defaults: Dict[str, Optional[str]] = {
            "i": "%s%06d" % (self._queue_base, self._queue_seq),
            "{mail_addr}": bare,
            "{mail_mailer}": "esmtp" if host else "local",
            "{mail_host}": host,
        }
        if auth:
            defaults["{auth_authen}"] = auth
            defaults["{auth_type}"] = auth_type
        return self._step("MAIL %s" % sender, proto.SMFIC_MAIL, codec.encode_mail([sender, *esmtp_args]),
                          self._merge(defaults, macros), proto.SMFIP_NOMAIL, proto.SMFIP_NR_MAIL)

    def rcpt(self, recipient: str, *esmtp_args: str, macros: Macros = None) -> Reply:
        recipient = bracket(recipient)
        bare, host = address_parts(recipient)
        defaults: Dict[str, Optional[str]] = {
            "{rcpt_addr}": bare,
            "{rcpt_mailer}": "esmtp" if host else "local",
            # sendmail's canonical host name carries a trailing dot; a literal does not.
            "{rcpt_host}": host + "." if host and not host.startswith("[") else host,
        }
        return self._step("RCPT %s" % recipient, proto.SMFIC_RCPT, codec.encode_rcpt([recipient, *esmtp_args]),
                          self._merge(defaults, macros), proto.SMFIP_NORCPT, proto.SMFIP_NR_RCPT)

    def data(self, macros: Macros = None) -> Reply:
        return self._step("DATA", proto.SMFIC_DATA, codec.encode_data(), self._merge({}, macros),
                          proto.SMFIP_NODATA, proto.SMFIP_NR_DATA)

    def header(self, name: str, value: str) -> Reply:
        wire_value = value
        if self._protocol() & proto.SMFIP_HDR_LEADSPC and not value[:1].isspace():
            wire_value = " " + value  # the milter asked for the value as it stands after the colon
        return self._step("HEADER %s: %s" % (name, value), proto.SMFIC_HEADER,
                          codec.encode_header(name, wire_value), {}, proto.SMFIP_NOHDRS, proto.SMFIP_NR_HDR)

    def eoh(self, macros: Macros = None) -> Reply:
        return self._step("EOH", proto.SMFIC_EOH, codec.encode_eoh(), self._merge({}, macros),
                          proto.SMFIP_NOEOH, proto.SMFIP_NR_EOH)

    def body(self, chunk: bytes) -> Reply:
        """One SMFIC_BODY chunk (CRLF line ends, at most 65535 bytes); may answer skip."""
        return self._step("BODY %d bytes" % len(chunk), proto.SMFIC_BODY, codec.encode_body(chunk), {},
                          proto.SMFIP_NOBODY, proto.SMFIP_NR_BODY, allow_skip=True)

    def end_of_message(self, macros: Macros = None) -> Reply:
        """SMFIC_BODYEOB; the Reply carries any modification requests, in order."""
        return self._step("EOM", proto.SMFIC_BODYEOB, codec.encode_eom(), self._merge({}, macros),
                          0, 0, allow_modifications=True)

    eom = end_of_message

    def unknown(self, command: str) -> Reply:
        return self._step("UNKNOWN %s" % command, proto.SMFIC_UNKNOWN, codec.encode_unknown(command), {},
                          proto.SMFIP_NOUNKNOWN, proto.SMFIP_NR_UNKN)

    def abort(self) -> None:
        """SMFIC_ABORT: end the current message; the milter sends no reply."""
        self._check_usable("ABORT").send("ABORT", codec.encode_abort())

    def quit(self) -> None:
        """SMFIC_QUIT and close; same as leaving the ``with`` block."""
        self.close()

    # ------------------------------------------------------------- internals

    def _protocol(self) -> int:
        return self.negotiated.protocol if self.negotiated else 0

    def _merge(self, defaults: Dict[str, Optional[str]], macros: Macros) -> Dict[str, str]:
        merged = dict(defaults)
        if macros:
            merged.update(macros)
        return {k: v for k, v in merged.items() if v is not None}

    def _check_usable(self, step: str) -> Channel:
        chan = self.channel
        if chan is not None and chan.broken is not None:
            raise ProtocolError("session already failed at %s" % (chan.broken.step or "OPTNEG"), step)
        if chan is None or chan.sock is None or self.negotiated is None:
            raise ProtocolError("session is not open", step)
        return chan

    def _step(self, step: str, cmd: bytes, packet: bytes, macros: Dict[str, str], no_flag: int,
              nr_flag: int, allow_skip: bool = False, allow_modifications: bool = False) -> Reply:
        chan = self._check_usable(step)
        wanted = self._symlists.get(cmd)
        if wanted is not None:
            macros = {k: v for k, v in macros.items() if _macro_key(k) in wanted}
        # Macros go even when the step itself is declined, as sendmail sends them.
        macro_packet = codec.encode_macro(cmd, macros) if macros else b""
        protocol = self._protocol()
        if protocol & no_flag:
            if macro_packet:
                chan.send(step, macro_packet)
            return Reply("continue", sent=False, note="not sent: declined by the milter, %s" % _FLAG_NAMES[no_flag])
        chan.send(step, macro_packet + packet)
        if protocol & nr_flag:
            return Reply("continue", awaited=False,
                         note="no reply awaited: declined by the milter, %s" % _FLAG_NAMES[nr_flag])
        return chan.await_reply(step, allow_skip and bool(protocol & proto.SMFIP_SKIP), allow_modifications)
