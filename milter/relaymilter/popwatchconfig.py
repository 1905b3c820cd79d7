"""NAME
    relaymilter.popwatchconfig - the ``popwatch:`` section of the configuration

DESCRIPTION
    What relaymilter-popwatch follows and how long a login keeps its address
    in relayers.db:

        popwatch:
          source: files             # files, journal, or auto
          logfiles: [/var/log/mail.log]
          journal_senders: [...]    # who may send login lines (journal)
          journal_cursor: ~/etc/relaymilter-popwatch.cursor
          patterns: null            # names from the pattern file; null = every one
          pattern_file: null        # null = the bundled rules/logpatterns.yaml
          grace: 1800               # seconds after the last login (or logout)
          max_session: 28800        # seconds an open session keeps its address
          skip_networks: null       # null = trusted_networks
          readback: false
          write: true
          flock: true

    Parsed here, called by relaymilter.config.load_config; the watcher
    (relaymilter.cli.popwatch) takes the frozen PopwatchConfig.

    Where logins are read (``source``): ``files`` follows popwatch.logfiles;
    ``journal`` follows the systemd journal; ``auto`` is the journal when
    journald runs (its socket JOURNAL_SOCKET exists and answers), else the
    files.

    In the journal, every entry carries fields journald sets itself from the
    sender's credentials (their names begin with "_"; journald drops such
    fields from what a client sends). ``journal_senders`` says whose lines
    may be logins: a list of matches, each a mapping of such a field to a
    value or a list of values; an entry is accepted when every field of one
    match has one of its values. Other entries are never recorded (a login
    among them is logged as refused).

    Not every trusted field identifies a sender: _COMM is the name a process
    gives itself (prctl), _CMDLINE what it wrote in its argv, _PID any
    process's. So each match must name _EXE or _UID/_GID (from the kernel)
    or _SYSTEMD_UNIT (the sender's cgroup; journald falls back to the unit a
    client announces on its stdout socket only for root clients it cannot
    place in a cgroup).

    The default accepts Dovecot: its log process (which writes the lines of
    every Dovecot process, to syslog or to the journal stream systemd gives
    the service) or its master, running as root, as Debian, Fedora and
    source builds install them.

DIAGNOSTICS
    ConfigError ``FILE:LINE: message`` for an unknown key, a bad network in
    skip_networks, a grace or max_session that is not a whole number >= 1,
    a value of the wrong type, an unknown source,
    a field journald does not set, a value that is not text or a number, or
    a match naming none of _EXE, _UID, _GID, _SYSTEMD_UNIT.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Optional

import yaml

from relaymilter.domainsconfig import Network, parse_network
from relaymilter.errors import ConfigError
from relaymilter.yamlcheck import Mapping, construct, where

POPWATCH_KEYS = ("source", "logfiles", "journal_senders", "journal_cursor", "patterns", "pattern_file", "grace",
                 "max_session", "skip_networks", "readback", "write", "flock")
SOURCES = ("files", "journal", "auto")
JOURNAL_SOCKET = "/run/systemd/journal/socket"

# Fields journald adds from the sender's credentials, /proc and its cgroup (systemd.journal-fields(7)).
TRUSTED_FIELDS = frozenset((
    "_PID", "_UID", "_GID", "_COMM", "_EXE", "_CMDLINE", "_CAP_EFFECTIVE", "_AUDIT_SESSION", "_AUDIT_LOGINUID",
    "_SYSTEMD_CGROUP", "_SYSTEMD_SLICE", "_SYSTEMD_UNIT", "_SYSTEMD_USER_UNIT", "_SYSTEMD_USER_SLICE",
    "_SYSTEMD_SESSION", "_SYSTEMD_OWNER_UID", "_SYSTEMD_INVOCATION_ID", "_SELINUX_CONTEXT", "_TRANSPORT",
    "_HOSTNAME", "_BOOT_ID", "_MACHINE_ID", "_STREAM_ID", "_NAMESPACE", "_RUNTIME_SCOPE"))
# The ones an unprivileged sender cannot choose: each match names one.
IDENTIFYING = ("_EXE", "_UID", "_GID", "_SYSTEMD_UNIT")


@dataclass(frozen=True)
class JournalSender:
    """One match of journal_senders: field -> the values it may have (all fields must match)."""

    fields: tuple[tuple[str, frozenset[str]], ...]

    def describe(self) -> str:
        return ", ".join("%s=%s" % (k, "|".join(sorted(v))) for k, v in self.fields)


DOVECOT_EXES = ("/usr/lib/dovecot/log", "/usr/libexec/dovecot/log", "/usr/local/libexec/dovecot/log",
                "/usr/sbin/dovecot", "/usr/local/sbin/dovecot")
DEFAULT_JOURNAL_SENDERS: tuple[JournalSender, ...] = (JournalSender((    # fields in name order, as parse_senders() makes
    ("_EXE", frozenset(DOVECOT_EXES)),
    ("_TRANSPORT", frozenset(("syslog", "journal", "stdout"))),
    ("_UID", frozenset(("0",))),
)),)


@dataclass(frozen=True)
class PopwatchConfig:
    source: str = "files"                          # files, journal, or auto (journal when journald runs)
    logfiles: tuple[str, ...] = ("/var/log/mail.log",)
    journal_senders: tuple[JournalSender, ...] = DEFAULT_JOURNAL_SENDERS
    journal_cursor: Optional[str] = "~/etc/relaymilter-popwatch.cursor"   # None = no resuming
    patterns: Optional[tuple[str, ...]] = None     # None = every shipped pattern
    pattern_file: Optional[str] = None             # None = the bundled rules/logpatterns.yaml
    grace: int = 1800                              # seconds after the last login
    max_session: int = 28800                       # seconds an open session (no logout seen) keeps its address
    skip_networks: Optional[tuple[Network, ...]] = None   # None = trusted_networks
    readback: bool = False
    write: bool = True
    flock: bool = True


def journal_running(socket_path: str = JOURNAL_SOCKET) -> bool:
    """Whether journald runs here (what source: auto asks): its socket is there and answers."""
    if not os.path.exists(socket_path):
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        s.connect(socket_path)      # a socket file left behind by a stopped journald refuses
        return True
    except OSError:
        return False
    finally:
        s.close()


def _values(source: str, node: yaml.Node, field: str) -> frozenset[str]:
    items = node.value if isinstance(node, yaml.SequenceNode) else [node]
    out = set()
    for item in items:
        v = construct(source, item)
        if isinstance(v, bool) or not isinstance(v, (str, int)) or str(v) == "":
            raise ConfigError("%s: popwatch.journal_senders: %s: want text or a number (or a list of them)"
                              % (where(source, item), field))
        out.add(str(v))
    if not out:
        raise ConfigError("%s: popwatch.journal_senders: %s: an empty list matches nothing" % (where(source, node), field))
    return frozenset(out)


def parse_senders(source: str, node: Optional[yaml.Node]) -> tuple[JournalSender, ...]:
    """popwatch.journal_senders: a list of matches (a single mapping is one match)."""
    items = node.value if isinstance(node, yaml.SequenceNode) else [node]
    if not items:
        raise ConfigError("%s: popwatch.journal_senders: an empty list accepts no one" % where(source, node))
    out = []
    for item in items:
        m = Mapping(source, item, "popwatch.journal_senders: each match")
        if not m.items:
            raise ConfigError("%s: popwatch.journal_senders: each match must be a mapping of journal fields, "
                              "e.g. {_EXE: /usr/lib/dovecot/log, _UID: 0}" % where(source, item))
        fields = []
        for key, (knode, vnode) in m.items.items():
            if key not in TRUSTED_FIELDS:
                why = ("the sender sets it, anyone can forge it" if not key.startswith("_")
                       else "not a field journald sets")
                raise ConfigError("%s: popwatch.journal_senders: %r: %s (use fields journald sets: %s)" % (
                    where(source, knode), key, why, ", ".join(sorted(TRUSTED_FIELDS))))
            fields.append((key, _values(source, vnode, key)))
        if not any(k in IDENTIFYING for k, _ in fields):
            raise ConfigError("%s: popwatch.journal_senders: a match needs _EXE, _UID, _GID or _SYSTEMD_UNIT "
                              "(_COMM, _CMDLINE and the others can be chosen or shared by any sender)"
                              % where(source, item))
        out.append(JournalSender(tuple(sorted(fields))))
    return tuple(out)


def parse_popwatch(top: Mapping) -> PopwatchConfig:
    """The ``popwatch:`` section."""
    pw = top.sub("popwatch")
    pw.check_keys(POPWATCH_KEYS, "popwatch key")
    skip = pw.str_list("skip_networks", check=parse_network) if pw.has("skip_networks") else None
    patterns = pw.str_list("patterns") if pw.has("patterns") else None
    source = pw.str("source", PopwatchConfig.source)
    if source not in SOURCES:
        raise pw.err("source", "must be one of %s, got %r" % (", ".join(SOURCES), source))
    senders: tuple[JournalSender, ...] = DEFAULT_JOURNAL_SENDERS
    if pw.has("journal_senders"):
        senders = parse_senders(pw.source, pw.node_of("journal_senders"))
    return PopwatchConfig(
        source=source,
        logfiles=tuple(pw.str_list("logfiles", PopwatchConfig.logfiles)),
        journal_senders=senders,
        journal_cursor=pw.str("journal_cursor", PopwatchConfig.journal_cursor, nullable=True),
        patterns=tuple(patterns) if patterns is not None else None,
        pattern_file=pw.str("pattern_file", None, nullable=True),
        grace=pw.int("grace", PopwatchConfig.grace, minimum=1),
        max_session=pw.int("max_session", PopwatchConfig.max_session, minimum=1),
        skip_networks=tuple(skip) if skip is not None else None,
        readback=pw.bool("readback", False),
        write=pw.bool("write", True),
        flock=pw.bool("flock", True),
    )
