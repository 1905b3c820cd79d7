"""NAME
    relaymilter.store.guardredis - users, relaying counters and suspensions on Redis, for a farm

DESCRIPTION
    The GuardStore of relaymilter.store.guard on the Redis server that holds
    the relayers map, so every milter of a farm counts an identity together
    and every POP host's watcher tells every SMTP host who logged in where.
    The keys sit beside the map's own, under the guard prefix: the map's
    prefix with ``-guard`` added to it (``relaymilter:relay-guard:`` for the
    default ``relaymilter:relay:``), never under the map's prefix itself,
    where every key is taken for a client address (listing, expiry, the
    mirror):

        G u:ADDRESS           the user who logged in from ADDRESS (string,
                              with the relayers entry's expiry)
        G s:IDENTITY          ``UNTIL SINCE REASON``, expiring at UNTIL
        G c:FAMILY:IDENTITY   hash epoch-minute -> count (recipients,
                              messages), expiring an hour after its last use
        G a:USER              sorted set address -> epoch minute last seen

    gate() is one Lua script (GATE): at a listed client's first relayed
    recipient the relayers lookup too (store.guard: folds_relay_lookup),
    then identity, suspension, the hour's counts and the increments, in one
    atomic step and one round trip; a transaction's later recipients, whose
    identity and suspension are known, run the smaller COUNT, sent on
    connections of the store's own (store.redislines) like the relayers
    lookups; a server that has lost the script (restart, SCRIPT FLUSH) gets
    it again. While the transaction has found its identity well within its
    recipients limit (policy.limits: Ask.wait false), COUNT is posted -
    sent, its answer read later - rather than waited for; nothing is
    counted ahead (Ask.ahead is for the counter file, where a count costs a
    lock rather than a round trip). The hour is a sliding window in
    one-minute steps, as on a single host.

DIAGNOSTICS
    Every Redis error, refusal or timeout (the URL's socket_timeout, 0.25 s
    unless it says otherwise) raises StoreUnavailable naming the server.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable, Mapping, Optional

from redis import exceptions as rexc

from relaymilter.errors import StoreUnavailable
from relaymilter.ipaddr import normalize_ip
from relaymilter.store.counters import MINUTES, Charge, Usage
from relaymilter.store.guard import Ask, Outcome, Suspension, is_address, parse_suspension
from relaymilter.store.redis import RedisRelayStore, _match_pattern
from relaymilter.store.redislines import Lines

HOUR_TTL = 3600 + 60

# The hour's count of the counter hash k (fields: epoch minutes) at the epoch minute *minute*,
# in total; minutes older than the hour are dropped on the way. Both scripts below use it.
SUM_HOUR = """
local vals = redis.call('HGETALL', k)
local total = 0
for j = 1, #vals, 2 do
  if tonumber(vals[j]) > minute - 60 then
    total = total + tonumber(vals[j + 1])
  else
    redis.call('HDEL', k, vals[j])
  end
