"""NAME
    relaymilter.policy.rcpt - what a recipient is and who the client is, for the RCPT TO decision

DESCRIPTION
    The two halves sendmail's check_rcpt looks at, each a value:

    destination()   what a recipient resolves to and where that is: a local
                    domain (class w, or unqualified like ``<postmaster>``), a
                    relay domain (class R, or a subdomain of one unless
                    relay_subdomains is off: FEATURE(relay_hosts_only)),
                    elsewhere, or an address that cannot be parsed.  It
                    depends only on the policy and the text, so a caller may
                    memoise it per policy.
    RcptPolicy.client()
                    the SMTP client as the client rules see it: its relayers.db
                    key and whether it is inside trusted_networks.

    relaymilter.policy.session puts them together in check_rcpt's order.

    "Resolves" is address.resolve(): routing characters left in the local
    part of a local *or relay* domain are unwrapped, as sendmail's
    ParseRecipient does for $=R too, so ``user%remote@relayed.example``
    is judged as ``user@remote``.

DIAGNOSTICS
    An address that cannot be parsed is Place.UNPARSED, with the reason in
    Destination.error; it is refused 553 5.1.3 for a client that may not
    relay (Destination.refusal).

Stdlib only: part of the pure policy core.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field
from typing import Union

from relaymilter import replies
from relaymilter.ipaddr import normalize_ip, parse_ip
from relaymilter.address.resolve import BadAddress, Resolved, parent_domains, resolve
from relaymilter.policy.decision import Decision, Reject

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


class Place(enum.Enum):
    """Where a recipient resolves to."""

    LOCAL = "local_domain"
    RELAY = "relay_domain"
    ELSEWHERE = "elsewhere"     # neither: only the client rules can let it through
    UNPARSED = "unparsed"       # not an address: refused unless the client may relay


@dataclass(frozen=True)
class Client:
    """The SMTP client as the client rules see it.

    *key* is its relayers.db key ("" when it has none: never listed);
    *trusted* is true inside trusted_networks, or for a local socket the
    admin trusts (trust_local_socket).  *text* is how log lines show it.
    """

    text: str
    key: str = ""
    trusted: bool = False


# A session the milter cannot place (no CONNECT, unknown family): a stranger.
UNKNOWN_CLIENT = Client("unknown")


@dataclass(frozen=True)
class RcptPolicy:
    """What the RCPT decision needs from the config (domains normalised by normalize_domain)."""

    local_domains: frozenset[str]
    relay_domains: frozenset[str]
    trusted_networks: tuple[Network, ...]
    permit_authenticated: bool
    window: int | None  # minutes; None = presence in relayers.db suffices
    relay_subdomains: bool = True
    percent_hack: bool = True
    bang_paths: bool = True
    trust_local_socket: bool = False
    _masks: tuple[tuple[int, int, int], ...] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        masks = tuple((n.version, int(n.network_address), int(n.netmask)) for n in self.trusted_networks)
        object.__setattr__(self, "_masks", masks)

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
        """Whether *ip* is inside a trusted network."""
        version, value = ip.version, int(ip)
        return any(v == version and value & mask == net for v, net, mask in self._masks)

    def client(self, addr: str) -> Client:
        """The client at IP text *addr* (as libmilter gives it); one that does not parse is a stranger."""
        try:
            key = normalize_ip(addr)
        except ValueError:
            return Client("[%s]" % addr)
        return Client("[%s]" % key, key, self.is_trusted(parse_ip(key)))

    def local_client(self) -> Client:
        """A client on a local (non-IP) socket: trusted only when the admin says so."""
        return Client("local", "", self.trust_local_socket)


_DENIED = Reject(replies.RELAYING_DENIED, "default_reject")
_MALFORMED = Reject(replies.MALFORMED_ADDRESS, "malformed_address")


@dataclass(frozen=True)
class Destination:
    """What a recipient resolves to (or why it cannot be parsed), and where that is."""

    place: Place
    resolved: Resolved | None
    error: str | None = None

    @property
    def refusal(self) -> Decision:
        """The answer when the client rules do not let the client relay."""
        return _MALFORMED if self.place is Place.UNPARSED else _DENIED

    @property
    def detail(self) -> str:
        """The resolved=/error= part of a log line."""
        if self.resolved is not None:
            return "resolved=%s " % self.resolved
        return "error=%r " % self.error


def destination(policy: RcptPolicy, rcpt: str) -> Destination:
    """Resolve *rcpt* and say where it goes (see the module notes)."""
    try:
        resolved = resolve(rcpt, policy.is_ours, percent_hack=policy.percent_hack, bang_paths=policy.bang_paths)
    except BadAddress as exc:
        return Destination(Place.UNPARSED, None, str(exc))
    if resolved.domain is None or policy.is_local(resolved.domain):
        return Destination(Place.LOCAL, resolved)
    if policy.is_relay(resolved.domain):
        return Destination(Place.RELAY, resolved)
    return Destination(Place.ELSEWHERE, resolved)
