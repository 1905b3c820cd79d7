"""A scriptable milter on a loopback socket, in a thread, for the harness tests.

It frames packets with its own struct calls (never the harness codec), so a
bug in the codec cannot hide itself in both ends of a test.

    def handler(conn):
        conn.optneg(protocol=0)              # answer option negotiation
        cmd, data = conn.read()              # next packet (None at EOF)
        conn.send(pkt(b"c"))

    with FakeMilter(handler) as fake:        # inet:PORT@127.0.0.1
        with MilterSession(fake.spec, timeout=1) as s: ...
    fake.received                            # every (cmd, data) it read

serve() is a ready-made well-behaved milter: it answers every command with
what ``answer(cmd, data)`` returns and honours its own NR flags.
"""

from __future__ import annotations

import os
import socket
import struct
import tempfile
import threading
from typing import Callable, List, Optional, Tuple

Packet = Tuple[bytes, bytes]


def pkt(cmd: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">L", len(data) + 1) + cmd + data


def optneg_data(version: int = 6, actions: int = 0x1FF, protocol: int = 0, extra: bytes = b"") -> bytes:
    return struct.pack(">LLL", version, actions, protocol) + extra


class Conn:
    def __init__(self, sock: socket.socket, received: List[Packet], stop: threading.Event) -> None:
        self.sock = sock
        self.received = received
        self.stop = stop
        sock.settimeout(10.0)

    def _exact(self, n: int) -> Optional[bytes]:
        buf = b""
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except OSError:
                return None
            if not chunk:
                return None
            buf += chunk
        return buf

    def read(self) -> Optional[Packet]:
        head = self._exact(4)
        if head is None:
            return None
        (length,) = struct.unpack(">L", head)
        body = self._exact(length)
        if body is None:
            return None
        packet = (body[:1], body[1:])
        self.received.append(packet)
        return packet

    def send(self, raw: bytes) -> None:
        self.sock.sendall(raw)

    def optneg(self, version: int = 6, actions: int = 0x1FF, protocol: int = 0, extra: bytes = b"") -> Packet:
        packet = self.read()
        assert packet is not None and packet[0] == b"O", packet
        self.send(pkt(b"O", optneg_data(version, actions, protocol, extra)))
        return packet

    def hang(self) -> None:
        """Never answer: wait until the test is over."""
        self.stop.wait(30)


# Commands that get no reply, and the NR flag that silences each of the others.
NO_REPLY = {b"D", b"A", b"Q", b"K"}
NR_FLAGS = {b"C": 0x1000, b"H": 0x2000, b"M": 0x4000, b"R": 0x8000, b"T": 0x10000,
            b"U": 0x20000, b"N": 0x40000, b"B": 0x80000, b"L": 0x80}


def serve(conn: Conn, answer: Callable[[bytes, bytes], bytes] = lambda c, d: pkt(b"c"),
          protocol: int = 0, extra: bytes = b"") -> None:
    conn.optneg(protocol=protocol, extra=extra)
    while True:
        packet = conn.read()
        if packet is None or packet[0] == b"Q":
            return
        cmd, data = packet
        if cmd in NO_REPLY or protocol & NR_FLAGS.get(cmd, 0):
            continue
        conn.send(answer(cmd, data))


class FakeMilter:
    """Listen on 127.0.0.1 (or ::1, or a unix socket), run ``handler`` for each connection."""

    def __init__(self, handler: Callable[[Conn], None], unix: bool = False, inet6: bool = False) -> None:
        self.handler = handler
        self.unix = unix
        self.inet6 = inet6
        self.received: List[Packet] = []
        self.connections = 0
        self.errors: List[BaseException] = []
        self.stop = threading.Event()
        self._threads: List[threading.Thread] = []

    def __enter__(self) -> "FakeMilter":
        if self.unix:
            self._dir = tempfile.mkdtemp(prefix="rmh", dir="/tmp")
            self.path = os.path.join(self._dir, "m.sock")
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(self.path)
            self.spec = "unix:" + self.path
        elif self.inet6:
            self.listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            self.listener.bind(("::1", 0))
            self.spec = "inet6:%d@[::1]" % self.listener.getsockname()[1]
        else:
            self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.listener.bind(("127.0.0.1", 0))
            self.spec = "inet:%d@127.0.0.1" % self.listener.getsockname()[1]
        self.listener.listen(8)
        self.listener.settimeout(0.1)
        accept = threading.Thread(target=self._accept_loop, daemon=True)
        accept.start()
        self._threads.append(accept)
        return self

    def _accept_loop(self) -> None:
        while not self.stop.is_set():
            try:
                sock, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.connections += 1
            worker = threading.Thread(target=self._run, args=(sock,), daemon=True)
            worker.start()
            self._threads.append(worker)

    def _run(self, sock: socket.socket) -> None:
        try:
            self.handler(Conn(sock, self.received, self.stop))
        except (OSError, AssertionError) as err:
            self.errors.append(err)
        finally:
            sock.close()

    def commands(self) -> List[bytes]:
        return [cmd for cmd, _ in self.received]

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() at once on Linux
        except OSError:
            pass
        self.listener.close()
        for thread in self._threads:
            thread.join(5)
        if self.unix:
            if os.path.exists(self.path):
                os.unlink(self.path)
            os.rmdir(self._dir)
