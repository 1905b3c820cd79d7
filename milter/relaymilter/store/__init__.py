"""NAME
    relaymilter.store - the relayers and spammers maps: Berkeley DB files, or Redis for a farm

DESCRIPTION
    Where a relayers map lives is one string: a path, or a URL naming a
    Redis store. is_store_url() is the one place that tells the two apart
    (the configuration, open_relay_store and the command-line tools all ask
    it); relaymilter.store.redisurl parses such a URL in full.
"""

from __future__ import annotations

URL_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel")


def is_store_url(text: str) -> bool:
    """Whether *text* names a Redis store (redis://, rediss://, unix://, redis+sentinel://) rather than a path."""
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme in URL_SCHEMES
