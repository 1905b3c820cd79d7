"""NAME
    relaymilter.store.redis - the relayers map on Redis, shared by a mail farm

DESCRIPTION
    When the POP/IMAP servers and the SMTP relays are different hosts, a
    login seen on any POP host must let the client relay through any SMTP
    host. RedisRelayStore keeps the relayers map in one Redis behind the same
    RelayStore interface as relayers.db: the milter looks addresses up,
    relaymilter-popwatch and vsmtprelay write, relaymilter-mirror copies it
    to a relayers.db for hosts whose sendmail or Postfix read the file.

    One string key per address: PREFIX + the canonical address
    (relaymilter.ipaddr), value the ASCII epoch seconds, exactly the
    relayers.db value. A writer that gives a ttl (the log watcher's grace)
    sets it as the key's expiry, so Redis drops stale entries by itself even
    when no watcher is left running; a timestamp in the future extends the
    expiry to that time plus the ttl. Listing and expiring walk the keys with
    SCAN (never KEYS, which blocks the server) and read values with MGET in
    batches; conditional deletes run as one small Lua script, so an entry
    re-written meanwhile by another host is never removed.

    URLs (query options as in redis-py's from_url, plus ``prefix``)::

        redis://[[USER]:PASSWORD@]HOST[:PORT][/DB][?OPTIONS]
        rediss://...                       TLS (ssl_ca_certs=, ssl_cert_reqs=, ...)
        unix://[[USER]:PASSWORD@]/PATH/redis.sock[?db=DB&OPTIONS]
        redis+sentinel://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/SERVICE[/DB][?OPTIONS]

    ``prefix`` (default ``relaymilter:relay:``) lets several maps share one
    database. ``socket_timeout`` and ``socket_connect_timeout`` default to
    0.25 s: the milter asks once per relay attempt and a slow or dead Redis
    must cost a quarter second, not a client's SMTP timeout. With Sentinel,
    the credentials in the URL are the data servers'; ``sentinel_password``
    and ``sentinel_username`` are the sentinels' own, if they need any; the
    sentinel port defaults to 26379.

    Failover: every new connection asks the sentinels where the primary is,
    and a connection error (including a primary demoted to a replica, which
    answers READONLY) is retried once on a fresh connection, so a write lands
    on the new primary as soon as the sentinels have promoted it. Lookups
    that still cannot reach a primary (the failover is under way) are
    answered by a replica, so relaying goes on while the sentinels vote.

DIAGNOSTICS
    A malformed URL or option: ValueError from parse_store_url (the
    configuration reports it as FILE:LINE), ConfigError from RedisRelayStore
    (vsmtprelay -f prints it, exit 2). ValueError for an address that is not
    an IP, before anything is sent. Every Redis error - refused, timed out,
    authentication, READONLY, WRONGTYPE - raises StoreUnavailable naming the
    server (password masked), so the milter answers relay attempts 451 4.3.0
    and never relays on a guess. The connection pool reconnects by itself on
    the next call once the server is back.
"""

from __future__ import annotations

import inspect
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, TypeVar
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import redis
from redis import exceptions as rexc
from redis.backoff import NoBackoff
from redis.connection import URL_QUERY_ARGUMENT_PARSERS, ConnectionPool, parse_url
from redis.retry import Retry
from redis.sentinel import Sentinel

from relaymilter.errors import ConfigError, StoreUnavailable
from relaymilter.ipaddr import normalize_ip, sort_key
from relaymilter.store.relayers import parse_ticks

log = logging.getLogger("relaymilter.store")

SCHEMES = ("redis", "rediss", "unix", "redis+sentinel")
DEFAULT_PREFIX = "relaymilter:relay:"
DEFAULT_TIMEOUT = 0.25       # seconds, per socket operation
SENTINEL_PORT = 26379
BATCH = 1000                 # keys per SCAN step, MGET and conditional delete
OUR_OPTIONS = ("prefix", "sentinel_password", "sentinel_username")

T = TypeVar("T")

