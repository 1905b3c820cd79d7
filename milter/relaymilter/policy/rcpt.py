"""NAME
    relaymilter.policy.rcpt - the RCPT TO decision (sendmail's check_rcpt)

DESCRIPTION
    In check_rcpt's order, the first that applies wins:

    1. the recipient resolves to a local domain (class w), or is
       unqualified (``<postmaster>``)                       -> local_domain
    2. it resolves to a relay domain (class R) or, unless relay_subdomains
       is off (FEATURE(relay_hosts_only)), a subdomain of one -> relay_domain
    3. the client is trusted (no IP at all, as sendmail treats an empty
       {client_addr}, or inside trusted_networks)           -> trusted_network
       authenticated and permit_authenticated               -> authenticated
       listed in relayers.db (recent enough, if a window is set) -> relayers_db
    4. otherwise 550 5.7.1 Relaying denied                  -> default_reject

    "Resolves" is address.resolve(): routing characters left in the local
    part of a local *or relay* domain are unwrapped, as sendmail's
    ParseRecipient does for $=R too, so ``user%remote@relayed.example``
    is judged as ``user@remote``.

    The sender is deliberately not an input: granting relay on MAIL FROM
    (FEATURE(relay_local_from)) makes an open relay for anyone who forges a
    local sender.

DIAGNOSTICS
    The relayers lookup is the only I/O and it is handed in.  If it raises
    StoreUnavailable the relay attempt gets 451 4.3.0 (rule
    relayers_unavailable) - never relayed, never lost; local and relay-domain
    recipients are decided before any lookup, so an unreadable map never
    blocks them.  An address that cannot be parsed is refused with 553 5.1.3
    (malformed_address) for a client that may not relay, and let through
    for one that may (the MTA judges its syntax itself).  Any other
    exception from the lookup propagates: the adapter tempfails it.

Stdlib only: part of the pure policy core.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from relaymilter import replies
from relaymilter.errors import StoreUnavailable
from relaymilter.ipaddr import parse_ip
from relaymilter.policy.address import BadAddress, Resolved, parent_domains, resolve
from relaymilter.policy.decision import Continue, Decision, Reject, TempFail


@dataclass(frozen=True)
class RcptPolicy:
    """What check_rcpt needs from the config (domains normalised by normalize_domain)."""

    local_domains: frozenset[str]
    relay_domains: frozenset[str]
    trusted_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    permit_authenticated: bool
    window: int | None  # minutes; None = presence in relayers.db suffices
    relay_subdomains: bool = True
    percent_hack: bool = True
    bang_paths: bool = True
    _masks: tuple[tuple[int, int, int], ...] | None = field(default=None, init=False, compare=False, repr=False)

    def is_local(self, domain: str) -> bool:
        return domain in self.local_domains

    def is_relay(self, domain: str) -> bool:
        if not self.relay_domains:
            return False
        if domain in self.relay_domains:
            return True
        if not self.relay_subdomains or domain.startswith("["):
            return False
        return any(parent in self.relay_domains for parent in parent_domains(domain))

    def is_ours(self, domain: str) -> bool:
        """Local or relay: routing left in such a local part is unwrapped."""
        return self.is_local(domain) or self.is_relay(domain)

    def is_trusted(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        """Whether *ip* is inside a trusted network (integer compares: the milter's hot path)."""
        masks = self._masks
        if masks is None:
            masks = tuple((n.version, int(n.network_address), int(n.netmask)) for n in self.trusted_networks)
            object.__setattr__(self, "_masks", masks)
        version, value = ip.version, int(ip)
        return any(v == version and value & mask == net for v, net, mask in masks)


@dataclass(frozen=True)
class Client:
    """The SMTP client: addr normalised by ipaddr.normalize_ip, None when there is no IP."""

    addr: str | None
    auth_authen: str | None = None
    # Parsed once per connection, not once per recipient (the milter's hot path).
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = field(init=False, default=None, compare=False, repr=False)
    key: str = field(init=False, default="", compare=False, repr=False)   # canonical relayers.db key

    def __post_init__(self) -> None:
        addr = self.addr
        if not addr:
            return
        try:
            # glibc's inet_pton takes only a canonical dotted quad: the text is the key as it is.
            ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(
                socket.inet_pton(socket.AF_INET, addr))
            key = addr
        except (OSError, TypeError, ValueError):
            try:
                ip = parse_ip(addr)
            except ValueError:
                return
            key = str(ip)
        object.__setattr__(self, "ip", ip)
        object.__setattr__(self, "key", key)

    def authenticated_as(self, auth_authen: str | None) -> "Client":
        """The same client after SMTP AUTH (its parsed address is reused)."""
        other = object.__new__(Client)
        object.__setattr__(other, "addr", self.addr)
        object.__setattr__(other, "auth_authen", auth_authen)
        object.__setattr__(other, "ip", self.ip)
        object.__setattr__(other, "key", self.key)
        return other


@dataclass(frozen=True)
class RcptVerdict:
    """A decision plus what the log line needs: the resolved recipient or why it failed."""

    decision: Decision
    resolved: Resolved | None
    error: str | None = None


# Decisions are immutable values: the common ones are made once.
_LOCAL = Continue("local_domain")
_RELAY = Continue("relay_domain")
_DENIED = Reject(replies.RELAYING_DENIED, "default_reject")
_UNAVAILABLE = TempFail(replies.RELAY_CHECK_UNAVAILABLE, "relayers_unavailable")
_MALFORMED = Reject(replies.MALFORMED_ADDRESS, "malformed_address")
_CLIENT_RULES = {rule: Continue(rule) for rule in ("trusted_network", "authenticated", "relayers_db")}
_RELAYERS_DB = _CLIENT_RULES["relayers_db"]


@dataclass(frozen=True)
class Destination:
    """What a recipient is, whoever the client: the client-independent half of check_rcpt.

    *final* is the verdict when the recipient alone decides (local or relay
    domain), else None and the client rules decide; *refusal* is the answer
    when they do not let the client relay (553 for an address that cannot
    be parsed, else 550 Relaying denied).  Depends only on the policy and
    the recipient text, so a caller may memoise it per policy.
    """

    resolved: Resolved | None
    error: str | None
    final: RcptVerdict | None
    refusal: Decision = _DENIED


def destination(policy: RcptPolicy, rcpt: str) -> Destination:
    """Resolve *rcpt* and classify it as local, relay or neither (see the module notes)."""
    try:
        resolved = resolve(rcpt, policy.is_ours, percent_hack=policy.percent_hack, bang_paths=policy.bang_paths)
    except BadAddress as exc:
        return Destination(None, str(exc), None, _MALFORMED)
    if resolved.domain is None or policy.is_local(resolved.domain):
        return Destination(resolved, None, RcptVerdict(_LOCAL, resolved))
    if policy.is_relay(resolved.domain):
        return Destination(resolved, None, RcptVerdict(_RELAY, resolved))
    return Destination(resolved, None, None)


# Marker for "only the relayers lookup can grant relay"; permit() never
# returns it, and if it ever were answered it would tempfail (fail closed).
_LOOKUP = TempFail(replies.RELAY_CHECK_UNAVAILABLE, "relayers_db?")


class ClientRules:
    """The client rules of check_rcpt for one client, all but the relayers lookup worked out once.

    Trust, authentication and the relayers key cannot change while they hold
    (build a new one when {auth_authen} changes); the relayers lookup itself
    is made on every permit() call, so a vsmtprelay add or delete counts from
    the next call on.
    """

    __slots__ = ("policy", "key", "_static")

    def __init__(self, policy: RcptPolicy, client: Client) -> None:
        self.policy = policy
        self.key = client.key
        ip = client.ip
        # permit()'s answer when no lookup is needed, or _LOOKUP.
        self._static: Decision | None
        if not client.addr or (ip is not None and policy.is_trusted(ip)):
            self._static = _CLIENT_RULES["trusted_network"]
        elif client.auth_authen and policy.permit_authenticated:
            self._static = _CLIENT_RULES["authenticated"]
        elif ip is None:
            # Not an address we can key relayers.db on: no one logged in from it.
            self._static = None
        else:
            self._static = _LOOKUP

    def permit(self, relay_lookup: Callable[[str], int | None], now: float) -> Decision | None:
        """The decision for every recipient the client rules decide, or None when they refuse.

        Continue(rule) when the client may relay, 451 relayers_unavailable
        when relayers.db cannot be read, None for the recipient's refusal
        (Destination.refusal).  Trusted and authenticated clients are
        answered without a lookup.
        """
        if self._static is not _LOOKUP:
            return self._static
        try:
            stamp = relay_lookup(self.key)
        except StoreUnavailable:
            return _UNAVAILABLE
        if stamp is None:
            return None
        window = self.policy.window
        if window is not None and stamp + window * 60 < now:
            return None
        return _RELAYERS_DB

    def decision(
        self,
        dest: Destination,
        relay_lookup: Callable[[str], int | None],
        now: float,
    ) -> Decision:
        """check_rcpt for a recipient already classified by destination()."""
        if dest.final is not None:
            return dest.final.decision
        return self.permit(relay_lookup, now) or dest.refusal

    def decide(
        self,
        dest: Destination,
        relay_lookup: Callable[[str], int | None],
        now: float,
    ) -> RcptVerdict:
        """As decision(), with what the recipient resolved to (or why it did not)."""
        if dest.final is not None:
            return dest.final
        return RcptVerdict(self.decision(dest, relay_lookup, now), dest.resolved, dest.error)


def evaluate_rcpt(
    policy: RcptPolicy,
    client: Client,
    rcpt: str,
    relay_lookup: Callable[[str], int | None],
    now: float,
) -> RcptVerdict:
    """Decide one RCPT TO and say what it resolved to (see the module notes)."""
    dest = destination(policy, rcpt)
    if dest.final is not None:
        return dest.final
    return ClientRules(policy, client).decide(dest, relay_lookup, now)


def check_rcpt(
    policy: RcptPolicy,
    client: Client,
    rcpt: str,
    relay_lookup: Callable[[str], int | None],
    now: float,
) -> Decision:
    """Decide one RCPT TO; evaluate_rcpt() also returns the resolved address."""
    return evaluate_rcpt(policy, client, rcpt, relay_lookup, now).decision
