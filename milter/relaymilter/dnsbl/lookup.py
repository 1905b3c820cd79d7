"""NAME
    relaymilter.dnsbl.lookup - ask the DNS about one client on several lists at once

DESCRIPTION
    dnspython builds and parses the messages; the exchange is made here, so
    that it behaves the same with every dnspython version: each query goes
    from its own *connected* UDP socket (the kernel drops datagrams from any
    other address, so a local process that finds our port in /proc/net/udp
    cannot spoil a lookup), a datagram that is not the answer to the query
    (another ID or question, or not DNS at all) is passed over while the
    deadline allows, a truncated answer is asked again over TCP, and the
    configured nameservers are asked in turn; never /etc/resolv.conf's or a
    search list. There is no cache here (relaymilter.dnsbl.checker caches
    whole answers for their TTL).

    ask_site() asks one list about one name: type A, and when the answer
    lists the client, type TXT for the reason. ask_sites() asks several
    lists at once - one in the calling thread, the others in a small thread
    pool of this process - and returns when all have answered or the
    deadline has passed, whichever is first; a list that has not answered
    by then counts as timed out. Every query's socket waits end at the
    same deadline, so nothing outlives it by more than one socket wait.

    The pool is made on first use in each process: a forked worker never
    uses threads its parent started.

DIAGNOSTICS
    ask_site() never raises: a DNS failure is a SiteAnswer with status
    "error" and the reason (timeout, SERVFAIL or REFUSED from every
    nameserver, a nameserver that refuses the connection, an error answer
    in 127.255.255.0/24 with its meaning, an answer outside 127.0.0.0/8).
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from relaymilter.dnsbl.settings import Nameserver
from relaymilter.dnsbl.sites import Site, answer_meaning

LISTED = "listed"
CLEAN = "clean"
ERROR = "error"

TTL_MAX = 3600          # seconds an answer is kept at most, whatever its TTL says
REASON_MAX = 200        # characters of TXT text kept for a reply
POOL_THREADS = 16       # per process; queries wait on sockets, not on the GIL

_monotonic = time.monotonic


@dataclass(frozen=True)
class SiteAnswer:
    """What one list said about one client."""

    site: Site
    status: str            # LISTED, CLEAN or ERROR
    answer: str = ""       # the A record that decided (for an error: the error answer, if any)
    reason: str = ""       # TXT text (listed only), cleaned for an SMTP reply
    error: str = ""        # why it is an error
    ttl: int = 0           # seconds this answer may be reused; 0: not kept


class DnsClient:
    """The configured nameservers, asked in turn until a deadline (what make_resolver() gives)."""

    def __init__(self, nameservers: Sequence[Nameserver], timeout: float) -> None:
        self.nameservers = tuple(nameservers)
        self.timeout = timeout
        self.lifetime = timeout


def make_resolver(nameservers: Sequence[Nameserver], timeout: float) -> DnsClient:
    """A client that asks exactly *nameservers*, never /etc/resolv.conf or a search list."""
    return DnsClient(nameservers, timeout)


class DnsFailure(Exception):
    """No nameserver gave an answer (NOERROR or NXDOMAIN) in time; the message says why."""


def _wait_answer(sock: socket.socket, query: dns.message.Message, deadline: float) -> dns.message.Message:
    """The first datagram on *sock* (connected) that answers *query*; others are passed over."""
    while True:
        left = _remaining(deadline)
        if left <= 0:
            raise dns.exception.Timeout
        sock.settimeout(left)
        try:
            wire = sock.recv(65535)
        except socket.timeout:
            raise dns.exception.Timeout from None
        try:
            response = dns.message.from_wire(wire)
        except Exception:   # noqa: BLE001 - on garbage dnspython 2.3 raises ValueError, IndexError... too
            continue        # not DNS, or mangled: whatever comes next may still be the answer
        if query.is_response(response):
            return response
        # another ID or another question (a late answer, a forgery): not this query's answer


def _udp(query: dns.message.Message, ns: Nameserver, deadline: float) -> dns.message.Message:
    family = socket.AF_INET6 if ":" in ns.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        # Connected: the kernel drops datagrams from any other address or port, so no local
        # process can spoil a lookup by writing to our port (it is in /proc/net/udp).
        sock.connect((ns.host, ns.port))
        sock.send(query.to_wire())
        return _wait_answer(sock, query, deadline)


def _tcp(query: dns.message.Message, ns: Nameserver, deadline: float) -> dns.message.Message:
    left = _remaining(deadline)
    if left <= 0:
        raise dns.exception.Timeout
    try:
        response = dns.query.tcp(query, ns.host, timeout=left, port=ns.port)
    except (OSError, dns.exception.DNSException):
        raise
    except Exception as exc:   # noqa: BLE001 - on garbage dnspython 2.3 raises ValueError, IndexError... too
        raise dns.exception.FormError("a TCP answer that is not DNS (%s)" % type(exc).__name__) from None
    if not query.is_response(response):
        raise dns.exception.FormError("the TCP answer is not for this query")
    return response


def exchange(client: DnsClient, qname: str, rdtype: dns.rdatatype.RdataType, deadline: float) -> dns.message.Message:
    """An answer (NOERROR or NXDOMAIN) for *qname* from the first nameserver that gives one by *deadline*.

    DnsFailure otherwise, naming why ("timeout" when every nameserver was silent).
    """
    query = dns.message.make_query(qname, rdtype)
    why: list[str] = []
    for ns in client.nameservers:
        if _remaining(deadline) <= 0:
            break
        try:
            response = _udp(query, ns, deadline)
            if response.flags & dns.flags.TC:
                response = _tcp(query, ns, deadline)
        except dns.exception.Timeout:
            why.append("timeout")
            continue
        except (OSError, dns.exception.DNSException) as exc:
            text = getattr(exc, "strerror", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
            why.append("%s: %s" % (ns, text[:200]))
            continue
        rcode = response.rcode()
        if rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            return response
        why.append("%s: %s" % (ns, dns.rcode.to_text(rcode)))
    if not why or all(w == "timeout" for w in why):
        raise DnsFailure("timeout")
    if all(w.endswith((": SERVFAIL", ": REFUSED")) for w in why):
        raise DnsFailure("no nameserver answered (SERVFAIL or REFUSED): %s" % "; ".join(why))
    raise DnsFailure("DNS error: %s" % "; ".join(why))


def _answer_rrset(response: dns.message.Message, qname: str,
                  rdtype: dns.rdatatype.RdataType) -> Optional[dns.rrset.RRset]:
    """The answer's records of *rdtype* for *qname*, following CNAMEs within the answer."""
    name = dns.name.from_text(qname)
    for _ in range(8):
        rrset = response.get_rrset(response.answer, name, dns.rdataclass.IN, rdtype)
        if rrset is not None:
            return rrset
        cname = response.get_rrset(response.answer, name, dns.rdataclass.IN, dns.rdatatype.CNAME)
        if cname is None:
            return None
        name = cname[0].target
    return None


