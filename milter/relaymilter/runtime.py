"""NAME
    relaymilter.runtime - one configuration with the policy, stores and caches built from it

DESCRIPTION
    Runtime is what a connection decides with (policy.verdict.Sources): the
    frozen configuration, the policy core's RcptPolicy, the open relayers,
    spammers and guard stores. A SIGHUP reload builds a new Runtime and
    RuntimeHolder swaps it in whole; connections keep the one they started
    with. Open stores are handed on to the new Runtime when they name the
    same map. Nothing here imports pymilter: relaymilter.adapter is the
    milter side.

    The caches of the decision path, all of them. Each was measured with and
    without it (benchmarks/milter_ceiling.py --caches, workers=auto, C=8,
    milter CPU per session; a cold workload of 10,000 clients, senders and
    recipients cycling, and a hot one of 400); those that did not pay were
    removed (a memo of parsed client addresses, of senders' spammers keys):

      cache          key                  lifetime / invalidation         bound        worth (CPU/session)
      -------------  -------------------  ------------------------------  -----------  ----------------------
      rcpt_memo      the RCPT argument    this Runtime: the answer        MEMO_MAX     hot: 427 us with,
      (here)         as sent (at most     depends on the configuration    entries,     523 without; cold:
                     MEMO_KEY_MAX chars)  alone; a reload starts a new    cleared      no cost (465 / 454)
                                          one                             when full
      relayers       the client address   one file version (dev, inode,   CACHE_MAX    cold: 465 us with,
      answers        as asked             size, mtime_ns), only once its  answers per  530 without; hot:
      (store.bdb.                         mtime is settled; a stat per    version      427 / 474
      MapReader)                          lookup sees any write
      spammers list  -                    one file version, checked by    the list     the lookup itself:
      (store.spam-                        a stat at every MAIL            (a frozen-   one set operation
      mers)                                                               set)         per MAIL
      standing       -                    one transaction (MAIL to MAIL)  one value    relayers.db read once
      (policy.                                                                         per transaction,
      session)                                                                         not per RCPT
      identity and   -                    one transaction (policy.limits  one value    the users map read and
      suspension                          .Txn)                                        the suspension checked
      (Txn)                                                                            once per transaction
      users map      the client address   as relayers answers             CACHE_MAX    one stat per lookup
      answers        as asked                                             answers per
      (store.guard)                                                       version
      no suspended   -                    one second (store.guard         one value    one stat a second
      map                                 .ABSENT_RECHECK)                             instead of one per
                                                                                       transaction

      local_recip-   -                    one file version of each        the whole    a stat and a set
      ients tables                        source file (dev, inode,        source        lookup per source,
      (store.recip-                       size, mtime, ctime), only       (10 MB per   not a flock, an
      ients)                              once settled; a stat per        100k keys)   fstat and a read
                                          lookup sees any change                       per key (see there)

    All caches off at once: 586 us (cold) and 570 us (hot) against 465 and
    427; the C reference milter took about 200 us in the same runs.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Set as AbstractSet
from typing import Optional, TypeVar, cast

from relaymilter.config import Config
from relaymilter.decisionlog import DecisionLog, logging_sink
from relaymilter.metrics.milter import Tally
from relaymilter.dnsbl.rules import Blocklists
from relaymilter.policy.decision import Decision
from relaymilter.policy.limits import Guard
from relaymilter.policy.limits import Store as GuardStoreView  # the part of the guard store the policy uses
from relaymilter.policy.mail import SenderKeys, mail_plan
from relaymilter.policy.modes import Modes
from relaymilter.policy.rcpt import Client, Destination, RcptPolicy, destination
from relaymilter.policy.recipients import Lookup
from relaymilter.store.guard import Ask, open_guard_store
from relaymilter.store.recipients import LocalRecipients
from relaymilter.store.relayers import RelayStore, open_relay_store
from relaymilter.store.spammers import SpammersMap

log = logging.getLogger("relaymilter")

# rcpt_memo is cleared when full: a flood of distinct recipients costs the
# memo, never memory. Longer texts are not kept at all.
MEMO_MAX = 4096
MEMO_KEY_MAX = 320

V = TypeVar("V")


class Runtime:
    """One configuration with the policy and the stores built from it (policy.verdict.Sources)."""

    def __init__(self, config: Config, previous: Optional["Runtime"] = None) -> None:
        self.config = config
        self.policy = rcpt_policy(config)
        # Keep open stores across a reload when they name the same map: their
        # handles and last-good state stay valid, and nothing is reopened.
        location = config.relayers.location
        if previous is not None and previous.relayers.location == location:
            self.relayers: RelayStore = previous.relayers
        else:
            self.relayers = open_relay_store(location)
        spam_path = os.path.expanduser(config.spammers.path)
        self.spammers: SpammersMap = (previous.spammers if previous is not None and previous.spammers_path == spam_path
                                      else SpammersMap(spam_path))
        self.spammers_path: str = spam_path
        # local_recipients: the sources are kept across a reload that names the same ones.
        lr = config.local_recipients
        if not lr.enabled:
            self.recipients: Optional[LocalRecipients] = None
        elif previous is not None and previous.recipients is not None and previous.config.local_recipients == lr:
            self.recipients = previous.recipients
        else:
            self.recipients = LocalRecipients(lr.passwd, lr.aliases, lr.lists, lr.maps)
        self.local_recipients: Optional[Callable[[], Lookup]] = (
            self.recipients.transaction_lookup if self.recipients is not None else None)
        self.recipient_delimiter = lr.recipient_delimiter
        # DNS blocklists (the dnsbl step): verified lists and cached answers
        # are handed on across a reload; the start-up self-test runs here.
        earlier = previous.blocklists if previous is not None else None
        self.blocklists: Optional[Blocklists] = None
        if config.dnsbl is not None:
            self.blocklists = Blocklists(config.dnsbl, earlier)
            self.blocklists.start()
        elif earlier is not None:
            earlier.retire()
        # The config is frozen per Runtime, so what an address resolves to is
        # too: memoised here, dropped with the Runtime on reload.
        self.rcpt_memo: dict[str, Destination] = {}
        # Who is relaying and how much (policy.limits): the files beside relayers.db, or its Redis.
        guard_store: Optional[GuardStoreView] = (
            previous.guard.store if previous is not None and previous.relayers is self.relayers
            else cast(GuardStoreView, open_guard_store(location, relay=self.relayers)))
        self.guard: Guard = Guard(config.limits, guard_store, Ask)
        # The modes of the newest configuration, shared by every Runtime of the chain: a
        # connection reads them at each MAIL (policy.modes: a reload applies from the next transaction).
        self._modes: list[Modes] = previous._modes if previous is not None else [config.modes]
        self._modes[0] = config.modes

    def current_modes(self) -> Modes:
        return self._modes[0]

    def client(self, addr: str) -> Client:
        """RcptPolicy.client() for libmilter's address text."""
        return self.policy.client(addr)

    def destination(self, rcpt: str) -> Destination:
        """policy.rcpt.destination() for *rcpt*, memoised."""
        dest = self.rcpt_memo.get(rcpt)
        if dest is None:
            dest = _remember(self.rcpt_memo, rcpt, destination(self.policy, rcpt))
        return dest

    def mail_plan(self, sender: str) -> SenderKeys | Decision:
        """policy.mail.mail_plan() for *sender*."""
        return mail_plan(sender)

    def relayers_stamp(self, key: str) -> Optional[int]:
        return self.relayers.lookup(key)

    def spammers_listed(self) -> AbstractSet[str]:
        return self.spammers.members()


