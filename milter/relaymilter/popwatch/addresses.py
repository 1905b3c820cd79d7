"""NAME
    relaymilter.popwatch.addresses - a login line's address text to its relayers.db key

DESCRIPTION
    ClientAddresses.classify() turns the address a login line gave (as the
    server wrote it) into its relayers.db key with relaymilter.ipaddr
    (IPv4-mapped IPv6 as the dotted quad), or says why it is not to be
    recorded: not an address, or inside skip_networks (clients that relay
    anyway).

    A POP server's clients log in again and again, so the outcome is cached
    per address text (CACHE_MAX texts, then the cache starts afresh). IPv4
    addresses, the common case, are checked against skip_networks with
    integer arithmetic, and an IPv4-mapped one ("::ffff:192.0.2.1", as
    Courier and dual-stack servers log IPv4 clients) is cut to its dotted
    quad with the C parser instead of the ipaddress module.

DIAGNOSTICS
    None raised: the reason comes back as the name of the counter to count
    it in ("invalid_ip", "skipped_local").
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Optional, Sequence, Union

from relaymilter.ipaddr import normalize_ip

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Outcome = tuple[Optional[str], Optional[str]]      # (key or None, None or why it is not recorded)
CACHE_MAX = 65536
MAPPED = "::ffff:"


class ClientAddresses:
    """Address text -> (relayers.db key, reason not to record it); cached."""

    def __init__(self, skip_networks: Sequence[Network] = ()) -> None:
        self.skip_networks = tuple(skip_networks)
        # IPv4 networks as (first address, netmask) integers: one AND per check.
        self._skip_v4 = [(int(n.network_address), int(n.netmask)) for n in self.skip_networks if n.version == 4]
        self._skip_v6 = [n for n in self.skip_networks if n.version == 6]
        self.cache: dict[str, Outcome] = {}     # read directly on the tracker's hot path

    def classify(self, raw: str) -> Outcome:
        """(key, None) to record; (None, "invalid_ip") or (key, "skipped_local") not to."""
        try:
            return self.cache[raw]
        except KeyError:
            pass
        key: Optional[str] = None
        if raw[:len(MAPPED)].lower() == MAPPED:
            # glibc's inet_pton is strict: it accepts a canonical dotted quad only.
            try:
                socket.inet_pton(socket.AF_INET, raw[len(MAPPED):])
                key = raw[len(MAPPED):]
            except OSError:
                pass
        if key is None:
            try:
                key = normalize_ip(raw)
            except ValueError:
                key = None
        if key is None:
            out: Outcome = (None, "invalid_ip")
        elif self.is_local(key):
            out = (key, "skipped_local")
        else:
            out = (key, None)
        if len(self.cache) >= CACHE_MAX:
            self.cache.clear()
        self.cache[raw] = out
        return out

    def is_local(self, key: str) -> bool:
        """Whether the canonical address *key* is inside skip_networks."""
        try:
            packed = socket.inet_pton(socket.AF_INET, key)
        except OSError:
            return any(ipaddress.IPv6Address(key) in net for net in self._skip_v6) if self._skip_v6 else False
        n = int.from_bytes(packed, "big")
        for first, mask in self._skip_v4:
            if n & mask == first:
                return True
        return False