end
"""

# ARGV[1] the guard prefix, ARGV[2] the request as NUL-separated fields (one argument: packing
# and parsing a dozen arguments would cost the milter more than the call itself): identity or "",
# address, now, see, force, the addresses limit (-1: none), held, the relayers key or "" (Ask.
# listed_since: judge and count only if the map lists the address), its earliest login time, then
# family, n, limit triplets. The answer is one string, NUL-separated: identity, user, suspension
# or "", family over or "", the relayers value's leading digits (as store.relayers.parse_ticks
# reads it) or "", then family, count pairs; an identity of "" means not listed (or listed too
# long ago): nothing judged, nothing counted.
GATE = """
local G = ARGV[1]
local f = {}
local pos = 1
while true do
  local nul = string.find(ARGV[2], '\0', pos, true)
  if not nul then f[#f + 1] = string.sub(ARGV[2], pos); break end
  f[#f + 1] = string.sub(ARGV[2], pos, nul - 1)
  pos = nul + 1
end
local ident, addr = f[1], f[2]
local now = tonumber(f[3])
local minute = math.floor(now / 60)
local stamp = ''
if f[8] ~= '' then
  local v = redis.call('GET', f[8])
  if not v then return '\0\0\0' end
  stamp = string.match(v, '^%s*(%d*)')
  if (tonumber(stamp) or 0) < tonumber(f[9]) then return '\0\0\0\0' .. stamp end
end
local user = '1'
if ident == '' then
  local u = redis.call('GET', G .. 'u:' .. addr)
  if u then ident = u else ident = addr; user = '0' end
elseif ident == addr then
  user = '0'
end
if f[7] == '1' then
  local s = redis.call('GET', G .. 's:' .. ident)
  if s then
    local untl = tonumber(string.match(s, '^(%d+)'))
    if untl and untl > now then return table.concat({ident, user, s, '', stamp}, '\0') end
  end
end
local over = ''
local out = {ident, user, '', '', stamp}
if f[4] == '1' and user == '1' then
  local k = G .. 'a:' .. ident
  -- Trimmed and its expiry renewed when an address is new or seen in a later minute: a set left
  -- alone this minute was trimmed as of this minute already (by the address that set it).
  if redis.call('ZADD', k, 'CH', minute, addr) > 0 then
    redis.call('ZREMRANGEBYSCORE', k, '-inf', minute - 60)
    redis.call('EXPIRE', k, 3660)
  end
  local n = redis.call('ZCARD', k)
  out[#out + 1] = 'addresses'
  out[#out + 1] = tostring(n)
  local lim = tonumber(f[6])
  if lim >= 0 and n > lim then over = 'addresses' end
end
local todo = {}
for i = 10, #f - 2, 3 do
  local fam, n, lim = f[i], tonumber(f[i + 1]), tonumber(f[i + 2])
  local k = G .. 'c:' .. fam .. ':' .. ident
""" + SUM_HOUR + """  if over == '' and lim >= 0 and total + n > lim then over = fam end
  todo[#todo + 1] = {k, fam, n, total}
end
for _, t in ipairs(todo) do
  local total = t[4]
  if (over == '' or f[5] == '1') and t[3] > 0 then
    -- The expiry is set when a minute's field is made: an hour from it outlasts the minute's uses.
    if redis.call('HINCRBY', t[1], minute, t[3]) == t[3] then redis.call('EXPIRE', t[1], 3660) end
    total = total + t[3]
  end
  out[#out + 1] = t[2]
  out[#out + 1] = tostring(total)
end
out[4] = over
return table.concat(out, '\0')
"""
GATE_SHA = hashlib.sha1(GATE.encode("ascii")).hexdigest()

# A transaction's later relayed recipient (identity known, suspension and address answered at
# its first): only the recipients count, about half GATE's cost on the server. ARGV: the counter
# key, the epoch minute, n, the limit (-1: none), force ('1': count even over the limit). The
# answer: {1 if over the limit else 0, the count after (before, when over and not forced)}.
COUNT = """
local k, minute, n, lim = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
""" + SUM_HOUR + """local over = 0
if lim >= 0 and total + n > lim then
  if ARGV[5] ~= '1' then return {1, total} end
  over = 1
end
if redis.call('HINCRBY', k, minute, n) == n then redis.call('EXPIRE', k, 3660) end
return {over, total + n}
"""
COUNT_SHA = hashlib.sha1(COUNT.encode("ascii")).hexdigest()


def guard_prefix(prefix: str) -> str:
    """The guard's key prefix for a map prefix: beside it, never under it."""
    mine = prefix.rstrip(":") + "-guard:"
    return mine if not mine.startswith(prefix) else "relaymilter-guard:" + prefix


def _s(raw: Any) -> str:
    return raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else str(raw)


class RedisGuardStore:
    """The guard's keys on the relayers map's Redis (see the module header)."""

    def __init__(self, url: str, relay: Optional[RedisRelayStore] = None) -> None:
        self.relay = relay if relay is not None else RedisRelayStore(url)
        self._own_relay = relay is None
        self.location = url
        self.prefix = guard_prefix(self.relay.prefix)
        self._g = self.prefix.encode("utf-8")
        self._lines = Lines(self.relay.client.connection_pool, self.relay.display)
        self._relay_prefix = self.relay.prefix.encode("utf-8")
        # gate()'s EVALSHA packed once in RESP but for its last argument (redis-py would encode and
        # pack all five at every call, a good part of the milter's cost of counting).
        self._gate_head = b"*5\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n$1\r\n0\r\n$%d\r\n%s\r\n" % (
            GATE_SHA.encode("ascii"), len(self._g), self._g)
        self._count_head = b"*8\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n$1\r\n0\r\n" % COUNT_SHA.encode("ascii")
        # A posted count (Ask.wait false) is sent as EVAL with the script's text: its answer is read
        # too late to send the script again after a NOSCRIPT.
        self._post_head = b"*8\r\n$4\r\nEVAL\r\n$%d\r\n%s\r\n$1\r\n0\r\n" % (len(COUNT), COUNT.encode("ascii"))

    folds_relay_lookup = True

    def _fail(self, what: str, exc: BaseException) -> StoreUnavailable:
        return StoreUnavailable("%s: cannot %s: %s" % (self.relay.display, what, exc))

    def _call(self, *args: Any, packed: Optional[bytes] = None) -> Any:
        """One command, answered, on a connection of our own (store.redislines)."""
        return self._lines.call(*args, packed=packed)

    # -- the milter's call ------------------------------------------------------------------

    def gate(self, ask: Ask) -> Outcome:
        if ask.identity is not None and not ask.held and not ask.see and len(ask.add) == 1 and "recipients" in ask.add:
            return self._count(ask, ask.identity)
        limits = ask.limits
        since = ask.listed_since
        fields = [ask.identity or "", ask.address, "%d" % ask.now, "1" if ask.see else "0", "1" if ask.force else "0",
                  "%d" % limits.get("addresses", -1), "1" if ask.held else "0",
                  "" if since is None else self.relay.prefix + ask.address, "%d" % (since or 0)]
        for family, n in ask.add.items():
            fields += [family, "%d" % n, "%d" % limits.get(family, -1)]
        request = "\0".join(fields).encode("utf-8", "surrogateescape")
        try:
            try:
                reply = self._call(packed=b"%s$%d\r\n%s\r\n" % (self._gate_head, len(request), request))
            except rexc.NoScriptError:
                reply = self._call("EVAL", GATE, 0, self._g, request)
        except (rexc.RedisError, OSError) as exc:
            raise self._fail("count", exc) from None
        parts = reply.split(b"\0")
        stamp = None if since is None or len(parts) < 5 else int(parts[4] or 0)
        if not parts[0]:                # not listed (or too long ago): nothing judged or counted
            return Outcome(ask.address, False, None, None, stamp)
        identity, user, held, over = _s(parts[0]), parts[1] == b"1", parts[2], parts[3]
        if held:
            return Outcome(identity, user, parse_suspension(identity, held), None, stamp)
        counts = {_s(parts[i]): int(parts[i + 1]) for i in range(5, len(parts) - 1, 2)}
        return Outcome(identity, user, None, Charge(_s(over) or None, counts), stamp)

    def _count(self, ask: Ask, identity: str) -> Outcome:
        """gate() for a transaction's later recipient: the recipients count alone (COUNT); posted, not
        waited for, when the policy says the identity is far from its limit (Ask.wait false)."""
        n = ask.add["recipients"]
        key = self._g + b"c:recipients:" + identity.encode("utf-8", "surrogateescape")
        minute = b"%d" % (int(ask.now) // 60)
        if not ask.wait:
            # Counted whatever the count (force), with no limit to check: the answer is not awaited.
            args = (key, minute, b"%d" % n, b"-1", b"1")
            try:
                self._lines.post(self._post_head + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args))
            except (rexc.RedisError, OSError) as exc:
                raise self._fail("count", exc) from None
            return Outcome(identity, identity != ask.address, None, Charge(None, {}))
        args = (key, minute, b"%d" % n, b"%d" % ask.limits.get("recipients", -1), b"1" if ask.force else b"0")
        try:
            try:
                over, count = self._call(packed=self._count_head + b"".join(b"$%d\r\n%s\r\n" % (len(a), a)
                                                                             for a in args))
            except rexc.NoScriptError:
                over, count = self._call("EVAL", COUNT, 0, *args)
        except (rexc.RedisError, OSError) as exc:
            raise self._fail("count", exc) from None
        return Outcome(identity, identity != ask.address, None, Charge("recipients" if over else None,
                                                                       {"recipients": int(count)}))

    # -- users ---------------------------------------------------------------------------------

    def _ukey(self, address: str) -> bytes:
        return self._g + b"u:" + normalize_ip(address).encode("ascii")

    def user_of(self, address: str) -> Optional[str]:
        key = self._ukey(address)
        try:
            raw = self._call("GET", key)
        except (rexc.RedisError, OSError) as exc:
            raise self._fail("read", exc) from None
        return None if raw is None else _s(raw)

    def record_users(self, users: Mapping[str, Optional[str]], ttl: int) -> None:
        items = [(self._ukey(a), u) for a, u in users.items()]
        if not items:
            return

        def write(client: Any) -> None:
            pipe = client.pipeline(transaction=False)
            for key, user in items:
                if user is None:
                    pipe.delete(key)
                else:
                    pipe.set(key, user.encode("utf-8", "surrogateescape"), ex=max(1, int(ttl)))
            pipe.execute()

        self.relay.run("write users", write)

    def forget_users(self, addresses: Iterable[str]) -> None:
        keys = [self._ukey(a) for a in addresses]
        if keys:
            self.relay.run("delete users", lambda c: c.delete(*keys))

    def _scan(self, client: Any, part: bytes) -> dict[bytes, Any]:
        found = {}
        keys = list(client.scan_iter(match=self._pattern(part), count=1000))
        for start in range(0, len(keys), 1000):
            chunk = keys[start:start + 1000]
            for key, value in zip(chunk, client.mget(chunk)):
                if value is not None:
                    found[key] = value
        return found

    def _pattern(self, part: bytes) -> str:
        return _match_pattern(self.prefix)[:-1] + _s(part) + "*"

    def addresses_of(self, user: str) -> list[str]:
        want = user.encode("utf-8", "surrogateescape")
        held = self.relay.run("list users", lambda c: self._scan(c, b"u:"))
        cut = len(self._g) + 2
        return sorted(k[cut:].decode("ascii", "replace") for k, v in held.items() if v == want)

    # -- suspensions ----------------------------------------------------------------------------

    def _skey(self, identity: str) -> bytes:
        return self._g + b"s:" + identity.encode("utf-8", "surrogateescape")

    def suspension(self, identity: str, now: float) -> Optional[Suspension]:
        try:
            raw = self._call("GET", self._skey(identity))
        except (rexc.RedisError, OSError) as exc:
            raise self._fail("read", exc) from None
        held = parse_suspension(identity, raw)
        return held if held is not None and held.until > now else None

    def suspend(self, identity: str, until: int, reason: str, now: float) -> list[str]:
        value = b"%d %d %s" % (until, int(now), reason.encode("ascii", "replace"))
        self.relay.run("suspend", lambda c: c.set(self._skey(identity), value, exat=int(until)))
        doomed = [identity] if is_address(identity) else self.addresses_of(identity)
        if not doomed:
            return []
        missing = set(self.relay.delete(doomed))
        return [a for a in doomed if normalize_ip(a) not in missing]

    def refund(self, identity: str, n: int, minute: int, generation: int) -> None:
        """Nothing to do: gate() never counts ahead here (its Charge.reserved is always 0), so
        policy.limits never has anything to give back to this store."""

    def lift(self, identity: str) -> bool:
        raw = identity.encode("utf-8", "surrogateescape")
        keys = [self._skey(identity), self._g + b"a:" + raw] + [self._g + b"c:" + f + b":" + raw
                                                               for f in (b"recipients", b"messages")]

        def remove(client: Any) -> bool:
            held = client.delete(keys[0])
            client.delete(*keys[1:])
            return bool(held)

        return bool(self.relay.run("lift", remove))

    def suspensions(self, now: float) -> list[Suspension]:
        held = self.relay.run("list suspensions", lambda c: self._scan(c, b"s:"))
        cut = len(self._g) + 2
        found = [parse_suspension(k[cut:].decode("utf-8", "surrogateescape"), v) for k, v in held.items()]
        return sorted((s for s in found if s is not None and s.until > now), key=lambda s: (s.until, s.identity))

    def usage(self, now: float) -> list[Usage]:
        minute = int(now) // 60

        def read(client: Any) -> list[Usage]:
            found: list[Usage] = []
            cut = len(self._g) + 2
            for key in client.scan_iter(match=self._pattern(b"c:"), count=1000):
                family, _, identity = key[cut:].partition(b":")
                total = sum(int(v) for m, v in client.hgetall(key).items() if int(m) > minute - MINUTES)
                if total:
                    found.append(Usage(_s(family), _s(identity), total))
            for key in client.scan_iter(match=self._pattern(b"a:"), count=1000):
                n = client.zcount(key, minute - MINUTES + 1, "+inf")
                if n:
                    found.append(Usage("addresses", _s(key[cut:]), int(n)))
            return found

        return self.relay.run("list counters", read)

    def close(self) -> None:
        self._lines.close()
        if self._own_relay:
            self.relay.close()
