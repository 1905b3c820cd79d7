"""NAME
    relaymilter.config - the YAML configuration, loaded once into frozen objects

DESCRIPTION
    One file (``-c FILE``; else $RELAYMILTER_CONFIG; else
    /etc/relaymilter/relaymilter.yaml when it exists; else the bundled
    rules/default.yaml) configures the milter, vsmtprelay, vnewspammers and
    the log watcher. Every key is documented with its default in
    rules/relaymilter.sample.yaml.

    The file is read once into a frozen Config and passed to whoever needs
    it; nothing keeps configuration in module globals. A SIGHUP builds a new
    Config and swaps it in for new connections.

    Like sendmail's class w, the host's own names and address literals are
    added to the local domains (add_host_names: true; not with mta: postfix,
    whose idea of local is mydestination alone, so relaymilter's local set is
    exactly what the file lists and never wider than Postfix's), and like sendmail's
    relay-domains file, a numeric prefix such as ``192.168.1`` in a relay
    domains list or file names a client network rather than a domain.

DIAGNOSTICS
    ConfigError ``FILE:LINE: message`` for an unknown key, a wrong type, a bad
    CIDR, a bad window, a missing domains file; nothing starts on a bad file.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from relaymilter import pydeps
from relaymilter.dnsbl.settings import DnsblConfig, load_dnsbl
from relaymilter.errors import ConfigError
from relaymilter.guardconfig import parse_limits, parse_modes
from relaymilter.address.resolve import BadAddress
from relaymilter.address.resolve import normalize_domain as policy_normalize_domain
from relaymilter.policy.limits import Limits
from relaymilter.policy.modes import ENFORCE_ALL, Modes
from relaymilter.recipientsconfig import LOCAL_RECIPIENTS_KEYS, LocalRecipientsConfig, load_local_recipients  # noqa: F401
from relaymilter.store import is_store_url
from relaymilter.yamlcheck import Mapping, compose_file, where

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

SYSTEM_CONFIG = "/etc/relaymilter/relaymilter.yaml"
DEFAULT_SOCKET = "inet:8894@127.0.0.1"
SOCKET_RE = re.compile(r"^(?:inet:\d{1,5}(?:@\S+)?|inet6:\d{1,5}(?:@\S+)?|(?:unix|local):/\S+)$")
PREFIX_RE = re.compile(r"^\d{1,3}(?:\.\d{1,3}){0,3}$")

TOP_KEYS = (
    "socket", "workers", "log", "log_level", "mta", "local_domains", "local_domains_file", "add_host_names",
    "relay_domains", "relay_domains_file", "relay_subdomains", "percent_hack", "bang_paths",
    "trusted_networks", "permit_authenticated", "trust_local_socket", "relayers", "spammers", "popwatch",
    "limits", "modes", "local_recipients", "metrics",
    "dnsbl",
)
RELAYERS_KEYS = ("path", "url", "window")
SPAMMERS_KEYS = ("source", "path")
POPWATCH_KEYS = ("logfiles", "patterns", "pattern_file", "grace", "max_session", "skip_networks", "readback", "write",
                 "flock")
METRICS_KEYS = ("listen", "popwatch_listen")
LISTEN_RE = re.compile(r"^(?:\[([0-9A-Fa-f:.]+)\]|([^\s:\[\]]+)):(\d{1,5})$")
DEFAULT_TRUSTED = ("127.0.0.0/8", "::1/128")


@dataclass(frozen=True)
class RelayersConfig:
    path: str = "~/etc/relayers.db"
    url: Optional[str] = None
    window: Optional[int] = None            # minutes; None = presence suffices

    @property
    def location(self) -> str:
        """What open_relay_store() takes: the URL when one is set, else the expanded path."""
        return self.url or os.path.expanduser(self.path)


@dataclass(frozen=True)
class SpammersConfig:
    source: str = "~/etc/spammers"
    path: str = "~/etc/spammers.db"


@dataclass(frozen=True)
class PopwatchConfig:
    logfiles: tuple[str, ...] = ("/var/log/mail.log",)
    patterns: Optional[tuple[str, ...]] = None     # None = every shipped pattern
    pattern_file: Optional[str] = None             # None = the bundled rules/logpatterns.yaml
    grace: int = 1800                              # seconds after the last login
    max_session: int = 28800                       # seconds an open session (no logout seen) keeps its address
    skip_networks: Optional[tuple[Network, ...]] = None   # None = trusted_networks
    readback: bool = False
    write: bool = True
    flock: bool = True


@dataclass(frozen=True)
class MetricsConfig:
    listen: Optional[tuple[str, int]] = None           # (host, port) of the milter's endpoint; None = off
    popwatch_listen: Optional[tuple[str, int]] = None  # the same for relaymilter-popwatch


@dataclass(frozen=True)
class Config:
    source: str
    socket: str = DEFAULT_SOCKET
    workers: Optional[int] = None           # milter processes; None = auto (the CPUs this process may use)
    log: str = "stderr"
    log_level: str = "info"
    mta: str = "sendmail"
    local_domains: frozenset[str] = frozenset()
    relay_domains: frozenset[str] = frozenset()
    relay_subdomains: bool = True
    percent_hack: bool = True
    bang_paths: bool = True
    trusted_networks: tuple[Network, ...] = ()
    permit_authenticated: bool = True
    trust_local_socket: bool = False
    relayers: RelayersConfig = field(default_factory=RelayersConfig)
    spammers: SpammersConfig = field(default_factory=SpammersConfig)
    popwatch: PopwatchConfig = field(default_factory=PopwatchConfig)
    limits: Optional[Limits] = None                 # None = no relaying limits
    modes: Modes = ENFORCE_ALL
    local_recipients: LocalRecipientsConfig = field(default_factory=LocalRecipientsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    dnsbl: Optional[DnsblConfig] = None             # None: no DNS blocklist, no DNS query


def rules_dir() -> Path:
    """The bundled rules/ folder: inside the installed package, or the source tree's."""
    here = Path(__file__).resolve().parent
    installed = here / "rules"
    if installed.is_dir():
        return installed
    return here.parent.parent / "rules"