def rcpt_policy(config: Config) -> RcptPolicy:
    """The policy core's view of *config*."""
    return RcptPolicy(
        local_domains=config.local_domains,
        relay_domains=config.relay_domains,
        trusted_networks=config.trusted_networks,
        permit_authenticated=config.permit_authenticated,
        window=config.relayers.window,
        relay_subdomains=config.relay_subdomains,
        percent_hack=config.percent_hack,
        bang_paths=config.bang_paths,
        trust_local_socket=config.trust_local_socket,
    )


def _remember(memo: dict[str, V], key: str, value: V) -> V:
    """Keep *value* in a memo table, which is cleared when full; longer texts are not kept."""
    if len(key) <= MEMO_KEY_MAX:
        if len(memo) >= MEMO_MAX:
            memo.clear()
        memo[key] = value
    return value


class RuntimeHolder:
    """The Runtime new connections use (swapped whole on reload), and the decision log."""

    def __init__(self, runtime: Runtime, decisions: Optional[DecisionLog] = None) -> None:
        self._runtime = runtime
        self._lock = threading.Lock()
        self.decisions = decisions if decisions is not None else DecisionLog(logging_sink(log))
        self.tally: Optional[Tally] = None      # the metrics' counters, when metrics are on

    @property
    def current(self) -> Runtime:
        return self._runtime

    def swap(self, config: Config) -> Runtime:
        with self._lock:
            self._runtime = Runtime(config, self._runtime)
            return self._runtime

