"""NAME
    relaymilter.errors - exceptions shared across layers

DESCRIPTION
    The policy core must not import the store, yet it has to know when a map
    lookup could not be answered (so that it tempfails instead of relaying).
    These stdlib-only exception types are the contract between the two.
"""

from __future__ import annotations


class RelaymilterError(Exception):
    """Base class of every error relaymilter raises on purpose."""


class StoreUnavailable(RelaymilterError):
    """A map exists but cannot be read or written now (unreadable, corrupt, locked too long)."""


class ConfigError(RelaymilterError):
    """A configuration or rule file is invalid; the message starts with FILE:LINE:."""
