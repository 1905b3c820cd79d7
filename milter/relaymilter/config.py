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

    This module holds the frozen Config and the top-level keys (socket,
    workers, log, mta, the address-resolution switches, ...); each section
    is parsed and checked in its own module, called here in the file's
    order: domainsconfig (local and relay domains, trusted networks; the
    host's own names, as sendmail's class w), mapsconfig (relayers:,
    spammers:), popwatchconfig, guardconfig (limits:, modes:),
    recipientsconfig (local_recipients:), metricsconfig and
    relaymilter.dnsbl.settings.

DIAGNOSTICS
    ConfigError ``FILE:LINE: message`` for an unknown key, a wrong type, a
    socket that names no host, a bad workers count, and whatever the section
    modules refuse (a bad CIDR, a bad window, a missing domains file, ...);
    nothing starts on a bad file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from relaymilter.dnsbl.settings import DnsblConfig, load_dnsbl
from relaymilter.domainsconfig import (Network, parse_host_names, parse_local_domains, parse_relay_domains,
                                       parse_trusted_networks)
from relaymilter.guardconfig import parse_limits, parse_modes
from relaymilter.mapsconfig import RelayersConfig, SpammersConfig, parse_relayers, parse_spammers
from relaymilter.metricsconfig import MetricsConfig, parse_metrics
from relaymilter.policy.limits import Limits
from relaymilter.policy.modes import ENFORCE_ALL, Modes
from relaymilter.popwatchconfig import PopwatchConfig, parse_popwatch
from relaymilter.recipientsconfig import LocalRecipientsConfig, load_local_recipients
from relaymilter.yamlcheck import Mapping, compose_file

SYSTEM_CONFIG = "/etc/relaymilter/relaymilter.yaml"
DEFAULT_SOCKET = "inet:8894@127.0.0.1"
SOCKET_RE = re.compile(r"^(?:inet:\d{1,5}(?:@\S+)?|inet6:\d{1,5}(?:@\S+)?|(?:unix|local):/\S+)$")

TOP_KEYS = (
    "socket", "workers", "cpu_affinity", "log", "log_level", "mta", "local_domains", "local_domains_file", "add_host_names",
    "relay_domains", "relay_domains_file", "relay_subdomains", "percent_hack", "bang_paths",
    "trusted_networks", "permit_authenticated", "trust_local_socket", "relayers", "spammers", "popwatch",
    "limits", "modes", "local_recipients", "metrics",
    "dnsbl",
)


@dataclass(frozen=True)
class Config:
    source: str
    socket: str = DEFAULT_SOCKET
    workers: Optional[int] = None           # milter processes; None = auto (the CPUs this process may use)
    cpu_affinity: bool = False              # pin worker i to the i-th CPU this process may use
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


def _choice(m: Mapping, key: str, default: str, allowed: tuple[str, ...]) -> str:
    v = m.str(key, default)
    if v not in allowed:
        raise m.err(key, "must be one of %s" % ", ".join(allowed))
    return v


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

    local = parse_local_domains(top)
    mta = _choice(top, "mta", "sendmail", ("sendmail", "postfix"))
    local |= parse_host_names(top, mta)
    relay, relay_nets = parse_relay_domains(top)
    trusted: list[Network] = parse_trusted_networks(top) + relay_nets
    relayers = parse_relayers(top)
    spammers = parse_spammers(top)
    popwatch = parse_popwatch(top)
    metrics = parse_metrics(top)

    return Config(
        source=source,
        socket=socket_spec,
        workers=workers,
        cpu_affinity=_choice(top, "cpu_affinity", "none", ("none", "auto")) == "auto",
        log=_choice(top, "log", "stderr", ("stderr", "syslog")),
        log_level=_choice(top, "log_level", "info", ("debug", "info", "warning", "error")),
        mta=mta,
        local_domains=frozenset(local),
        relay_domains=frozenset(relay),
        relay_subdomains=top.bool("relay_subdomains", True),
        percent_hack=top.bool("percent_hack", True),
        bang_paths=top.bool("bang_paths", True),
        trusted_networks=tuple(trusted),
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
