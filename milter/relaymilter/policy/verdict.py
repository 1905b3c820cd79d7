"""NAME
    relaymilter.policy.verdict - what a session decides with, and what it answers

DESCRIPTION
    The values and interfaces of the one decision path (policy.session):
    the Sources a Session is handed (the policy and its maps; production's is
    relaymilter.runtime.Runtime), the Blocklists step it may ask
    (relaymilter.dnsbl.rules.Blocklists) and its Blocklisted answer, the
    client's Standing, and the RcptVerdict each RCPT gets.  They live apart
    from the steps so that the sources (runtime, dnsbl) and the tests name
    them without the session's logic.

    Standing - what the client rules make of the client in a transaction:

        TRUSTED         inside trusted_networks (or a trusted local socket)
        AUTHENTICATED   {auth_authen} set and permit_authenticated
        LISTED          its address in relayers.db (recent enough, if a
                        window is set)
        STRANGER        none of these; also any session the milter cannot
                        place (no CONNECT, an unknown address family)
        UNAVAILABLE     relayers.db could not be read: neither listed nor
                        known to be a stranger

    Each value is the rule name a granted relay is logged with.

DIAGNOSTICS
    Nothing here raises.  A Sources map that cannot be read raises
    relaymilter.errors.StoreUnavailable; policy.session turns that into a
    451 4.3.0 (RELAYERS_UNAVAILABLE at RCPT).

Stdlib only: part of the pure policy core.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Set as AbstractSet
from typing import NamedTuple, Optional, Protocol

from relaymilter import replies
from relaymilter.address.resolve import Resolved
from relaymilter.policy.decision import Continue, Decision, TempFail
from relaymilter.policy.mail import SenderKeys
from relaymilter.policy.rcpt import Destination, RcptPolicy
from relaymilter.policy.recipients import Lookup


class Standing(enum.Enum):
    """What the client rules make of the client in this transaction (the table above)."""

    TRUSTED = "trusted_network"
    AUTHENTICATED = "authenticated"
    LISTED = "relayers_db"
    STRANGER = "stranger"
    UNAVAILABLE = "relayers_unavailable"


class Blocklisted(NamedTuple):
    """What the DNS blocklists say about a client: a refusal (None: none) and the log text."""

    decision: Optional[Decision]
    note: str


class Blocklists(Protocol):
    """The DNS blocklist step (relaymilter.dnsbl.rules.Blocklists)."""

    def exempt(self, resolved: Optional[Resolved]) -> bool:
        """Whether a recipient is always accepted (postmaster, abuse)."""

    def check(self, key: str) -> Blocklisted:
        """Ask the lists about the client whose relayers key (its IP) is *key*."""

    def known(self, key: str) -> Optional[Blocklisted]:
        """The answer kept for *key*, if any still holds (never asks the DNS)."""


class Sources(Protocol):
    """What a session decides with: the policy and its maps (relaymilter.runtime.Runtime)."""

    policy: RcptPolicy
    # local_recipients: a lookup of which source knows a local user (policy.recipients.Lookup) over
    # the sources as they are now, asked for once per transaction; None: not configured.
    local_recipients: Optional[Callable[[], Lookup]]
    recipient_delimiter: str

    @property
    def blocklists(self) -> Optional[Blocklists]:
        """The DNS blocklist step, None when no list is configured."""

    def destination(self, rcpt: str) -> Destination:
        """policy.rcpt.destination() for *rcpt* (may be memoised)."""

    def mail_plan(self, sender: str) -> SenderKeys | Decision:
        """policy.mail.mail_plan() for *sender* (may be memoised)."""

    def relayers_stamp(self, key: str) -> Optional[int]:
        """The login time relayers.db holds for *key*, None if absent; StoreUnavailable if unreadable."""

    def spammers_listed(self) -> AbstractSet[str]:
        """Every key of the spammers map; StoreUnavailable if unreadable."""

    # Optional (a Sources without them has no limits and enforces every rule):
    #   guard: policy.limits.Guard
    #   current_modes() -> policy.modes.Modes, the modes of the configuration in force now


class RcptVerdict(NamedTuple):
    """A RCPT decision and the destination it was made for (the log line shows both).

    *source* names the local_recipients source that knew a local user; *note*
    is what a rule step adds to the log line after the rule (dnsbl: site=...).
    """

    decision: Decision
    destination: Destination
    source: Optional[str] = None
    note: str = ""


LOCAL_DOMAIN = Continue("local_domain")
RELAY_DOMAIN = Continue("relay_domain")
RELAYERS_UNAVAILABLE = TempFail(replies.RELAY_CHECK_UNAVAILABLE, "relayers_unavailable")