def default_config_path() -> str:
    return str(rules_dir() / "default.yaml")


def find_config(explicit: Optional[str] = None) -> str:
    """Which file to read: -c, then $RELAYMILTER_CONFIG, then the system file, then the bundled one."""
    if explicit:
        return explicit
    env = os.environ.get("RELAYMILTER_CONFIG")
    if env:
        return env
    if os.path.exists(SYSTEM_CONFIG):
        return SYSTEM_CONFIG
    return default_config_path()


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


def _choice(m: Mapping, key: str, default: str, allowed: tuple[str, ...]) -> str:
    v = m.str(key, default)
    if v not in allowed:
        raise m.err(key, "must be one of %s" % ", ".join(allowed))
    return v


def _check_redis_url(rel: Mapping, url: str) -> None:
    """A bad Redis URL or option stops start-up here, not at the first relay attempt."""
    if not is_store_url(url):
        raise rel.err("url", "want redis://HOST:PORT/DB, rediss://..., unix://... or redis+sentinel://...")
    try:
        from relaymilter.store.redisurl import parse_store_url  # needs redis-py: only for a url
    except ModuleNotFoundError as exc:
        raise rel.err("url", pydeps.missing(exc) or str(exc)) from None
    try:
        parse_store_url(url)
    except ValueError as exc:
        raise rel.err("url", str(exc)) from None


def socket_problem(spec: str) -> Optional[str]:
    """Why *spec* is not a socket relaymilter may listen on, or None.

    libmilter reads ``inet:PORT`` with no host as every interface; a relay
    decision socket must never be reachable from the network by accident,
    so the host is required (``@0.0.0.0`` says it on purpose).
    """
    if not SOCKET_RE.match(spec):
        return "want inet:PORT@HOST, inet6:PORT@HOST or unix:/path, got %r" % spec
    if spec.startswith(("inet:", "inet6:")) and "@" not in spec:
        loopback = "127.0.0.1" if spec.startswith("inet:") else "::1"
        return ("%s names no host, and libmilter would listen on every interface: write %s@%s for loopback, "
                "or name the address to listen on" % (spec, spec, loopback))
    return None


