"""NAME
    relaymilter.dnsbl.checker - what the configured DNS lists say about a client

DESCRIPTION
    Dnsbl holds one configuration's lists. lookup(ip) gives a Verdict: the
    summed weight of the lists that list the client (a negative weight
    allowlists), the listing and error answers, and whether that reaches
    the threshold - "listed", "clean" or, when failed lists could still
    change the outcome and on_error is tempfail, "unknown".

    Answers are cached per query name for their TTL (a negative answer for
    its SOA's negative TTL; at most TTL_MAX), in a table of at most
    CACHE_MAX entries per process: when it is full, expired entries go,
    then the oldest. Errors are never cached: each connection asks again,
    within `timeout`. The caller keeps a Verdict for its connection, so a
    client is looked up once per connection.

    Self-test (RFC 5782 section 5): at start() and every selftest_interval
    seconds each list is asked about 127.0.0.2, which it must list, and
    127.0.0.1, which it must not. A list that fails (an answer for
    127.0.0.1 - it answers everything -, none or an error answer for
    127.0.0.2) is set aside: logged at ERROR, never asked, never counted,
    until a later self-test passes (logged at WARNING). A list whose
    self-test could not be made (timeout, SERVFAIL) keeps its state; a list
    never yet verified counts as a DNS error (on_error decides) and is
    tested again after RETEST seconds.

    The self-test runs in a daemon thread of the process that asks: a
    forked worker starts its own on first use. Error answers and failures
    are counted per list and reported with each self-test.

DIAGNOSTICS
    "dnsbl: LIST set aside: ..." (ERROR), "dnsbl: LIST passes its self-test
    again" (WARNING), "dnsbl: LIST: N errors since the last report: ..."
    (WARNING). lookup() never raises for DNS trouble.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Optional, Union

from relaymilter.dnsbl.lookup import CLEAN, ERROR, LISTED, TTL_MAX, Asker, SiteAnswer, make_resolver
from relaymilter.dnsbl.settings import DnsblConfig
from relaymilter.dnsbl.sites import TEST_LISTED, TEST_UNLISTED, Site, query_name

log = logging.getLogger("relaymilter")

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

CACHE_MAX = 50000       # cached answers per process (a few hundred bytes each)
RETEST = 30             # seconds before a list not yet verified is tested again

UNTESTED = "untested"
OK = "ok"
ASIDE = "aside"

_monotonic = time.monotonic


@dataclass(frozen=True)
class Verdict:
    """What the lists say about one client."""

    outcome: str                         # "listed", "clean" or "unknown"
    score: int
    threshold: int
    listings: tuple[SiteAnswer, ...]     # answers that list (or, weight < 0, allowlist) the client
    errors: tuple[SiteAnswer, ...]
    expires: float = 0.0                 # time.monotonic() until which it holds (0: not to be kept)

    @property
    def top(self) -> Optional[SiteAnswer]:
        """The listing with the largest weight: the one a refusal names."""
        positive = [a for a in self.listings if a.site.weight > 0]
        return max(positive, key=lambda a: a.site.weight) if positive else None

    def detail(self) -> str:
        """The log text: ``site=A answer=X weight=S/T`` and a ``dnsbl_error ...`` per failed list."""
        parts = []
        if self.listings:
            ordered = sorted(self.listings, key=lambda a: -a.site.weight)
            parts.append("site=%s answer=%s" % (",".join(a.site.zone for a in ordered),
                                                ",".join(a.answer for a in ordered)))
        parts.append("weight=%d/%d" % (self.score, self.threshold))
        for e in self.errors:
            what = "answer=%s (%s)" % (e.answer, e.error) if e.answer else "(%s)" % e.error
            parts.append("dnsbl_error site=%s %s" % (e.site.zone, what))
        return " ".join(parts)


@dataclass
class _State:
    status: str = UNTESTED
    why: str = ""


def judge(answers: list[SiteAnswer], threshold: int, on_error: str, expires: float = 0.0) -> Verdict:
    """Sum the weights of the listing answers and compare with *threshold* (see the module notes)."""
    listings = tuple(a for a in answers if a.status == LISTED)
    errors = tuple(a for a in answers if a.status == ERROR)
    score = sum(a.site.weight for a in listings)
    if on_error == "tempfail" and errors:
        low = score + sum(min(0, a.site.weight) for a in errors)
        high = score + sum(max(0, a.site.weight) for a in errors)
        outcome = "listed" if low >= threshold else "clean" if high < threshold else "unknown"
    else:
        outcome = "listed" if score >= threshold else "clean"
    return Verdict(outcome, score, threshold, listings, errors, 0.0 if errors else expires)


class Dnsbl:
    """One configuration's lists: lookups, their cache and the self-test."""

    def __init__(self, config: DnsblConfig, previous: Optional["Dnsbl"] = None) -> None:
        self.config = config
        self.sites = config.sites
        same_dns = previous is not None and previous.config.nameservers == config.nameservers
        self.asker: Asker
        if previous is not None and same_dns:
            self.asker = previous.asker
            self.asker.resolver.timeout = self.asker.resolver.lifetime = config.timeout
        else:
            self.asker = Asker(make_resolver(config.nameservers, config.timeout))
        self.states = {s.zone: _State() for s in self.sites}
        self._cache: dict[str, tuple[float, SiteAnswer]] = {}
        if previous is not None and same_dns:
            for zone, state in previous.states.items():
                if zone in self.states:
                    self.states[zone] = _State(state.status, state.why)
            if previous.sites == self.sites:
                self._cache = previous._cache
        self.errors: collections.Counter[tuple[str, str]] = collections.Counter()
        self._stop = threading.Event()
        self._thread_pid = 0
        self._retired = False
        self._lock = threading.Lock()
        self.generation = 0             # changes whenever a list is set aside or back in use
        if previous is not None:
            previous.retire()

    # -- lookups -------------------------------------------------------------

    def lookup(self, ip: IPAddress) -> Verdict:
        """Ask every list in use about *ip* (cached answers first), within the configured timeout."""
        if self._thread_pid != os.getpid() and not self._retired:
            self._start_thread()
        now = _monotonic()
        cache = self._cache
        answers: list[SiteAnswer] = []
        questions: list[tuple[Site, str]] = []
        expires = now + TTL_MAX
        for site in self.sites:
            state = self.states[site.zone].status
            if state == ASIDE:
                continue
            if state == UNTESTED:
                answers.append(SiteAnswer(site, ERROR, error="not yet verified by the self-test"))
                continue
            qname = query_name(ip, site.zone)
            hit = cache.get(qname)
            if hit is not None and hit[0] > now:
                answers.append(hit[1])
                expires = min(expires, hit[0])
            else:
                questions.append((site, qname))
        if questions:
            fresh = self.asker.ask_sites(questions, now + self.config.timeout)
            done = _monotonic()
            for (_, qname), ans in zip(questions, fresh):
                if ans.status == ERROR:
                    self.errors[(ans.site.zone, ans.answer and "%s (%s)" % (ans.answer, ans.error) or ans.error)] += 1
                elif ans.ttl > 0:
                    self._remember(qname, done + ans.ttl, ans)
                expires = min(expires, done + ans.ttl)
            answers.extend(fresh)
        return judge(answers, self.config.threshold, self.config.on_error, expires)

    def _remember(self, qname: str, expires: float, answer: SiteAnswer) -> None:
        cache = self._cache
        if len(cache) >= CACHE_MAX:
            with self._lock:
                if len(cache) >= CACHE_MAX:
                    now = _monotonic()
                    for key in [k for k, v in list(cache.items()) if v[0] <= now]:
                        cache.pop(key, None)
                    if len(cache) >= CACHE_MAX:
                        for key in list(cache)[: CACHE_MAX // 4]:
                            cache.pop(key, None)
        cache[qname] = (expires, answer)

    def cached(self) -> int:
        return len(self._cache)

    # -- the self-test -------------------------------------------------------

    def self_test(self) -> None:
        """RFC 5782 section 5 for every list, at once; set aside or restore each (see the module notes)."""
        questions = []
        for site in self.sites:
            questions.append((site, query_name(TEST_LISTED, site.zone)))
            questions.append((site, query_name(TEST_UNLISTED, site.zone)))
        answers = self.asker.ask_sites(questions, _monotonic() + self.config.timeout)
        for i, site in enumerate(self.sites):
            self._judge_self_test(site, answers[2 * i], answers[2 * i + 1])

    def _judge_self_test(self, site: Site, listed: SiteAnswer, unlisted: SiteAnswer) -> None:
        state = self.states[site.zone]
        failure = ""
        if unlisted.answer:
            failure = "it lists 127.0.0.1 (answer %s%s): it would list every client" % (
                unlisted.answer, ", %s" % unlisted.error if unlisted.error else "")
        elif listed.status == ERROR and listed.answer:
            failure = "127.0.0.2 gets an error answer %s (%s)" % (listed.answer, listed.error)
        elif listed.status == CLEAN and not listed.answer:
            failure = "it does not list 127.0.0.2"
        elif listed.status == ERROR or unlisted.status == ERROR:
            err = listed if listed.status == ERROR else unlisted
            if state.status == UNTESTED:
                log.warning("dnsbl: %s: self-test could not be made (%s); not used until it can",
                            site.zone, err.error)
            return
        if failure:
            if state.status != ASIDE or state.why != failure:
                log.error("dnsbl: %s set aside: RFC 5782 self-test failed: %s; not used until it passes",
                          site.zone, failure)
            if state.status != ASIDE:
                self.generation += 1
            state.status, state.why = ASIDE, failure
        elif state.status != OK:
            if state.status == ASIDE:
                log.warning("dnsbl: %s passes its self-test again; back in use", site.zone)
            else:
                log.info("dnsbl: %s passes its self-test; in use (%s)", site.zone, site.spec)
            state.status, state.why = OK, ""
            self.generation += 1

    def report_errors(self) -> None:
        """Log and reset the error counts since the last report."""
        counts, self.errors = self.errors, collections.Counter()
        by_zone: dict[str, list[str]] = {}
        for (zone, what), n in sorted(counts.items()):
            by_zone.setdefault(zone, []).append("%d x %s" % (n, what))
        for zone, items in by_zone.items():
            total = sum(n for (z, _), n in counts.items() if z == zone)
            log.warning("dnsbl: %s: %d errors since the last report: %s", zone, total, "; ".join(items))

    def start(self) -> None:
        """The start-up self-test (bounded by the timeout), then the periodic one in this process."""
        self.self_test()
        self._start_thread()

    def _start_thread(self) -> None:
        with self._lock:
            if self._thread_pid == os.getpid() or self._retired:
                return
            self._thread_pid = os.getpid()
            threading.Thread(target=self._run, name="dnsbl-selftest", daemon=True).start()

    def _run(self) -> None:
        while not self._stop.is_set():
            pending = any(s.status == UNTESTED for s in self.states.values())
            if self._stop.wait(min(RETEST, self.config.selftest_interval) if pending
                               else self.config.selftest_interval):
                return
            try:
                self.self_test()
                self.report_errors()
            except Exception:  # noqa: BLE001 - a bug here must not end the self-tests for good
                log.exception("dnsbl: self-test failed")

    def retire(self) -> None:
        """Stop the self-test thread (a reload replaced this configuration); lookups still work."""
        self._retired = True
        self._stop.set()

    def in_use(self) -> list[str]:
        return [s.zone for s in self.sites if self.states[s.zone].status == OK]
