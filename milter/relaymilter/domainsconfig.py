"""NAME
    relaymilter.domainsconfig - the local and relay domains and the trusted networks of the configuration

DESCRIPTION
    The keys that say where mail may go and who may send it anywhere:

        local_domains: [example.com]          # class w
        local_domains_file: /etc/mail/local-host-names
        add_host_names: true                  # the host's own names and [ip] literals (sendmail only)
        relay_domains: []                     # class R
        relay_domains_file: /etc/mail/relay-domains
        trusted_networks: [127.0.0.0/8, "::1/128"]

    Parsed here, called by relaymilter.config.load_config in the file's
    order.  Like sendmail's class w, the host's own names and address
    literals are added to the local domains (add_host_names: true; not with
    mta: postfix, whose idea of local is mydestination alone, so
    relaymilter's local set is exactly what the file lists and never wider
    than Postfix's), and like sendmail's relay-domains file, a numeric
    prefix such as ``192.168.1`` in a relay domains list or file names a
    client network rather than a domain.  Domains are normalised by the
    policy's own normaliser, so the configuration and the decisions agree.

DIAGNOSTICS
    ConfigError ``FILE:LINE: message`` for a bad domain or literal, a bad
    CIDR (with the network meant when host bits are set), an address prefix
    where only domains belong, add_host_names with mta: postfix, and a
    domains file that cannot be read or is not UTF-8 text.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from typing import Union

from relaymilter.address.resolve import BadAddress
from relaymilter.address.resolve import normalize_domain as policy_normalize_domain
from relaymilter.errors import ConfigError
from relaymilter.yamlcheck import Mapping, where

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

PREFIX_RE = re.compile(r"^\d{1,3}(?:\.\d{1,3}){0,3}$")
DEFAULT_TRUSTED = ("127.0.0.0/8", "::1/128")


def normalize_domain(text: str) -> str:
    """A domain or [literal] as the policy compares it (the policy's own normaliser, so both agree)."""
    try:
        return policy_normalize_domain(text)
    except BadAddress:
        what = "bad address literal" if text.strip().startswith("[") else "bad domain name"
        raise ValueError("%s %r" % (what, text)) from None


def parse_network(text: str) -> Network:
    """A CIDR (or bare address) as a network; ValueError with the reason."""
    try:
        return ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        if "host bits set" in str(exc):
            fixed = ipaddress.ip_network(text.strip(), strict=False)
            raise ValueError("%r has host bits set (did you mean %s?)" % (text, fixed)) from None
        raise ValueError("bad network %r (want CIDR like 192.0.2.0/24 or 2001:db8::/32)" % text) from None


def prefix_network(text: str) -> Network:
    """sendmail relay-domains style numeric prefix ``192.168.1`` -> 192.168.1.0/24."""
    octets = text.split(".")
    if any(int(o) > 255 for o in octets):
        raise ValueError("bad address prefix %r" % text)
    padded = octets + ["0"] * (4 - len(octets))
    return ipaddress.ip_network("%s/%d" % (".".join(padded), 8 * len(octets)))


def read_domains_file(path: str, source_where: str) -> tuple[list[str], list[Network]]:
    """Read a sendmail class file (local-host-names, relay-domains): names and numeric prefixes."""
    try:
        with open(os.path.expanduser(path), encoding="utf-8", errors="strict") as fh:
            lines = fh.read().splitlines()
    except OSError as exc:
        raise ConfigError("%s: cannot read %s: %s" % (source_where, path, exc.strerror or exc)) from None
    except UnicodeDecodeError:
        raise ConfigError("%s: %s is not UTF-8 text" % (source_where, path)) from None
    names: list[str] = []
    nets: list[Network] = []
    for no, line in enumerate(lines, 1):
        word = line.split("#", 1)[0].strip()
        if not word:
            continue
        try:
            if PREFIX_RE.match(word):
                nets.append(prefix_network(word))
            else:
                names.append(normalize_domain(word))
        except ValueError as exc:
            raise ConfigError("%s:%d: %s" % (path, no, exc)) from None
    return names, nets


def host_names() -> set[str]:
    """The host's own names and [ip] literals, as sendmail puts them in class w."""
    names = {"localhost", "localhost.localdomain", "[127.0.0.1]", "[ipv6:::1]"}
    for name in (socket.gethostname(), socket.getfqdn()):
        if name:
            try:
                names.add(normalize_domain(name))
            except ValueError:
                pass
    for addr in local_addresses():
        names.add("[ipv6:%s]" % addr if addr.version == 6 else "[%s]" % addr)
    return names


def local_addresses() -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Addresses configured on this host's interfaces (Linux /proc; empty elsewhere)."""
    found: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    try:
        with open("/proc/net/fib_trie", encoding="ascii") as fh:
            lines = fh.read().splitlines()
        for prev, line in zip(lines, lines[1:]):
            if line.strip() == "/32 host LOCAL":
                found.append(ipaddress.IPv4Address(prev.split()[-1]))
    except OSError:
        pass
    try:
        with open("/proc/net/if_inet6", encoding="ascii") as fh:
            for line in fh:
                raw = line.split()[0]
                found.append(ipaddress.IPv6Address(int(raw, 16)))
    except OSError:
        pass
    return sorted(set(found), key=lambda a: (a.version, int(a)))


def _domains(m: Mapping, key: str, nets: list[Network]) -> list[str]:
    names = []
    for word in m.str_list(key):
        if PREFIX_RE.match(word):
            try:
                nets.append(prefix_network(word))
            except ValueError as exc:
                raise m.err(key, str(exc)) from None
        else:
            try:
                names.append(normalize_domain(word))
            except ValueError as exc:
                raise m.err(key, str(exc)) from None
    return names


def parse_local_domains(top: Mapping) -> set[str]:
    """local_domains and local_domains_file: names only, an address prefix is refused."""
    nets: list[Network] = []
    local = set(_domains(top, "local_domains", nets))
    if nets:
        raise top.err("local_domains", "holds an address prefix; client networks go in trusted_networks")
    local_file = top.str("local_domains_file", None, nullable=True)
    if local_file:
        names, nets = read_domains_file(local_file, where(top.source, top.node_of("local_domains_file")))
        if nets:
            raise top.err("local_domains_file", "holds an address prefix; client networks go in trusted_networks")
        local.update(names)
    return local


def parse_host_names(top: Mapping, mta: str) -> set[str]:
    """add_host_names (default: true with mta: sendmail): the host's names to add to the local domains."""
    if not top.bool("add_host_names", mta == "sendmail"):
        return set()
    if mta == "postfix":
        raise top.err("add_host_names", "true counts names Postfix relays as local (mta: postfix); "
                      "list mydestination's names in local_domains instead")
    return host_names()


def parse_relay_domains(top: Mapping) -> tuple[set[str], list[Network]]:
    """relay_domains and relay_domains_file: the domains, and the client networks their numeric prefixes name."""
    nets: list[Network] = []
    relay = set(_domains(top, "relay_domains", nets))
    relay_file = top.str("relay_domains_file", None, nullable=True)
    if relay_file:
        names, file_nets = read_domains_file(relay_file, where(top.source, top.node_of("relay_domains_file")))
        relay.update(names)
        nets.extend(file_nets)
    return relay, nets


def parse_trusted_networks(top: Mapping) -> list[Network]:
    """trusted_networks, which replaces DEFAULT_TRUSTED when given."""
    if top.has("trusted_networks"):
        return top.str_list("trusted_networks", check=parse_network)
    return [parse_network(n) for n in DEFAULT_TRUSTED]
