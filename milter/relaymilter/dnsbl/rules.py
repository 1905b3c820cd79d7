"""NAME
    relaymilter.dnsbl.rules - the dnsbl step of the RCPT decision

DESCRIPTION
    Blocklists is what policy.session asks (policy.verdict.Blocklists) for a
    stranger whose recipient would otherwise be accepted: whether the
    recipient is exempt (exempt_recipients: local parts such as postmaster),
    and what the lists say about the client, as a decision and a log note:

        listed   Reject(reply from the template, "dnsbl")
                 note: site=zen.spamhaus.org answer=127.0.0.4 weight=3/3
        unknown  TempFail(451 4.7.1, "dnsbl_unavailable") - on_error
                 tempfail, and a failed list could change the outcome
        clean    no decision; note: dnsbl=pass weight=0/3
    and a failed list adds "dnsbl_error site=... answer=... (meaning)" to
    the note in every case.

    Runtime makes one per configuration (start() runs the start-up
    self-test); a reload hands the previous one on, so verified lists and
    cached answers survive it.

DIAGNOSTICS
    A client key that is not an IP address (none reaches here: the session
    only asks for clients with one) is answered "not listed".
"""

from __future__ import annotations

import ipaddress
import time
from typing import Optional

from relaymilter import replies
from relaymilter.dnsbl.checker import Dnsbl
from relaymilter.dnsbl.settings import DnsblConfig
from relaymilter.address.resolve import Resolved
from relaymilter.policy.decision import Reject, TempFail
from relaymilter.policy.verdict import Blocklisted

UNAVAILABLE = TempFail(replies.DNSBL_UNAVAILABLE, "dnsbl_unavailable")
MEMO_MAX = 20000        # clients whose whole answer is kept (cleared when full)

_monotonic = time.monotonic


class Blocklists:
    """policy.verdict.Blocklists for one dnsbl configuration."""

    def __init__(self, config: DnsblConfig, previous: Optional["Blocklists"] = None) -> None:
        self.config = config
        self.dnsbl: Dnsbl = Dnsbl(config, previous.dnsbl if previous is not None else None)
        self._exempt = config.exempt_recipients
        # Whole answers per client for as long as every answer behind them holds
        # (the cached path of the milter: one dict lookup); none with an error.
        self._memo: dict[str, tuple[float, int, Blocklisted]] = {}

    def start(self) -> None:
        """The start-up self-test of every list (bounded by the timeout)."""
        self.dnsbl.start()

    def exempt(self, resolved: Optional[Resolved]) -> bool:
        if resolved is None:
            return False
        local = resolved.local_part
        if len(local) > 1 and local[0] == '"' and local[-1] == '"':
            local = local[1:-1]
        return local.lower() in self._exempt

    def known(self, key: str) -> Optional[Blocklisted]:
        hit = self._memo.get(key)
        if hit is not None and hit[0] > _monotonic() and hit[1] == self.dnsbl.generation:
            return hit[2]
        return None

    def check(self, key: str) -> Blocklisted:
        dnsbl = self.dnsbl
        hit = self.known(key)
        if hit is not None:
            return hit
        try:
            ip = ipaddress.ip_address(key)
        except ValueError:
            return Blocklisted(None, "")
        generation = dnsbl.generation
        verdict = dnsbl.lookup(ip)
        note = verdict.detail()
        if verdict.outcome == "listed":
            top = verdict.top
            assert top is not None          # a score >= threshold >= 1 needs a positive listing
            found = Blocklisted(Reject(self.config.refusal(key, top.site.zone, top.reason), "dnsbl"), note)
        elif verdict.outcome == "unknown":
            found = Blocklisted(UNAVAILABLE, note)
        else:
            found = Blocklisted(None, "dnsbl=pass " + note)
        if verdict.expires:
            memo = self._memo
            if len(memo) >= MEMO_MAX:
                memo.clear()
            memo[key] = (verdict.expires, generation, found)
        return found

    def retire(self) -> None:
        self.dnsbl.retire()
