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
    expiry to that time plus the ttl. Writes go through a small Lua script,
    BATCH keys per atomic call, pipelined. Listing and expiring walk the keys with
    SCAN (never KEYS, which blocks the server) and read values with MGET in
    batches; conditional deletes run as one small Lua script, so an entry
    re-written meanwhile by another host is never removed.

    Where the map is and how to reach it is one URL (redis://, rediss://,
    unix://, redis+sentinel://; see relaymilter.store.redisurl), with
    ``prefix`` (default ``relaymilter:relay:``) letting several maps share a
    database. Sockets time out after 0.25 s unless the URL says otherwise: the
    milter asks once per relay attempt, and a slow or dead Redis must cost a
    quarter second, not a client's SMTP timeout. The milter's GETs use
    connections of their own, outside redis-py's pool's command path
    (store.redislines): a lookup costs little more than the round trip.

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
    and never relays on a guess. Connections are made again on the next call
    once the server is back; nothing needs restarting.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, TypeVar, cast

import redis
from redis import exceptions as rexc
from redis.backoff import NoBackoff
from redis.connection import ConnectionPool
from redis.retry import Retry
from redis.sentinel import Sentinel

from relaymilter.errors import ConfigError, StoreUnavailable
from relaymilter.ipaddr import normalize_ip, sort_key
from relaymilter.store.redisurl import DEFAULT_PREFIX, DEFAULT_TIMEOUT, RedisSpec, mask_url, parse_store_url
from relaymilter.store.redislines import Lines
from relaymilter.store.relayers import parse_ticks

log = logging.getLogger("relaymilter.store")

BATCH = 1000                 # keys per SCAN step, MGET and conditional delete

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

# SET each KEYS[i] to ARGV[2i-1], with EX ARGV[2i] when that is > 0: one command for a
# whole batch (a pipeline of single SETs costs far more in the client than in Redis).
SET_MANY = """
for i, key in ipairs(KEYS) do
  local ex = tonumber(ARGV[2 * i])
  if ex > 0 then
    redis.call('SET', key, ARGV[2 * i - 1], 'EX', ex)
  else
    redis.call('SET', key, ARGV[2 * i - 1])
  end
end
return #KEYS
"""

__all__ = ["BATCH", "DEFAULT_PREFIX", "DEFAULT_TIMEOUT", "RedisRelayStore", "RedisSpec", "mask_url",
           "parse_store_url"]


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
        self._errors_lock = threading.Lock()
        self.lookup_errors = 0          # lookups that raised StoreUnavailable: for the metrics
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
        self._lookups = Lines(self.client.connection_pool, self.display)
        self._delete_script = self.client.register_script(DELETE_IF_TICKS)
        self._set_script = self.client.register_script(SET_MANY)

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

    @staticmethod
    def _mget(client: redis.Redis, keys: list[bytes]) -> list[Optional[bytes]]:
        return cast("list[Optional[bytes]]", client.mget(keys))     # bytes: no decode_responses

    def _snapshot(self, client: redis.Redis) -> dict[bytes, bytes]:
        found: dict[bytes, bytes] = {}
        for batch in self._scan_batches(client):
            for key, value in zip(batch, self._mget(client, batch)):
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
        try:
            return self._lookup(ip)
        except StoreUnavailable:
            with self._errors_lock:
                self.lookup_errors += 1
            raise

    def _lookup(self, ip: str) -> Optional[int]:
        key = self._key(ip)
        try:
            raw = self._run("read", lambda c: self._lookups.call("GET", key))
        except StoreUnavailable as exc:
            if self._replica is None:
                raise
            # No primary right now (failover under way): a replica's copy is good enough to relay on.
            try:
                raw = self._run("read from a replica", lambda c: cast(Optional[bytes], c.get(key)),
                                self._replica)
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
            args: list[int] = []
            for _, ts in items:
                # no ttl: no expiry (SET drops an earlier one), the entry stays until expired by command
                args += [ts, 0 if ttl is None else max(int(ttl), ts + int(ttl) - now)]
            keys = [key for key, _ in items]
            if len(keys) <= BATCH:
                self._set_script(keys=keys, args=args, client=client)
                return
            # Batches are atomic each, not together: one MULTI of 100,000 SETs would hold the server
            # (and outlast the socket timeout) for as long as it takes, and no reader needs more.
            pipe = client.pipeline(transaction=False)
            for start in range(0, len(keys), BATCH):
                self._set_script(keys=keys[start:start + BATCH], args=args[2 * start:2 * (start + BATCH)],
                                 client=pipe)
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
                for key, value in zip(batch, self._mget(client, batch)):
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
        self._lookups.close()
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