def parse_workers(value: object) -> Optional[int]:
    """The ``workers`` setting: a whole number >= 1, or "auto" (None: the CPUs this process may use)."""
    if value == "auto":
        return None
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 256:
        raise ValueError("must be auto or a whole number from 1 to 256, got %r" % (value,))
    return value


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPV6]:PORT`` as (host, port); ValueError with the reason."""
    m = LISTEN_RE.match(text.strip())
    if not m or int(m.group(3)) > 65535:
        raise ValueError("want HOST:PORT or [IPV6]:PORT (e.g. 127.0.0.1:9464), got %r" % text)
    return (m.group(1) or m.group(2), int(m.group(3)))


def _listen(m: Mapping, key: str) -> Optional[tuple[str, int]]:
    text = m.str(key, None, nullable=True)
    if text is None:
        return None
    try:
        return parse_listen(text)
    except ValueError as exc:
        raise m.err(key, str(exc)) from None


def load_config(path: Optional[str] = None) -> Config:
    """Read and validate the configuration (see find_config for which file)."""
    source = find_config(path)
    top = Mapping(source, compose_file(source), "the configuration")
    top.check_keys(TOP_KEYS)

    socket_spec = top.str("socket", DEFAULT_SOCKET)
    problem = socket_problem(socket_spec)
    if problem:
        raise top.err("socket", problem)
    workers_text = top.value("workers", "auto")
    try:
        workers = parse_workers(workers_text)
    except ValueError as exc:
        raise top.err("workers", str(exc)) from None

    trusted_extra: list[Network] = []
    local = set(_domains(top, "local_domains", trusted_extra))
    if trusted_extra:
        raise top.err("local_domains", "holds an address prefix; client networks go in trusted_networks")
    local_file = top.str("local_domains_file", None, nullable=True)
    if local_file:
        names, nets = read_domains_file(local_file, where(source, top.node_of("local_domains_file")))
        if nets:
            raise top.err("local_domains_file", "holds an address prefix; client networks go in trusted_networks")
        local.update(names)
    mta = _choice(top, "mta", "sendmail", ("sendmail", "postfix"))
    if top.bool("add_host_names", mta == "sendmail"):
        if mta == "postfix":
            raise top.err("add_host_names", "true counts names Postfix relays as local (mta: postfix); "
                          "list mydestination's names in local_domains instead")
        local.update(host_names())

    relay = set(_domains(top, "relay_domains", trusted_extra))
    relay_file = top.str("relay_domains_file", None, nullable=True)
    if relay_file:
        names, nets = read_domains_file(relay_file, where(source, top.node_of("relay_domains_file")))
        relay.update(names)
        trusted_extra.extend(nets)

    if top.has("trusted_networks"):
        trusted = top.str_list("trusted_networks", check=parse_network)
    else:
        trusted = [parse_network(n) for n in DEFAULT_TRUSTED]

    rel = top.sub("relayers")
    rel.check_keys(RELAYERS_KEYS, "relayers key")
    url = rel.str("url", None, nullable=True)
    if url is not None:
        _check_redis_url(rel, url)
    relayers = RelayersConfig(
        path=rel.str("path", RelayersConfig.path),
        url=url,
        window=rel.int("window", None, minimum=1, nullable=True),
    )

    sp = top.sub("spammers")
    sp.check_keys(SPAMMERS_KEYS, "spammers key")
    spammers = SpammersConfig(source=sp.str("source", SpammersConfig.source), path=sp.str("path", SpammersConfig.path))

    pw = top.sub("popwatch")
    pw.check_keys(POPWATCH_KEYS, "popwatch key")
    skip = pw.str_list("skip_networks", check=parse_network) if pw.has("skip_networks") else None
    patterns = pw.str_list("patterns") if pw.has("patterns") else None
    popwatch = PopwatchConfig(
        logfiles=tuple(pw.str_list("logfiles", PopwatchConfig.logfiles)),
        patterns=tuple(patterns) if patterns is not None else None,
        pattern_file=pw.str("pattern_file", None, nullable=True),
        grace=pw.int("grace", PopwatchConfig.grace, minimum=1),
        max_session=pw.int("max_session", PopwatchConfig.max_session, minimum=1),
        skip_networks=tuple(skip) if skip is not None else None,
        readback=pw.bool("readback", False),
        write=pw.bool("write", True),
        flock=pw.bool("flock", True),
    )

    mx = top.sub("metrics")
    mx.check_keys(METRICS_KEYS, "metrics key")
    metrics = MetricsConfig(listen=_listen(mx, "listen"), popwatch_listen=_listen(mx, "popwatch_listen"))
    if metrics.listen is not None and metrics.listen == metrics.popwatch_listen:
        raise mx.err("popwatch_listen", "the milter and the watcher cannot listen on the same address")

    return Config(
        source=source,
        socket=socket_spec,
        workers=workers,
        log=_choice(top, "log", "stderr", ("stderr", "syslog")),
        log_level=_choice(top, "log_level", "info", ("debug", "info", "warning", "error")),
        mta=mta,
        local_domains=frozenset(local),
        relay_domains=frozenset(relay),
        relay_subdomains=top.bool("relay_subdomains", True),
        percent_hack=top.bool("percent_hack", True),
        bang_paths=top.bool("bang_paths", True),
        trusted_networks=tuple(trusted) + tuple(trusted_extra),
        permit_authenticated=top.bool("permit_authenticated", True),
        trust_local_socket=top.bool("trust_local_socket", False),
        relayers=relayers,
        spammers=spammers,
        popwatch=popwatch,
        limits=parse_limits(top),
        modes=parse_modes(top),
        local_recipients=load_local_recipients(top),
        metrics=metrics,
        dnsbl=load_dnsbl(top),
    )
