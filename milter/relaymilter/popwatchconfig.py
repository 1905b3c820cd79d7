"""NAME
    relaymilter.popwatchconfig - the ``popwatch:`` section of the configuration

DESCRIPTION
    What relaymilter-popwatch follows and how long a login keeps its address
    in relayers.db:

        popwatch:
          logfiles: [/var/log/mail.log]
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

DIAGNOSTICS
    ConfigError ``FILE:LINE: message`` for an unknown key, a bad network in
    skip_networks, a grace or max_session that is not a whole number >= 1,
    or a value of the wrong type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from relaymilter.domainsconfig import Network, parse_network
from relaymilter.yamlcheck import Mapping

POPWATCH_KEYS = ("logfiles", "patterns", "pattern_file", "grace", "max_session", "skip_networks", "readback", "write",
                 "flock")


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


def parse_popwatch(top: Mapping) -> PopwatchConfig:
    """The ``popwatch:`` section."""
    pw = top.sub("popwatch")
    pw.check_keys(POPWATCH_KEYS, "popwatch key")
    skip = pw.str_list("skip_networks", check=parse_network) if pw.has("skip_networks") else None
    patterns = pw.str_list("patterns") if pw.has("patterns") else None
    return PopwatchConfig(
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