def clean_reason(strings: Sequence[bytes]) -> str:
    """TXT strings as one reply-safe line: printable ASCII, no '%' (libmilter formats replies)."""
    text = " ".join(s.decode("ascii", "replace") for s in strings)
    text = "".join(c if " " <= c <= "~" and c != "%" else "?" for c in text)
    return " ".join(text.split())[:REASON_MAX]


def _negative_ttl(response: dns.message.Message) -> int:
    """RFC 2308: a negative answer is kept for min(SOA TTL, SOA minimum); without an SOA, not kept."""
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA:
            return max(0, min(rrset.ttl, rrset[0].minimum, TTL_MAX))
    return 0


def _remaining(deadline: float) -> float:
    return deadline - _monotonic()


def ask_site(resolver: DnsClient, site: Site, qname: str, deadline: float) -> SiteAnswer:
    """Ask *site* about *qname* (query_name()) before *deadline* (time.monotonic())."""
    if _remaining(deadline) <= 0:
        return SiteAnswer(site, ERROR, error="timeout")
    try:
        response = exchange(resolver, qname, dns.rdatatype.A, deadline)
    except DnsFailure as exc:
        return SiteAnswer(site, ERROR, error=str(exc))
    rrset = _answer_rrset(response, qname, dns.rdatatype.A) if response.rcode() == dns.rcode.NOERROR else None
    if rrset is None:
        return SiteAnswer(site, CLEAN, ttl=_negative_ttl(response))
    ttl = min(rrset.ttl, TTL_MAX)
    addresses = sorted(r.address for r in rrset)
    for addr in addresses:
        meaning = answer_meaning(addr)
        if meaning is not None:
            return SiteAnswer(site, ERROR, answer=addr, error=meaning)
    hits = [a for a in addresses if site.listing(ipaddress.IPv4Address(a))]
    if not hits:
        return SiteAnswer(site, CLEAN, answer=addresses[0], ttl=ttl)
    reason = ""
    if _remaining(deadline) > 0:
        try:
            txt = _answer_rrset(exchange(resolver, qname, dns.rdatatype.TXT, deadline), qname, dns.rdatatype.TXT)
            if txt is not None:
                reason = clean_reason([s for r in txt for s in r.strings])
                ttl = min(ttl, txt.ttl)
        except DnsFailure:
            pass    # the listing stands; only its reason is missing
    return SiteAnswer(site, LISTED, answer=hits[0], reason=reason, ttl=ttl)


class Asker:
    """ask_sites() with this process's thread pool (made on first use after a fork)."""

    def __init__(self, resolver: DnsClient) -> None:
        self.resolver = resolver
        self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._pid = 0
        self._lock = threading.Lock()

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        pool = self._pool
        if pool is None or self._pid != os.getpid():
            with self._lock:
                if self._pool is None or self._pid != os.getpid():
                    self._pool = concurrent.futures.ThreadPoolExecutor(POOL_THREADS, thread_name_prefix="dnsbl")
                    self._pid = os.getpid()
                pool = self._pool
        return pool

    def ask_sites(self, questions: Sequence[tuple[Site, str]], deadline: float) -> list[SiteAnswer]:
        """Ask every (site, qname) at once; the answers in the same order, by *deadline*."""
        if not questions:
            return []
        if len(questions) == 1:
            site, qname = questions[0]
            return [ask_site(self.resolver, site, qname, deadline)]
        pool = self._executor()
        futures = [pool.submit(ask_site, self.resolver, site, qname, deadline) for site, qname in questions[1:]]
        first = ask_site(self.resolver, questions[0][0], questions[0][1], deadline)
        concurrent.futures.wait(futures, timeout=max(0.0, _remaining(deadline)) + 0.05)
        out = [first]
        for (site, _), fut in zip(questions[1:], futures):
            if fut.done() and fut.exception() is None:
                out.append(fut.result())
            else:
                fut.cancel()
                out.append(SiteAnswer(site, ERROR, error="timeout"))
        return out

    def close(self) -> None:
        if self._pool is not None and self._pid == os.getpid():
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None
