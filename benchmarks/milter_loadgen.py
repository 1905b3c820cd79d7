"""The load side of benchmarks/milter_load.py: session scripts and the generator process.

A session is what sendmail sends a milter for one short SMTP connection (optneg,
macros + connect, mail, three RCPTs, abort + quit), encoded once with
relaymilter.harness.codec, honouring the steps and replies the milter declined in
option negotiation, each awaited answer held as the exact packet that must come
back. Generator runs a few such sessions at a time from one process over
non-blocking unix sockets (one selector loop, no threads, so one process costs
little CPU) and records RCPT round trips. What can go wrong is counted, never
raised: a wrong answer, a close or reset instead of an answer, silence for
STEP_TIMEOUT seconds, a refused connection; the first MAX_ERRORS_SHOWN are kept
as text for the report.
"""

from __future__ import annotations

import resource
import selectors
import socket
import struct
import time
from array import array
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from relaymilter.harness import codec
from relaymilter.harness import protocol as proto
from relaymilter.harness.errors import ProtocolError
from relaymilter.harness.reply import OptNeg

LOCAL, REMOTE = "<user%d@local.test>", "<friend%d@remote.example>"
DENIED = "550 5.7.1 Relaying denied"        # DESIGN.md section 3, checked byte for byte
CONTINUE = "continue"
STEP_TIMEOUT = 5.0                          # a reply later than this is counted as missing
MAX_ERRORS_SHOWN = 10


@dataclass(frozen=True)
class Exchange:
    """Bytes sent in one go and the one packet that must come back."""

    label: str
    send: bytes
    expect: bytes
    want: str
    rcpt: bool


@dataclass(frozen=True)
class Script:
    steps: Tuple[Exchange, ...]
    tail: bytes                              # abort + quit: no reply, then the milter closes


@dataclass(frozen=True)
class Kind:
    """One session shape: client address, recipients and the answer each must get."""

    client: str
    rcpts: Tuple[Tuple[str, str], ...]      # (recipient, expected answer)


def db_address(i: int) -> str:
    return "10.%d.%d.%d" % (i >> 16 & 255, i >> 8 & 255, i & 255)


def session_kinds(count: int, entries: int, minimal: bool) -> List[Kind]:
    """Alternate a client listed in relayers.db and one that is not (172.20/16 is never listed)."""
    kinds = []
    for i in range(count):
        if i % 2 == 0:
            client = db_address(i * 7919 % entries)
            rcpts: Tuple[Tuple[str, str], ...] = ((LOCAL % i, CONTINUE), (REMOTE % i, CONTINUE),
                                                  (REMOTE % (i + 1), CONTINUE))
        else:
            client = "172.20.%d.%d" % (i >> 8 & 255, i & 255)
            rcpts = ((REMOTE % i, DENIED), (LOCAL % i, CONTINUE), (REMOTE % (i + 1), DENIED))
        if minimal:
            rcpts = tuple((r, CONTINUE) for r, _ in rcpts)
        kinds.append(Kind(client, rcpts))
    return kinds


def expected_packet(want: str) -> bytes:
    if want == CONTINUE:
        return codec.frame(proto.SMFIR_CONTINUE)
    return codec.frame(proto.SMFIR_REPLYCODE, want.encode("ascii") + b"\0")


def build_script(kind: Kind, neg: OptNeg, n: int) -> Script:
    """The packets sendmail sends for this session, honouring what the milter negotiated."""
    if neg.symlists:
        raise SystemExit("milter_load: error: the milter asks for macro lists (SETSYMLIST); not supported")
    host = "host%d.client.example" % n
    bare = lambda a: a.strip("<>")  # noqa: E731
    domain = lambda a: bare(a).rpartition("@")[2]  # noqa: E731
    sender = "<sender%d@client.example>" % n
    stages = [
        ("CONNECT", proto.SMFIC_CONNECT,
         codec.encode_connect("[%s]" % kind.client, proto.SMFIA_INET, 40000 + n % 20000, kind.client),
         {"j": "mx.local.test", "{daemon_name}": "MTA", "{client_addr}": kind.client, "{client_name}": host},
         proto.SMFIP_NOCONNECT, proto.SMFIP_NR_CONN, CONTINUE),
        ("HELO", proto.SMFIC_HELO, codec.encode_helo(host), {}, proto.SMFIP_NOHELO, proto.SMFIP_NR_HELO, CONTINUE),
        ("MAIL %s" % sender, proto.SMFIC_MAIL, codec.encode_mail([sender]),
         {"i": "4Q%06dX" % n, "{mail_addr}": bare(sender), "{mail_mailer}": "esmtp", "{mail_host}": domain(sender)},
         proto.SMFIP_NOMAIL, proto.SMFIP_NR_MAIL, CONTINUE),
    ]
    for rcpt, want in kind.rcpts:
        stages.append(("RCPT %s" % rcpt, proto.SMFIC_RCPT, codec.encode_rcpt([rcpt]),
                       {"{rcpt_addr}": bare(rcpt), "{rcpt_mailer}": "esmtp", "{rcpt_host}": domain(rcpt) + "."},
                       proto.SMFIP_NORCPT, proto.SMFIP_NR_RCPT, want))
    offer = codec.encode_optneg()
    steps = [Exchange("OPTNEG", offer, codec.frame(proto.SMFIR_OPTNEG, struct.pack("!III", neg.version,
                                                                                  neg.actions, neg.protocol)),
                      "optneg", False)]
    pending = b""
    for label, cmd, packet, macros, no_flag, nr_flag, want in stages:
        pending += codec.encode_macro(cmd, macros) if macros else b""   # sent even for a declined step
        if neg.protocol & no_flag:
            continue
        pending += packet
        if neg.protocol & nr_flag:
            continue
        steps.append(Exchange("%s from %s" % (label, kind.client), pending, expected_packet(want), want,
                              cmd == proto.SMFIC_RCPT))
        pending = b""
    return Script(tuple(steps), pending + codec.encode_abort() + codec.encode_quit())


