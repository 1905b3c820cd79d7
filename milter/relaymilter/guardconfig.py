"""NAME
    relaymilter.guardconfig - the ``limits:`` and ``modes:`` sections of the configuration

DESCRIPTION
    Parsed here, called by relaymilter.config.load_config, so the checks of
    the two sections sit together:

        limits:
          recipients_per_hour: 100      # per identity; null or absent = no limit
          messages_per_hour: null       # per identity
          addresses_per_hour: null      # per user: distinct client addresses
          suspend_minutes: null         # over a limit: suspend that long too
        modes: {relay: warn}            # per rule family: enforce (default) or warn

    ``limits:`` absent or empty means no limits at all.

DIAGNOSTICS
    ConfigError ``FILE:LINE: message`` for an unknown key or family, a
    value that is not a whole number >= 1, addresses_per_hour of
    store.counters.ADDRESSES or more, or a mode other than enforce/warn.
"""

from __future__ import annotations

from typing import Optional

from relaymilter.policy.limits import Limits
from relaymilter.policy.modes import FAMILIES, MODES, Modes
from relaymilter.yamlcheck import Mapping

LIMITS_KEYS = ("recipients_per_hour", "messages_per_hour", "addresses_per_hour", "suspend_minutes")
MAX_ADDRESSES = 29          # the host's counter slot remembers 30 addresses per user and hour


def parse_limits(top: Mapping) -> Optional[Limits]:
    """The ``limits:`` section, or None when absent or empty."""
    if not top.has("limits"):
        return None
    section = top.sub("limits")
    section.check_keys(LIMITS_KEYS, "limits key")
    values = {key: section.int(key, None, minimum=1, nullable=True) for key in LIMITS_KEYS}
    if values["addresses_per_hour"] is not None and values["addresses_per_hour"] > MAX_ADDRESSES:
        raise section.err("addresses_per_hour", "must be at most %d" % MAX_ADDRESSES)
    limits = Limits(**values)
    return limits if limits.table() else None


def parse_modes(top: Mapping) -> Modes:
    """The ``modes:`` section: family -> enforce | warn."""
    section = top.sub("modes")
    section.check_keys(FAMILIES, "rule family")
    warn = set()
    for family in FAMILIES:
        mode = section.str(family, "enforce")
        if mode not in MODES:
            raise section.err(family, "must be enforce or warn")
        if mode == "warn":
            warn.add(family)
    return Modes(frozenset(warn))
