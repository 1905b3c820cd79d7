"""NAME
    relaymilter.runtime - one configuration with the policy, stores and memo tables built from it

DESCRIPTION
    Runtime is what a connection decides with: the frozen configuration, the
    policy core's RcptPolicy, the open relayers and spammers stores, and the
    memo tables of what depends on the configuration alone (what a recipient
    resolves to, a sender's spammers keys, a client address parsed). A
    SIGHUP reload builds a new Runtime and RuntimeHolder swaps it in whole;
    connections keep the one they started with. Open stores are handed on to
    the new Runtime when they name the same map.

    Memo tables are bounded: one that reaches MEMO_MAX entries is cleared,
    so a flood of distinct addresses costs the memo, never memory; texts
    longer than MEMO_KEY_MAX are not kept. Nothing here imports pymilter:
    relaymilter.adapter is the milter side.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Optional

from relaymilter.config import Config
from relaymilter.decisionlog import DecisionLog, logging_sink
from relaymilter.ipaddr import normalize_ip
from relaymilter.policy.decision import Decision
from relaymilter.policy.mail import mail_plan
from relaymilter.policy.rcpt import Client, ClientRules, Destination, RcptPolicy, destination
from relaymilter.policy.tokens import ascii_lower
from relaymilter.store.relayers import RelayStore, open_relay_store
from relaymilter.store.spammers import SpammersMap

log = logging.getLogger("relaymilter")

# Memo tables per Runtime are cleared when full: a flood of distinct
# addresses costs the memo, never memory. Longer texts are not kept at all.
MEMO_MAX = 4096
MEMO_KEY_MAX = 320


class Runtime:
    """One configuration with the policy and the stores built from it."""

    def __init__(self, config: Config, previous: Optional["Runtime"] = None) -> None:
        self.config = config
        self.policy = RcptPolicy(
            local_domains=config.local_domains,
            relay_domains=config.relay_domains,
            trusted_networks=config.trusted_networks,
            permit_authenticated=config.permit_authenticated,
            window=config.relayers.window,
            relay_subdomains=config.relay_subdomains,
            percent_hack=config.percent_hack,
            bang_paths=config.bang_paths,
        )
        # Keep open stores across a reload when they name the same map: their
        # handles and last-good state stay valid, and nothing is reopened.
        location = config.relayers.location
        if previous is not None and previous.relayers.location == location:
            self.relayers: RelayStore = previous.relayers
        else:
            self.relayers = open_relay_store(location)
        spam_path = os.path.expanduser(config.spammers.path)
        if previous is not None and previous.spammers_path == spam_path:
            self.spammers = previous.spammers
        else:
            self.spammers = SpammersMap(spam_path)
        self.spammers_path = spam_path
        # The config is frozen per Runtime, so what an address resolves to is
        # too: memoised here, dropped with the Runtime on reload.
        self.rcpt_memo: dict[str, tuple[Optional[Decision], Decision, str]] = {}
        self.sender_memo: dict[str, tuple[str, ...] | Decision] = {}
        self.client_memo: dict[str, tuple[Client, ClientRules, str]] = {}

    def client(self, raw: str) -> tuple[Client, ClientRules, str]:
        """The Client for libmilter's address text, its rules before AUTH and "[addr]", memoised."""
        try:
            addr = normalize_ip(raw)
        except ValueError:
            addr = raw      # never None: no address at all would count as a local submission
        client = Client(addr)
        value = (client, ClientRules(self.policy, client), "[%s]" % addr)
        _remember(self.client_memo, raw, value)
        return value

    def destination(self, rcpt: str) -> tuple[Optional[Decision], Decision, str]:
        """policy.rcpt.destination() for *rcpt* as (final decision or None, refusal, log detail), memoised."""
        dest = destination(self.policy, rcpt)
        value = (dest.final.decision if dest.final is not None else None, dest.refusal, _detail(dest))
        _remember(self.rcpt_memo, rcpt, value)
        return value

    def mail_plan(self, sender: str) -> tuple[str, ...] | Decision:
        """policy.mail.mail_plan() for *sender*, memoised (the lookups are not)."""
        plan = mail_plan(sender)
        if type(plan) is tuple:     # spammers.db keys are ASCII-lowercased (SpammersMap.members)
            plan = tuple(ascii_lower(key) for key in plan)
        _remember(self.sender_memo, sender, plan)
        return plan


def _remember(memo: dict, key: str, value: Any) -> None:
    """Keep *value* in a memo table, which is cleared when full; longer texts are not kept."""
    if len(key) <= MEMO_KEY_MAX:
        if len(memo) >= MEMO_MAX:
            memo.clear()
        memo[key] = value


class RuntimeHolder:
    """The Runtime new connections use (swapped whole on reload), and the decision log."""

    def __init__(self, runtime: Runtime, decisions: Optional[DecisionLog] = None) -> None:
        self._runtime = runtime
        self._lock = threading.Lock()
        self.decisions = decisions if decisions is not None else DecisionLog(logging_sink(log))

    @property
    def current(self) -> Runtime:
        return self._runtime

    def swap(self, config: Config) -> Runtime:
        with self._lock:
            self._runtime = Runtime(config, self._runtime)
            return self._runtime


def _detail(dest: Destination) -> str:
    """The resolved=/error= part of a RCPT log line."""
    extra = "resolved=%s " % dest.resolved if dest.resolved is not None else ""
    if dest.error:
        extra += "error=%r " % dest.error
    return extra