def describe(packet: bytes) -> str:
    try:
        return str(codec.decode_response(packet[4:5], packet[5:]))
    except ProtocolError as err:
        return "garbage (%s): %r" % (err.detail, packet[:60])


# ------------------------------------------------------------------ the generator process


class Slot:
    """One concurrent session position: its socket and where its script stands."""

    __slots__ = ("sock", "script", "step", "buf", "sent", "since")

    def __init__(self) -> None:
        self.sock: Optional[socket.socket] = None
        self.script: Script
        self.step, self.buf, self.sent, self.since = 0, b"", 0, 0.0

    def label(self) -> str:
        return self.script.steps[self.step].label if self.step < len(self.script.steps) else "QUIT"


class Generator:
    """Keep nslots sessions going on one unix socket, from start_at until end_at (one process)."""

    def __init__(self, path: str, scripts: Sequence[Script], nslots: int) -> None:
        self.path, self.scripts = path, scripts
        self.slots = [Slot() for _ in range(nslots)]
        self.sel = selectors.DefaultSelector()
        self.latencies = array("q")        # RCPT round trips, ns
        self.counts = {"sessions": 0, "rcpts": 0, "errors": 0}
        self.errors: List[str] = []
        self.next_script = 0

    def error(self, what: str) -> None:
        self.counts["errors"] += 1
        if len(self.errors) < MAX_ERRORS_SHOWN:
            self.errors.append(what)

    def close(self, slot: Slot, error: Optional[str] = None) -> None:
        if error is not None:
            self.error(error)
        if slot.sock is not None:
            self.sel.unregister(slot.sock)
            slot.sock.close()
            slot.sock = None

    def send(self, slot: Slot, data: bytes) -> None:
        assert slot.sock is not None
        slot.sent, slot.since = time.perf_counter_ns(), time.monotonic()
        try:
            sent = slot.sock.send(data)
        except OSError as err:
            return self.close(slot, "%s: cannot send: %s" % (slot.label(), err))
        if sent != len(data):              # a few hundred bytes into an empty socket buffer: never partial
            self.close(slot, "%s: short write (%d of %d bytes)" % (slot.label(), sent, len(data)))
        return None

    def begin(self, slot: Slot) -> None:
        slot.script = self.scripts[self.next_script % len(self.scripts)]
        self.next_script += 1
        slot.step, slot.buf = 0, b""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(STEP_TIMEOUT)
        try:
            sock.connect(self.path)
        except OSError as err:
            sock.close()
            self.error("connect to %s: %s" % (self.path, err))
            time.sleep(0.01)               # a milter refusing connections must not make this loop spin
            return
        sock.setblocking(False)
        slot.sock = sock
        self.sel.register(sock, selectors.EVENT_READ, slot)
        self.send(slot, slot.script.steps[0].send)

    def readable(self, slot: Slot) -> None:
        assert slot.sock is not None
        try:
            data = slot.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        except OSError as err:
            return self.close(slot, "%s: recv: %s" % (slot.label(), err))
        steps = slot.script.steps
        if slot.step == len(steps):        # after abort + quit only the milter's close may come
            if data:
                return self.close(slot, "data after QUIT: %s" % describe(data))
            self.counts["sessions"] += 1
            return self.close(slot)
        step = steps[slot.step]
        if not data:
            return self.close(slot, "%s: milter closed the connection instead of answering %s" % (step.label, step.want))
        buf = slot.buf = slot.buf + data
        if len(buf) < 4 or len(buf) < 4 + struct.unpack("!I", buf[:4])[0]:
            return None                    # wait for the rest of the packet
        if buf != step.expect:
            return self.close(slot, "%s: expected %s, got %s" % (step.label, step.want, describe(buf)))
        if step.rcpt:
            self.latencies.append(time.perf_counter_ns() - slot.sent)
            self.counts["rcpts"] += 1
        slot.step += 1
        slot.buf = b""
        return self.send(slot, steps[slot.step].send if slot.step < len(steps) else slot.script.tail)

    def run(self, start_at: float, end_at: float) -> dict:
        time.sleep(max(0.0, start_at - time.monotonic()))
        before = resource.getrusage(resource.RUSAGE_SELF)
        while True:
            now = time.monotonic()
            idle = [s for s in self.slots if s.sock is None]
            if now < end_at:
                for slot in idle:
                    self.begin(slot)
            elif len(idle) == len(self.slots):
                break
            for key, _ in self.sel.select(0.25):
                self.readable(key.data)
            now = time.monotonic()
            for slot in self.slots:
                if slot.sock is not None and now - slot.since > STEP_TIMEOUT:
                    self.close(slot, "%s: no answer within %gs" % (slot.label(), STEP_TIMEOUT))
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return {**self.counts, "errors_shown": self.errors, "latencies": self.latencies.tobytes(), "cpu": cpu,
                "ended": time.monotonic()}


def generate(path: str, scripts: Sequence[Script], nslots: int, start_at: float, end_at: float, out) -> None:
    """The generator process: run, then send the figures back through the pipe *out*."""
    out.send(Generator(path, scripts, nslots).run(start_at, end_at))
    out.close()
