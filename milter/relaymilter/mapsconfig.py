"""NAME
    relaymilter.mapsconfig - the ``relayers:`` and ``spammers:`` sections of the configuration

DESCRIPTION
    Where the two maps live:

        relayers: {path: ~/etc/relayers.db, url: null, window: null}
        spammers: {source: ~/etc/spammers, path: ~/etc/spammers.db}

    relayers.url (redis://, rediss://, unix://, redis+sentinel://) puts the
    relayers map in Redis instead of the Berkeley DB file at path; window
    (minutes) is how recent a login must be, null meaning presence suffices.
    Parsed here, called by relaymilter.config.load_config; the milter,
    vsmtprelay, vnewspammers and the log watcher take the frozen values.

DIAGNOSTICS
    ConfigError ``FILE:LINE: message`` for an unknown key, a window that is
    not a whole number >= 1, and a Redis URL that does not parse - or that
    cannot be used because redis-py is not installed - at load time, not
    at the first relay attempt.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from relaymilter import pydeps
from relaymilter.store import is_store_url
from relaymilter.yamlcheck import Mapping

RELAYERS_KEYS = ("path", "url", "window")
SPAMMERS_KEYS = ("source", "path")


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


def parse_relayers(top: Mapping) -> RelayersConfig:
    """The ``relayers:`` section."""
    rel = top.sub("relayers")
    rel.check_keys(RELAYERS_KEYS, "relayers key")
    url = rel.str("url", None, nullable=True)
    if url is not None:
        _check_redis_url(rel, url)
    return RelayersConfig(
        path=rel.str("path", RelayersConfig.path),
        url=url,
        window=rel.int("window", None, minimum=1, nullable=True),
    )


def parse_spammers(top: Mapping) -> SpammersConfig:
    """The ``spammers:`` section."""
    sp = top.sub("spammers")
    sp.check_keys(SPAMMERS_KEYS, "spammers key")
    return SpammersConfig(source=sp.str("source", SpammersConfig.source), path=sp.str("path", SpammersConfig.path))