# Delete each KEYS[i] whose value still reads as the ticks ARGV[i] (leading
# digits, like parse_ticks), in one atomic step; return the keys removed.
DELETE_IF_TICKS = """
local gone = {}
for i, key in ipairs(KEYS) do
  local v = redis.call('GET', key)
  if v then
    local ticks = tonumber(string.match(v, '^%s*(%d*)')) or 0
    if ticks == tonumber(ARGV[i]) then
      redis.call('DEL', key)
      gone[#gone + 1] = key
    end
  end
end
return gone
"""


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
            names.update(p for p in inspect.signature(klass.__init__).parameters if p.startswith("ssl_"))
    return names


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
    if parts.scheme not in SCHEMES:
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
    kwargs.setdefault("socket_connect_timeout", kwargs["socket_timeout"])
    auth = {k.split("_", 1)[1]: ours[k] for k in ("sentinel_password", "sentinel_username") if k in ours}
    return RedisSpec(url=url, display=mask_url(url), prefix=prefix, connection=kwargs,
                     sentinels=sentinels, service=service, sentinel_auth=auth)


def _no_retry() -> Retry:
    # redis-py would retry 3 times with back-off, nested in connect(): we decide once, in _run().
    return Retry(NoBackoff(), 0)


def _match_pattern(prefix: str) -> str:
    """A SCAN MATCH pattern for every key under *prefix* (glob characters in it escaped)."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + "*"


class RedisRelayStore:
    """The relayers map on Redis (or Redis Sentinel); see the module header."""

    def __init__(self, url: str) -> None:
        try:
            self.spec = parse_store_url(url)
        except ValueError as exc:
            # vsmtprelay -f and popwatch --dbfile report this as a usage error (exit 2)
            raise ConfigError("%s: %s" % (mask_url(url), exc)) from None
        self.location = url            # what the configuration said: the milter compares it on reload
        self.display = self.spec.display
        self.prefix = self.spec.prefix
        self._raw_prefix = self.prefix.encode("ascii")
        self._timeout = float(self.spec.connection["socket_timeout"])
        self._sentinel: Optional[Sentinel] = None
        self._replica: Optional[redis.Redis] = None
        self._degraded = False
        kwargs = dict(self.spec.connection, retry=_no_retry())
        if self.spec.service is not None:
            sentinel_kwargs = {k: v for k, v in kwargs.items() if k.startswith("socket_")}
            sentinel_kwargs.update(self.spec.sentinel_auth, retry=_no_retry())
            self._sentinel = Sentinel(list(self.spec.sentinels), sentinel_kwargs=sentinel_kwargs, **kwargs)
            self.client: redis.Redis = self._sentinel.master_for(self.spec.service)
            self._replica = self._sentinel.slave_for(self.spec.service)
        else:
            self._pool = ConnectionPool(**kwargs)
            self.client = redis.Redis(connection_pool=self._pool)
        self._delete_script = self.client.register_script(DELETE_IF_TICKS)

    # -- plumbing -----------------------------------------------------------------------

    def _key(self, ip: str) -> bytes:
        return self._raw_prefix + normalize_ip(ip).encode("ascii")

    def _address(self, key: bytes) -> str:
        return key[len(self._raw_prefix):].decode("ascii", "replace")

    def _run(self, what: str, op: Callable[[redis.Redis], T], client: Optional[redis.Redis] = None) -> T:
        """op(client) with one retry on a fresh connection; any Redis error -> StoreUnavailable."""
        client = client or self.client
        started = time.monotonic()
        try:
            try:
                return op(client)
            except rexc.ConnectionError:
                # A pooled connection to a restarted server, or to a primary that has just been
                # demoted: the failed connection is dropped, a new one asks the sentinels afresh.
                # Refused connections fail at once; a server that made us wait gets no second go.
                if time.monotonic() - started >= self._timeout:
                    raise
                return op(client)
        except rexc.RedisError as exc:
            raise StoreUnavailable("%s: cannot %s: %s" % (self.display, what, exc)) from None

    def _scan_batches(self, client: redis.Redis) -> Iterator[list[bytes]]:
        batch: list[bytes] = []
        for key in client.scan_iter(match=_match_pattern(self.prefix), count=BATCH):
            batch.append(key)
            if len(batch) >= BATCH:
                yield batch
                batch = []
        if batch:
            yield batch

    def _snapshot(self, client: redis.Redis) -> dict[bytes, bytes]:
        found: dict[bytes, bytes] = {}
        for batch in self._scan_batches(client):
            for key, value in zip(batch, client.mget(batch)):
                if value is not None:          # expired between SCAN and MGET
                    found[key] = value
        return found

    def _delete_if_ticks(self, client: redis.Redis, wanted: Mapping[bytes, int]) -> list[bytes]:
        gone: list[bytes] = []
        items = list(wanted.items())
        for start in range(0, len(items), BATCH):
            chunk = items[start:start + BATCH]
            gone.extend(self._delete_script(keys=[k for k, _ in chunk], args=[t for _, t in chunk], client=client))
        return gone

    # -- RelayStore ---------------------------------------------------------------------

    def lookup(self, ip: str) -> Optional[int]:
        key = self._key(ip)
        try:
            raw = self._run("read", lambda c: c.get(key))
        except StoreUnavailable as exc:
            if self._replica is None:
                raise
            # No primary right now (failover under way): a replica's copy is good enough to relay on.
            try:
                raw = self._run("read from a replica", lambda c: c.get(key), self._replica)
            except StoreUnavailable:
                raise exc from None
            if not self._degraded:
                log.warning("%s; answering lookups from a replica until a primary is back", exc)
                self._degraded = True
            return None if raw is None else parse_ticks(raw)
        if self._degraded:
            log.info("%s: primary reachable again", self.display)
            self._degraded = False
        return None if raw is None else parse_ticks(raw)

    def add(self, entries: Mapping[str, int], ttl: Optional[int] = None) -> None:
        if ttl is not None and int(ttl) < 1:
            raise ValueError("ttl must be at least 1 second, got %r" % ttl)
        items = [(self._key(ip), int(ts)) for ip, ts in entries.items()]
        if not items:
            return

        def write(client: redis.Redis) -> None:
            now = int(time.time())
            pipe = client.pipeline(transaction=True)
            for key, ts in items:
                if ttl is None:
                    pipe.set(key, b"%d" % ts)          # no expiry: stays until expired by command
                else:
                    pipe.set(key, b"%d" % ts, ex=max(int(ttl), ts + int(ttl) - now))
            pipe.execute()

        self._run("write", write)

    def delete(self, ips: Iterable[str]) -> list[str]:
        keys = [self._key(ip) for ip in ips]
        if not keys:
            return []

        def remove(client: redis.Redis) -> list[int]:
            pipe = client.pipeline(transaction=True)
            for key in keys:
                pipe.delete(key)
            return pipe.execute()

        counts = self._run("delete", remove)
        return [self._address(key) for key, n in zip(keys, counts) if not n]

    def delete_if_unchanged(self, entries: Mapping[str, int]) -> list[str]:
        wanted = {self._key(ip): int(ts) for ip, ts in entries.items()}
        if not wanted:
            return []
        gone = self._run("delete", lambda c: self._delete_if_ticks(c, wanted))
        return [self._address(key) for key in gone]

    def expire(self, before: int) -> int:
        removed = [0]

        def sweep(client: redis.Redis) -> None:
            for batch in self._scan_batches(client):
                doomed = {}
                for key, value in zip(batch, client.mget(batch)):
                    if value is not None:
                        ticks = parse_ticks(value)
                        if ticks <= before:
                            doomed[key] = ticks
                if doomed:
                    removed[0] += len(self._delete_if_ticks(client, doomed))

        self._run("expire entries", sweep)
        return removed[0]

    def entries(self) -> list[tuple[str, int]]:
        found = self._run("list entries", self._snapshot)
        pairs = [(self._address(k), parse_ticks(v)) for k, v in found.items()]
        return sorted(pairs, key=lambda kv: sort_key(kv[0]))

    def close(self) -> None:
        for client in (self.client, self._replica):
            if client is not None:
                client.connection_pool.disconnect()
                client.close()
        if self._sentinel is not None:
            for s in self._sentinel.sentinels:
                s.connection_pool.disconnect()

    # -- for relaymilter-mirror ---------------------------------------------------------

    def notification_channel(self) -> str:
        """The keyspace-notification pattern that matches every key of this map."""
        return "__keyspace@%d__:%s" % (self.spec.db, _match_pattern(self.prefix))

    def run(self, what: str, op: Callable[[redis.Redis], Any]) -> Any:
        """op(primary client) with the store's retry and error mapping (StoreUnavailable)."""
        return self._run(what, op)
