"""NAME
    relaymilter.dnsbl.lookup - ask the DNS about one client on several lists at once

DESCRIPTION
    dnspython does the DNS: one Resolver(configure=False) per configuration,
    with the configured nameservers, no search list and no cache of its own
    (relaymilter.dnsbl.checker caches whole answers for their TTL). A
    Resolver is safe to share between threads.

    ask_site() asks one list about one name: type A, and when the answer
    lists the client, type TXT for the reason. ask_sites() asks several
    lists at once - one in the calling thread, the others in a small thread
    pool of this process - and returns when all have answered or the
    deadline has passed, whichever is first; a list that has not answered
    by then counts as timed out. Every query's dnspython lifetime ends at
    the same deadline, so nothing outlives it by more than one socket wait.

    The pool is made on first use in each process: a forked worker never
    uses threads its parent started.

DIAGNOSTICS
    Nothing raises: a DNS failure is a SiteAnswer with status "error" and
    the reason (timeout, SERVFAIL or REFUSED from every nameserver, an
    error answer in 127.255.255.0/24 with its meaning, an answer outside
    127.0.0.0/8).
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import os
import threading
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import dns.exception
import dns.message
import dns.rdatatype
import dns.resolver

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


def make_resolver(nameservers: Sequence[Nameserver], timeout: float) -> dns.resolver.Resolver:
    """A Resolver that asks exactly *nameservers*, never /etc/resolv.conf or a search list."""
    res = dns.resolver.Resolver(configure=False)
    # Ports per address, set before the addresses: dnspython 2.3 (Debian 12)
    # reads them at query time, later versions when the list is set.
    res.nameserver_ports = {ns.host: ns.port for ns in nameservers}
    res.nameservers = [ns.host for ns in nameservers]
    res.timeout = timeout
    res.lifetime = timeout
    res.cache = None
    res.retry_servfail = False
    return res


def clean_reason(strings: Sequence[bytes]) -> str:
    """TXT strings as one reply-safe line: printable ASCII, no '%' (libmilter formats replies)."""
    text = " ".join(s.decode("ascii", "replace") for s in strings)
    text = "".join(c if " " <= c <= "~" and c != "%" else "?" for c in text)
    return " ".join(text.split())[:REASON_MAX]


def _negative_ttl(response: Optional[dns.message.Message]) -> int:
    """RFC 2308: a negative answer is kept for min(SOA TTL, SOA minimum); without an SOA, not kept."""
    if response is None:
        return 0
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA:
            return max(0, min(rrset.ttl, rrset[0].minimum, TTL_MAX))
    return 0


def _remaining(deadline: float) -> float:
    return deadline - _monotonic()


def _error(site: Site, exc: dns.exception.DNSException) -> SiteAnswer:
    if isinstance(exc, dns.exception.Timeout):
        return SiteAnswer(site, ERROR, error="timeout")
    if isinstance(exc, dns.resolver.NoNameservers):
        return SiteAnswer(site, ERROR, error="no nameserver answered (SERVFAIL or REFUSED)")
    return SiteAnswer(site, ERROR, error="DNS error: %s" % (str(exc).splitlines() or ["?"])[0][:200])


def ask_site(resolver: dns.resolver.Resolver, site: Site, qname: str, deadline: float) -> SiteAnswer:
    """Ask *site* about *qname* (query_name()) before *deadline* (time.monotonic())."""
    left = _remaining(deadline)
    if left <= 0:
        return SiteAnswer(site, ERROR, error="timeout")
    try:
        ans = resolver.resolve(qname, "A", lifetime=left, raise_on_no_answer=False, search=False)
    except dns.resolver.NXDOMAIN as exc:
        try:
            response = exc.response(exc.qnames()[0]) if exc.qnames() else None
        except (KeyError, IndexError):
            response = None
        return SiteAnswer(site, CLEAN, ttl=_negative_ttl(response))
    except dns.exception.DNSException as exc:
        return _error(site, exc)
    if ans.rrset is None:
        return SiteAnswer(site, CLEAN, ttl=_negative_ttl(ans.response))
    ttl = min(ans.rrset.ttl, TTL_MAX)
    addresses = sorted(r.address for r in ans.rrset)
    for addr in addresses:
        meaning = answer_meaning(addr)
        if meaning is not None:
            return SiteAnswer(site, ERROR, answer=addr, error=meaning)
    hits = [a for a in addresses if site.listing(ipaddress.IPv4Address(a))]
    if not hits:
        return SiteAnswer(site, CLEAN, answer=addresses[0], ttl=ttl)
    reason = ""
    left = _remaining(deadline)
    if left > 0:
        try:
            txt = resolver.resolve(qname, "TXT", lifetime=left, raise_on_no_answer=False, search=False)
            if txt.rrset is not None:
                reason = clean_reason([s for r in txt.rrset for s in r.strings])
                ttl = min(ttl, txt.rrset.ttl)
        except dns.exception.DNSException:
            pass    # the listing stands; only its reason is missing
    return SiteAnswer(site, LISTED, answer=hits[0], reason=reason, ttl=ttl)


class Asker:
    """ask_sites() with this process's thread pool (made on first use after a fork)."""

    def __init__(self, resolver: dns.resolver.Resolver) -> None:
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
