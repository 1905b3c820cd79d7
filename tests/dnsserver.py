"""A real DNS server on loopback for the DNS blocklist tests and benchmarks.

dnslib's threaded UDP server answers from zones defined here (its own
ZoneResolver answers NXDOMAIN for an existing name asked for a missing type,
so the small resolver below does it right: NOERROR with no data). It binds
127.0.0.1 on a free port, logs every query it gets (the query log the tests
assert on), and can play the broken lists the tests need: a zone that
answers one address for every name (127.255.255.254, "query through a
public resolver"), a zone that never answers, a zone that answers late.

    with DnsServer(standard_zones()) as dns:
        dns.port, dns.queries(), dns.asked("30.0.0.127.bl.test")

Run as a script it serves standard_zones() until killed and prints its port
(benchmarks start it as a separate process so it does not share their GIL).
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from dnslib import QTYPE, RCODE, RR, SOA, TXT, A, DNSLabel, DNSRecord
from dnslib.server import DNSError, DNSServer

TTL = 300
NEGATIVE_TTL = 60


@dataclass
class Zone:
    """One zone: owner (relative to the zone, '' for the apex) -> [(type, value)]."""

    name: str
    records: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    answer_all: Optional[str] = None     # an A answer for every name in the zone
    silent: bool = False                 # never answer
    delay: float = 0.0                   # answer this late (seconds)
    ttl: int = TTL
    negative_ttl: int = NEGATIVE_TTL

    def add(self, owner: str, rtype: str, value: str) -> "Zone":
        self.records.setdefault(owner, []).append((rtype, value))
        return self

    def list_ip(self, ip: str, answer: str = "127.0.0.2", reason: Optional[str] = None) -> "Zone":
        """List an IPv4 or IPv6 address the standard way (RFC 5782)."""
        import ipaddress

        addr = ipaddress.ip_address(ip)
        if addr.version == 4:
            owner = ".".join(reversed(ip.split(".")))
        else:
            owner = ".".join(reversed(addr.exploded.replace(":", "")))
        self.add(owner, "A", answer)
        if reason is not None:
            self.add(owner, "TXT", reason)
        return self


def rfc5782_zone(name: str, **kw) -> Zone:
    """A zone that passes the RFC 5782 self-test (lists 127.0.0.2, not 127.0.0.1)."""
    return Zone(name, **kw).list_ip("127.0.0.2", "127.0.0.2", "test point")


def standard_zones() -> list[Zone]:
    """The zones the tests use (the client addresses are 127.0.0.x, which sendmail's tests bind)."""
    bl = rfc5782_zone("bl.test")
    bl.list_ip("127.0.0.30", "127.0.0.4", "Listed for testing; see http://bl.test/query/127.0.0.30")
    bl.list_ip("127.0.0.31", "127.0.0.10", "Dynamic address (policy listing)")
    bl.list_ip("127.0.0.32", "127.0.0.2", "Listed but well known")
    bl.list_ip("127.0.0.35", "127.0.0.2")                        # listed, no TXT
    bl.list_ip("2001:db8::30", "127.0.0.2", "IPv6 listing")
    bl.list_ip("192.0.2.30", "127.0.0.4", "Listed for testing")
    allow = Zone("allow.test").list_ip("127.0.0.2", "127.0.10.2").list_ip("127.0.0.32", "127.0.10.3")
    odd = rfc5782_zone("odd.test")
    odd.list_ip("127.0.0.33", "127.255.255.255")                  # "too many queries"
    odd.list_ip("127.0.0.34", "192.0.2.1")                        # outside 127/8
    odd.list_ip("127.0.0.30", "127.0.0.2")                        # valid listing, for filter tests
    return [
        bl, allow, odd,
        Zone("err.test", answer_all="127.255.255.254"),           # query through a public resolver
        Zone("silent.test", silent=True),
        rfc5782_zone("second.test").list_ip("127.0.0.30", "127.0.0.3"),
    ]


class _Resolver:
    def __init__(self, server: "DnsServer") -> None:
        self.server = server

    def resolve(self, request: DNSRecord, handler: object) -> DNSRecord:
        q = request.q
        qname = str(q.qname).rstrip(".").lower()
        qtype = QTYPE[q.qtype]
        self.server.log_query(qname, qtype)
        reply = request.reply()
        zone = self.server.zone_for(qname)
        if zone is None:
            reply.header.rcode = RCODE.REFUSED
            return reply
        if zone.silent:
            raise DNSError("silent zone %s: no answer" % zone.name)
        if zone.delay:
            time.sleep(zone.delay)
        owner = qname[: -len(zone.name)].rstrip(".") if qname != zone.name else ""
        soa = RR(zone.name + ".", QTYPE.SOA, ttl=zone.negative_ttl,
                 rdata=SOA("ns." + zone.name + ".", "hostmaster." + zone.name + ".",
                           (1, 3600, 600, 86400, zone.negative_ttl)))
        if zone.answer_all is not None:
            if qtype == "A":
                reply.add_answer(RR(q.qname, QTYPE.A, ttl=zone.ttl, rdata=A(zone.answer_all)))
            else:
                reply.add_auth(soa)
            return reply
        records = zone.records.get(owner)
        if records is None:
            reply.header.rcode = RCODE.NXDOMAIN
            reply.add_auth(soa)
            return reply
        found = False
        for rtype, value in records:
            if rtype == qtype:
                rdata = A(value) if rtype == "A" else TXT(value)
                reply.add_answer(RR(q.qname, getattr(QTYPE, rtype), ttl=zone.ttl, rdata=rdata))
                found = True
        if not found:
            reply.add_auth(soa)
        return reply


class _QuietLogger:
    def __getattr__(self, name: str):
        return lambda *args: None


class DnsServer:
    """The zones above served on 127.0.0.1:<free port>, with a query log."""

    def __init__(self, zones: list[Zone], address: str = "127.0.0.1") -> None:
        self.zones = {z.name: z for z in zones}
        self._log: list[tuple[float, str, str]] = []
        self._lock = threading.Lock()
        self.server = DNSServer(_Resolver(self), address=address, port=0, logger=_QuietLogger())
        self.port = self.server.server.server_address[1]
        self.address = address
        self._thread: Optional[threading.Thread] = None

    @property
    def nameserver(self) -> str:
        return "%s:%d" % (self.address, self.port)

    def zone_for(self, qname: str) -> Optional[Zone]:
        labels = DNSLabel(qname).label
        for i in range(len(labels)):
            name = b".".join(labels[i:]).decode("ascii", "replace").lower()
            if name in self.zones:
                return self.zones[name]
        return None

    def log_query(self, qname: str, qtype: str) -> None:
        with self._lock:
            self._log.append((time.monotonic(), qname, qtype))

    def queries(self, contains: str = "") -> list[tuple[str, str]]:
        """Every (name, type) asked so far, in order; only names containing *contains*."""
        with self._lock:
            return [(n, t) for _, n, t in self._log if contains in n]

    def asked(self, name: str, qtype: Optional[str] = None) -> int:
        return sum(1 for n, t in self.queries() if n == name.rstrip(".").lower() and (qtype is None or t == qtype))

    def clear(self) -> None:
        with self._lock:
            self._log.clear()

    def start(self) -> "DnsServer":
        self._thread = threading.Thread(target=self.server.server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="dns-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.server.server.shutdown()
            self._thread.join(5)
            self._thread = None
        self.server.server.server_close()

    def __enter__(self) -> "DnsServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    dns = DnsServer(standard_zones()).start()
    sys.stdout.write("%d\n" % dns.port)
    sys.stdout.flush()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        dns.stop()
