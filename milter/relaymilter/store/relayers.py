"""NAME
    relaymilter.store.relayers - the relayers map: who may relay because they checked mail

DESCRIPTION
    relayers.db maps a client address (relaymilter.ipaddr canonical form) to
    the ASCII epoch seconds of its last POP/IMAP login. The milter reads it,
    relaymilter-popwatch and vsmtprelay write it, sendmail and Postfix may
    read the same file natively.

    RelayStore is the interface every backend offers (Berkeley DB here, Redis
    for mail farms); open_relay_store() picks one from a path or URL. Every
    write is one locked read-modify-write, so concurrent writers never lose
    each other's updates.

DIAGNOSTICS
    ValueError for an address that is not an IP (raised before anything is
    opened, so a bad argument never touches the file); StoreUnavailable when
    the map cannot be read or written.
"""

from __future__ import annotations

import os
from typing import Iterable, Mapping, Optional, Protocol

from relaymilter.ipaddr import normalize_ip, sort_key
from relaymilter.store import is_store_url
from relaymilter.store.bdb import read_items, write_map
from relaymilter.store.mapreader import MapReader

DEFAULT_PATH = "~/etc/relayers.db"


def parse_ticks(raw: bytes) -> int:
    """A stored value as epoch seconds: its leading digits, like the classic tool's atol()."""
    if raw.isdigit():
        return int(raw)
    digits = b""
    for ch in raw.strip():
        if 48 <= ch <= 57:
            digits += bytes((ch,))
        else:
            break
    return int(digits) if digits else 0


def _db_key(ip: str) -> bytes:
    return normalize_ip(ip).encode("ascii")


def _ticks_or_none(raw: Optional[bytes]) -> Optional[int]:
    return None if raw is None else parse_ticks(raw)


class RelayStore(Protocol):
    """What the milter, the log watcher and vsmtprelay need from a relayers map."""

    location: str

    def lookup(self, ip: str) -> Optional[int]:
        """Timestamp stored for *ip* (any spelling), or None; StoreUnavailable if unreadable."""

    def add(self, entries: Mapping[str, int], ttl: Optional[int] = None) -> None:
        """Insert or overwrite address -> timestamp, all under one lock.

        *ttl* (seconds) is a hint for backends that expire keys themselves."""

    def delete(self, ips: Iterable[str]) -> list[str]:
        """Remove addresses; return the canonical addresses that were not present."""

    def delete_if_unchanged(self, entries: Mapping[str, int]) -> list[str]:
        """Remove each address whose stored timestamp still equals the given one."""

    def expire(self, before: int) -> int:
        """Remove every entry with timestamp <= *before*; return how many were removed."""

    def entries(self) -> list[tuple[str, int]]:
        """Every (address, timestamp), ordered by address."""

    def close(self) -> None:
        """Release handles and connections."""


class BDBRelayStore:
    """relayers.db on a Berkeley DB hash file (the makemap/sendmail/Postfix format)."""

    def __init__(self, path: str) -> None:
        self.location = os.path.expanduser(path)
        self._reader = MapReader(self.location, "relayers map")

    @property
    def reloads(self) -> int:
        return self._reader.reloads

    @property
    def lookup_errors(self) -> int:
        return self._reader.lookup_errors

    def lookup(self, ip: str) -> Optional[int]:
        # Cached per file version under the address as given (see MapReader.get_as).
        return self._reader.get_as(ip, _db_key, _ticks_or_none)

    def add(self, entries: Mapping[str, int], ttl: Optional[int] = None) -> None:
        items = [(normalize_ip(ip).encode("ascii"), b"%d" % int(ts)) for ip, ts in entries.items()]
        with write_map(self.location, grow=_size(items)) as txn:
            for key, value in items:
                txn.put(key, value)

    def delete(self, ips: Iterable[str]) -> list[str]:
        keys = [normalize_ip(ip) for ip in ips]
        if not os.path.exists(self.location):
            return keys
        with write_map(self.location, create=False, grow=0) as txn:
            return [key for key in keys if not txn.delete(key.encode("ascii"))]

    def delete_if_unchanged(self, entries: Mapping[str, int]) -> list[str]:
        wanted = {normalize_ip(ip).encode("ascii"): int(ts) for ip, ts in entries.items()}
        if not wanted or not os.path.exists(self.location):
            return []
        gone = []
        with write_map(self.location, create=False, grow=0) as txn:
            for key, ts in wanted.items():
                current = txn.get(key)
                if current is not None and parse_ticks(current) == ts:
                    txn.delete(key)
                    gone.append(key.decode("ascii"))
        return gone

    def expire(self, before: int) -> int:
        if not os.path.exists(self.location):
            return 0
        with write_map(self.location, create=False, grow=0) as txn:
            return txn.remove_where(lambda v: parse_ticks(v) <= before)

    def entries(self) -> list[tuple[str, int]]:
        return _ordered((k.decode("ascii", "replace"), parse_ticks(v)) for k, v in read_items(self.location))

    def sync(self, entries: Mapping[str, int]) -> tuple[int, int]:
        """Make the map hold exactly *entries*, in one locked write; return (written, removed).

        Only what differs is written (relaymilter-mirror calls this every
        round); the file is created when missing, in place otherwise, so
        sendmail and Postfix keep reading the inode they have open.
        """
        wanted = {normalize_ip(ip).encode("ascii"): b"%d" % int(ts) for ip, ts in entries.items()}
        with write_map(self.location, grow=_size(wanted.items())) as txn:
            current = dict(txn.items())
            stale = [key for key in current if key not in wanted]
            changed = [(key, value) for key, value in wanted.items() if current.get(key) != value]
            for key in stale:
                txn.delete(key)
            for key, value in changed:
                txn.put(key, value)
        return len(changed), len(stale)

    def close(self) -> None:
        self._reader.close()


def _size(items: Iterable[tuple[bytes, bytes]]) -> int:
    """Bytes a write of *items* may add to the file (keys, values, per-item overhead)."""
    return sum(len(k) + len(v) + 16 for k, v in items)


def _ordered(pairs: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
    return sorted(pairs, key=lambda kv: sort_key(kv[0]))


def open_relay_store(spec: Optional[str] = None) -> RelayStore:
    """The relayers store named by *spec*: a redis:// URL, or a path (default ~/etc/relayers.db)."""
    spec = spec or DEFAULT_PATH
    if is_store_url(spec):
        from relaymilter.store.redis import RedisRelayStore  # optional dependency

        return RedisRelayStore(spec)
    return BDBRelayStore(spec)
