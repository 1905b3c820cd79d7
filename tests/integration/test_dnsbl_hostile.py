"""DNS list lookups against a nameserver that misbehaves and a local user who interferes.

A hostile nameserver on loopback (a plain UDP and TCP socket here, so it can
send what no DNS server library would): garbage, answers with another ID or
for another name, truncated answers, a huge TXT over TCP, silence. A local
user who reads the milter's query port from /proc/net/udp sends datagrams
to it from an ordinary socket. Every lookup must end in the list's real
answer or in an error - never a listing made up by the attacker, never an
error caused by a stray datagram.

The lookups run in each Python that can run relaymilter here: the test's
own and Debian's /usr/bin/python3 with python3-dnspython (what the .deb
runs on), whose dnspython 2.3 resolver fails a query on any stray datagram.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import dns.message
import dns.rcode
import dns.rrset
import pytest

MILTER = str(Path(__file__).resolve().parents[2] / "milter")
HUGE = ["x%03d " % i + "y" * 200 for i in range(200)]        # ~41 KB of TXT: only TCP carries it


class HostileServer:
    """UDP and TCP on 127.0.0.1:<port>; what it does depends on the query name's first label."""

    def __init__(self) -> None:
        for _ in range(50):     # a free UDP port whose TCP twin is free too (others test at the same time)
            self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.udp.bind(("127.0.0.1", 0))
            self.port = self.udp.getsockname()[1]
            self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                self.tcp.bind(("127.0.0.1", self.port))
                break
            except OSError:
                self.tcp.close()
                self.udp.close()
        else:
            raise RuntimeError("no port free for both UDP and TCP on 127.0.0.1")
        self.tcp.listen(8)
        for sock in (self.udp, self.tcp):
            sock.settimeout(0.05)       # the serving threads look at self.stop this often
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._serve_udp, daemon=True),
                        threading.Thread(target=self._serve_tcp, daemon=True)]

    def __enter__(self) -> "HostileServer":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(5)
        self.udp.close()
        self.tcp.close()

    @staticmethod
    def answer(query: dns.message.Message, address: str = "127.0.0.2", txt: bool = True) -> dns.message.Message:
        r = dns.message.make_response(query)
        q = query.question[0]
        if q.rdtype == 1:
            r.answer.append(dns.rrset.from_text(q.name, 300, "IN", "A", address))
        elif txt:
            r.answer.append(dns.rrset.from_text(q.name, 300, "IN", "TXT", '"listed for a test"'))
        return r

    def _serve_udp(self) -> None:
        while not self.stop.is_set():
            try:
                wire, client = self.udp.recvfrom(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._udp_one, args=(wire, client), daemon=True).start()

    def _udp_one(self, wire: bytes, client: tuple) -> None:
        query = dns.message.from_wire(wire)
        mode = query.question[0].name.labels[0].decode()
        send = lambda data: self.udp.sendto(data, client)     # noqa: E731
        stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)     # a local user's own socket
        try:
            if mode == "stray":
                # A listing "answer" and garbage from another local port, before the real answer.
                stranger.sendto(self.answer(query, "127.0.0.4").to_wire(), client)
                stranger.sendto(b"\x00\x01garbage", client)
                time.sleep(0.1)
                send(self.answer(query, "127.0.0.3").to_wire())
            elif mode == "wrongid":
                bad = self.answer(query, "127.0.0.4")
                bad.id = (query.id + 1) & 0xFFFF
                send(bad.to_wire())
                time.sleep(0.05)
                send(self.answer(query, "127.0.0.3").to_wire())
            elif mode == "wrongname":
                other = dns.message.make_query("9.9.9.9.bl.test.", query.question[0].rdtype)
                other.id = query.id
                send(self.answer(other, "127.0.0.4").to_wire())
                time.sleep(0.05)
                send(self.answer(query, "127.0.0.3").to_wire())
            elif mode == "garbage":
                send(b"\xff" * 40)
                send(wire[:5])
            elif mode == "huge":
                if query.question[0].rdtype == 1:
                    send(self.answer(query, "127.0.0.3").to_wire())
                else:
                    r = dns.message.make_response(query)
                    r.flags |= 0x0200                              # TC: ask again over TCP
                    send(r.to_wire())
            elif mode == "slow":
                time.sleep(1.5)
                send(self.answer(query, "127.0.0.3").to_wire())
            elif mode == "errorcode":
                send(self.answer(query, "127.255.255.254").to_wire())
            elif mode == "outside":
                send(self.answer(query, "10.0.0.2").to_wire())
        except OSError:
            pass
        finally:
            stranger.close()

    def _serve_tcp(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.tcp.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    size = struct.unpack("!H", conn.recv(2))[0]
                    query = dns.message.from_wire(conn.recv(size))
                    r = dns.message.make_response(query)
                    r.answer.append(dns.rrset.from_text(query.question[0].name, 300, "IN", "TXT",
                                                        " ".join('"%s"' % s for s in HUGE)))
                    out = r.to_wire(max_size=65535)
                    conn.sendall(struct.pack("!H", len(out)) + out)
                except (OSError, struct.error):
                    pass


ASK = r"""
import ipaddress, json, sys, time
from relaymilter.dnsbl.lookup import ask_site, make_resolver
from relaymilter.dnsbl.settings import parse_nameserver
from relaymilter.dnsbl.sites import parse_site
servers, timeout, names = sys.argv[1].split(","), float(sys.argv[2]), sys.argv[3:]
client = make_resolver([parse_nameserver(s) for s in servers], timeout)
site = parse_site("bl.test")
for name in names:
    t = time.monotonic()
    a = ask_site(client, site, name + ".bl.test.", t + timeout)
    print(json.dumps([name, a.status, a.answer, a.reason, a.error, round(time.monotonic() - t, 3)]))
"""


def pythons() -> list:
    out = [pytest.param(sys.executable, id="test-python")]
    system = "/usr/bin/python3"
    if os.path.exists(system) and sys.prefix != "/usr":      # the test's Python is a virtualenv
        ok = subprocess.run([system, "-c", "import dns.message, dns.query"], capture_output=True, timeout=60)
        if ok.returncode == 0:
            out.append(pytest.param(system, id="debian-python3-dnspython"))
    return out


def ask(python: str, servers: str, timeout: float, *names: str) -> dict:
    env = dict(os.environ, PYTHONPATH=MILTER)
    proc = subprocess.run([python, "-c", ASK, servers, str(timeout)] + list(names),
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    return {row[0]: row[1:] for row in map(json.loads, proc.stdout.splitlines())}


@pytest.mark.parametrize("python", pythons())
def test_a_hostile_nameserver_and_a_local_user_cannot_make_a_listing_or_an_error(python):
    with HostileServer() as server:
        got = ask(python, "127.0.0.1:%d" % server.port, 1.0,
                  "stray", "wrongid", "wrongname", "garbage", "huge", "slow", "errorcode", "outside")
    # Datagrams from another port, with another ID or for another name are not the answer: the real one counts.
    for name in ("stray", "wrongid", "wrongname"):
        status, answer, _, error, _ = got[name]
        assert (status, answer, error) == ("listed", "127.0.0.3", ""), (name, got[name])
    assert got["garbage"][0] == "error" and got["garbage"][3] == "timeout", got["garbage"]
    # A TXT too big for UDP comes over TCP; the reason is cut to a reply-safe line.
    status, answer, reason, _, _ = got["huge"]
    assert (status, answer) == ("listed", "127.0.0.3") and reason.startswith("x000 yyy") and len(reason) == 200, got
    # Past the deadline is a timeout, within it: 1.5 s answers do not hold the lookup.
    status, _, _, error, took = got["slow"]
    assert (status, error) == ("error", "timeout") and took < 1.4, got["slow"]
    assert got["errorcode"][:2] == ["error", "127.255.255.254"], got["errorcode"]
    assert got["outside"][:2] == ["error", "10.0.0.2"], got["outside"]


@pytest.mark.parametrize("python", pythons())
def test_a_nameserver_that_is_not_there_is_an_error_at_once_and_the_next_one_is_asked(python):
    """resolv.conf pointing nowhere: a closed port on loopback refuses at once; a second nameserver still answers."""
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    nowhere = closed.getsockname()[1]
    closed.close()
    got = ask(python, "127.0.0.1:%d" % nowhere, 1.0, "stray")
    status, _, _, error, took = got["stray"]
    assert status == "error" and "refused" in error.lower() and took < 0.5, got
    with HostileServer() as server:
        got = ask(python, "127.0.0.1:%d,127.0.0.1:%d" % (nowhere, server.port), 1.0, "wrongid")
    assert got["wrongid"][:2] == ["listed", "127.0.0.3"], got


def test_debian_dnspython_is_tested():
    """The .deb runs on Debian's python3-dnspython: the tests above must have run on it too."""
    if not shutil.which("dpkg-query"):
        pytest.skip("not a Debian system")
    assert len(pythons()) == 2, "install python3-dnspython (packaging/scripts/deps.sh --test)"
