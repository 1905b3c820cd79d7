"""NAME
    relaymilter.store.redisurl - the URLs that name a Redis relayers store

DESCRIPTION
    One string in the configuration (relayers.url) or on a command line
    (vsmtprelay -f, relaymilter-popwatch --dbfile, relaymilter-mirror --from)
    says where the shared map lives and how to reach it::

        redis://[[USER]:PASSWORD@]HOST[:PORT][/DB][?OPTIONS]
        rediss://...                       TLS (ssl_ca_certs=, ssl_cert_reqs=, ...)
        unix://[[USER]:PASSWORD@]/PATH/redis.sock[?db=DB&OPTIONS]
        redis+sentinel://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/SERVICE[/DB][?OPTIONS]

    OPTIONS are redis-py's URL options (socket_timeout, socket_connect_timeout,
    client_name, health_check_interval, max_connections, ssl_* with
    rediss://, ...) plus ``prefix`` (default ``relaymilter:relay:``), and with
    Sentinel ``sentinel_password`` / ``sentinel_username`` for the sentinels
    themselves (the credentials before the @ are the data servers'; the
    sentinel port defaults to 26379). socket_timeout and
    socket_connect_timeout default to 0.25 s: a relay check must not hang on
    a dead server. redis-py's pool-wait ``timeout`` and its retry options are
    refused: the store decides how often to retry.

    Parsing is strict and done before anything connects, so that a typo
    stops start-up with FILE:LINE instead of failing at the first relay
    attempt; redis-py itself would pass an unknown option through to the
    connection and fail only when connecting.

DIAGNOSTICS
    ValueError naming the problem (an unknown option, a bad database or
    port, a missing service name); messages never contain a password
    (mask_url).
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Optional
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import redis
from redis.connection import URL_QUERY_ARGUMENT_PARSERS, parse_url

from relaymilter.store import URL_SCHEMES

DEFAULT_PREFIX = "relaymilter:relay:"
DEFAULT_TIMEOUT = 0.25       # seconds, per socket operation
SENTINEL_PORT = 26379
OUR_OPTIONS = ("prefix", "sentinel_password", "sentinel_username")


@dataclass(frozen=True)
class RedisSpec:
    """A parsed store URL: where Redis is and how to talk to it."""

    url: str
    display: str                                    # the URL with passwords masked
    prefix: str
    connection: dict = field(default_factory=dict)  # redis-py connection/pool keyword arguments
    sentinels: tuple[tuple[str, int], ...] = ()
    service: Optional[str] = None
    sentinel_auth: dict = field(default_factory=dict)

    @property
    def db(self) -> int:
        return int(self.connection.get("db", 0))


def mask_url(url: str) -> str:
    """*url* with the password in its user part and any *password* option replaced by ***."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        user, hosts = netloc.rsplit("@", 1)
        if ":" in user:
            user = user.split(":", 1)[0] + ":***"
        elif user:
            user = "***"      # redis://SECRET@host: a bare password in some clients' eyes
        netloc = "%s@%s" % (user, hosts)
    query = "&".join("%s=***" % k if "password" in k else "%s=%s" % (k, quote(v, safe=":/,"))
                     for k, v in parse_qsl(parts.query, keep_blank_values=True))
    return "%s://%s%s%s" % (parts.scheme, netloc, parts.path, "?" + query if query else "")


def _accepted_options(connection_class: type) -> set[str]:
    """Options a URL may carry for this connection class (never redis-py's internals)."""
    names = {n for n in URL_QUERY_ARGUMENT_PARSERS if not n.startswith("ssl_")}
    names -= {"timeout", "retry_on_error", "retry_on_timeout"}     # pool-wait and retry are ours
    names |= {"host", "port", "db", "path", "username", "password", "client_name"}
    for klass in connection_class.__mro__:
        if klass.__module__.startswith("redis.") and "__init__" in vars(klass):
            names.update(p for p in inspect.signature(vars(klass)["__init__"]).parameters if p.startswith("ssl_"))
    return names


def _init_accepts(connection_class: type, name: str) -> bool:
    """Whether the connection class's constructor takes *name* (itself, or a parent's through **kwargs)."""
    for klass in connection_class.__mro__:
        if klass is object or "__init__" not in vars(klass):
            continue
        params = inspect.signature(vars(klass)["__init__"]).parameters
        if name in params:
            return True
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return False
    return False


def _parse_hosts(text: str) -> tuple[tuple[str, int], ...]:
    hosts = []
    for item in text.split(","):
        item = item.strip()
        m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d{1,5}))?|([^:\[\]]+)(?::(\d{1,5}))?", item)
        if not m:
            raise ValueError("bad sentinel address %r (want HOST[:PORT] or [IPv6][:PORT])" % item)
        host = m.group(1) or m.group(3)
        port = int(m.group(2) or m.group(4) or SENTINEL_PORT)
        if not 0 < port < 65536:
            raise ValueError("bad sentinel port in %r" % item)
        hosts.append((host, port))
    return tuple(hosts)


def parse_store_url(url: str) -> RedisSpec:
    """Parse a redis://, rediss://, unix:// or redis+sentinel:// store URL; ValueError if malformed."""
    parts = urlsplit(url)
    if parts.scheme not in URL_SCHEMES:
        raise ValueError("want a redis://, rediss://, unix:// or redis+sentinel:// URL, got %r" % mask_url(url))
    if parts.fragment:
        raise ValueError("a Redis URL has no #fragment")
    ours: dict[str, str] = {}
    rest: list[tuple[str, str]] = []
    seen: set[str] = set()
    for key, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
        if key in seen:
            raise ValueError("option %r given twice" % key)
        seen.add(key)
        if key in OUR_OPTIONS:
            ours[key] = value
        else:
            rest.append((key, value))
    prefix = ours.get("prefix", DEFAULT_PREFIX)
    if not prefix or not prefix.isascii() or any(c.isspace() for c in prefix):
        raise ValueError("prefix must be non-empty ASCII without white space, got %r" % prefix)

    sentinels: tuple[tuple[str, int], ...] = ()
    service: Optional[str] = None
    if parts.scheme == "redis+sentinel":
        userinfo, _, hostlist = parts.netloc.rpartition("@")
        if not hostlist:
            raise ValueError("redis+sentinel:// needs at least one sentinel HOST[:PORT]")
        sentinels = _parse_hosts(hostlist)
        path = [p for p in parts.path.split("/") if p]
        if not path or len(path) > 2:
            raise ValueError("redis+sentinel:// needs /SERVICE or /SERVICE/DB after the sentinels")
        service = path[0]
        db = path[1] if len(path) == 2 else "0"
        if not db.isdigit():
            raise ValueError("the database after the service name must be a number, got %r" % db)
        base = "redis://%slocalhost/%s" % (userinfo + "@" if userinfo else "", db)
    else:
        if parts.scheme != "unix" and parts.path.strip("/") and not parts.path.strip("/").isdigit():
            raise ValueError("the database after the host must be a number, got %r" % parts.path)
        if parts.scheme == "unix" and not parts.path:
            raise ValueError("unix:// needs the socket path, e.g. unix:///run/redis/redis.sock")
        base = "%s://%s%s" % (parts.scheme, parts.netloc, parts.path)
        if parts.scheme != "unix" and not parts.hostname:
            raise ValueError("the URL names no host")
    try:
        kwargs = parse_url(base + ("?" + urlencode(rest) if rest else ""))
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    if service is not None:
        kwargs.pop("host", None)
        kwargs.pop("port", None)
    klass = kwargs.get("connection_class", redis.Connection)
    unknown = sorted(set(kwargs) - _accepted_options(klass) - {"connection_class"})
    if unknown:
        raise ValueError("unknown option%s %s" % ("s" if len(unknown) > 1 else "", ", ".join(map(repr, unknown))))
    for name in ("socket_timeout", "socket_connect_timeout"):
        if name in kwargs and not kwargs[name] > 0:
            raise ValueError("%s must be a positive number of seconds" % name)
    kwargs.setdefault("socket_timeout", DEFAULT_TIMEOUT)
    if _init_accepts(klass, "socket_connect_timeout"):   # unix:// before redis-py 4.4 (Debian 12's 4.3) has none
        kwargs.setdefault("socket_connect_timeout", kwargs["socket_timeout"])
    auth = {k.split("_", 1)[1]: ours[k] for k in ("sentinel_password", "sentinel_username") if k in ours}
    return RedisSpec(url=url, display=mask_url(url), prefix=prefix, connection=kwargs,
                     sentinels=sentinels, service=service, sentinel_auth=auth)
