"""NAME
    relaymilter.store.counters - sliding-hour counters shared by every process on one host

DESCRIPTION
    The relaying limits count, per identity, recipients and messages over the
    last hour, and per user the distinct client addresses seen in the last
    hour. Every worker process of the milter and the log watcher update the
    same counts, so they live in one file that all of them map (mmap,
    MAP_SHARED): an update is a few microseconds, where a database
    transaction would cost tens.

    The file is a fixed table of SLOTS slots of SLOT bytes after a header.
    A slot is one (family, identity): a 64-bit hash of the two (blake2b), the
    minute it was last updated, the identity's text (for the admin's
    listing, cut at KEY_MAX bytes) and its data: for recipients and messages
    60 per-minute counts (a ring indexed by epoch minute mod 60), for
    addresses 30 (address hash, minute) pairs. The hour is therefore a
    sliding window in one-minute steps (store.window). Slots are found by
    linear probing from the hash, at most PROBES steps; a slot not updated
    for an hour is stale and is reused.

    Atomicity: every read-modify-write holds flock(LOCK_EX) on the file for
    the whole operation (a reader LOCK_SH), so concurrent processes never
    lose an increment (store.mappedfile: the file's making, mapping,
    locking and checking). A process killed mid-update releases the lock
    with its death; at worst one slot's counts are torn.

    Counting ahead: a count of recipients may take one more (charge's
    *ahead*) when that keeps the identity within half its limit, so that
    the transaction's next recipient costs no lock at all. One left unused
    when the transaction ends is refunded (refund(); store.refunds: queued,
    taken off in the process's next operation or within refunds.DELAY). A
    count is therefore never low; it may be high by one per transaction
    holding one counted ahead and unused - open (until its next MAIL or its
    connection's end: a message's DATA included), ended moments ago, or
    left open by a killed process - which can only make a limit refuse
    (with suspend_minutes, suspend) early, and only for an identity that
    went from half its limit to all of it meanwhile. A refund goes only to
    the counts it was counted in: the header holds the file's generation
    (GENERATION_AT: random, set at the first count of a new file - one
    removed or cut short and made again - changed by forget()); a refund
    of another generation is dropped, gone with the counts started afresh.

DIAGNOSTICS
    StoreUnavailable when the file cannot be opened or created, is not a
    counter file of this layout ("remove it to start counting afresh"), the
    lock is not obtained within the wait (a stuck process), or the table has
    no free slot near the hash (more live identities than it holds). The
    caller then does not apply the limit: counters never block a decision.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import mmap
import os
import struct
import time
import zlib
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Optional

from relaymilter.errors import StoreUnavailable
from relaymilter.store.mappedfile import LOCK_WAIT, MappedFile
from relaymilter.store.refunds import Refunds
from relaymilter.store.window import MINUTES, rolled, window_sum

log = logging.getLogger("relaymilter.counters")

MAGIC = b"RMCOUNT1"
SLOTS = 65536
SLOT = 384
HEAD = 64
GENERATION_AT = 24          # in the header: the file's generation (see the module notes); 0 until its first count
KEY_MAX = 128
PROBES = 64
ADDRESSES = 30              # most distinct addresses a user can be counted with (addresses_per_hour < this)
FAMILIES = {"recipients": 1, "messages": 2, "addresses": 3}
_NAMES = {v: k for k, v in FAMILIES.items()}


_HEADER = struct.Struct("<8sIII")          # magic, slots, slot size, minutes
_SLOT_HEAD = struct.Struct("<QIBB2x")      # hash, last minute, family, key length
_BUCKETS = struct.Struct("<%dI" % MINUTES)
_PAIRS = struct.Struct("<%dI" % (2 * ADDRESSES))
_HASH = struct.Struct("<Q")
_HASH_MINUTE = struct.Struct("<QI")         # the slot head's first two fields
_U32 = struct.Struct("<I")
_PAIR = struct.Struct("<II")
_NOPAIRS = (0,) * (2 * ADDRESSES)
_ZEROS = (0,) * MINUTES
_DATA = 16 + KEY_MAX
SIZE = HEAD + SLOTS * SLOT


def slot_hash(family: str, identity: str) -> int:
    """The slot key of (family, identity): never 0 (0 marks a slot never used)."""
    digest = hashlib.blake2b(b"%d\0%s" % (FAMILIES[family], identity.encode("utf-8", "surrogateescape")),
                             digest_size=8).digest()
    return _HASH.unpack(digest)[0] or 1


_hashes: dict[tuple[str, str], int] = {}


def _hash_of(family: str, identity: str) -> int:
    """slot_hash(), remembered (a bounded table: cleared when full)."""
    h = _hashes.get((family, identity))
    if h is None:
        if len(_hashes) >= 65536:
            _hashes.clear()
        h = _hashes[(family, identity)] = slot_hash(family, identity)
    return h


def address_hash(address: str) -> int:
    return zlib.crc32(address.encode("ascii", "replace")) or 1


class Charge(NamedTuple):
    """What charge() found: the family over its limit (None: all within) and the counts after.

    reserved: recipients counted ahead (charge's *ahead*), in epoch minute
    *minute* of the file's *generation*: for the transaction's next
    recipients, or refunded.
    """

    over: Optional[str]
    counts: Mapping[str, int]
    reserved: int = 0
    minute: int = 0
    generation: int = 0


@dataclass(frozen=True)
class Usage:
    """One live slot, for the admin's listing."""

    family: str
    identity: str
    count: int


class CounterFile(MappedFile):
    """The shared counter table at *path* (created on first use unless create is false)."""

    def __init__(self, path: str, create: bool = True, lock_wait: float = LOCK_WAIT) -> None:
        super().__init__(path, SIZE, _HEADER.pack(MAGIC, SLOTS, SLOT, MINUTES),
                         "not a relaymilter counter file of this layout (remove it to start counting afresh)",
                         create, lock_wait)
        self._refunds = Refunds(self.flush)

    # -- refunds ------------------------------------------------------------------------

    def refund(self, identity: str, n: int, minute: int, generation: int) -> None:
        """Give back *n* recipients counted ahead in *minute* of *generation* (Charge): queued, taken off soon."""
        self._refunds.add(identity, n, minute, generation)

    def flush(self) -> None:
        """Take this process's queued refunds off now."""
        if not self._refunds:
            return
        with self._mutex:
            mm = self._locked(fcntl.LOCK_EX)
            if mm is None:
                self._refunds.take()        # the file is gone, and its counts with it
                return
            assert self._fd is not None
            try:
                self._apply_refunds(mm)
            finally:
                self._unlock(self._fd)

    def _apply_refunds(self, mm: mmap.mmap) -> None:
        """Under the lock: each queued refund off its minute's count, if that minute is still in the slot."""
        now = self._generation(mm)
        for identity, n, minute, generation in self._refunds.take():
            if generation != now:
                continue            # counted before a lift or in a file since replaced: gone already
            h = _hash_of("recipients", identity)
            off = self._find(mm, h, minute, create=False)
            if off is None:
                continue
            sh, last = _HASH_MINUTE.unpack_from(mm, off)
            if sh != h or minute > last or last - minute >= MINUTES:
                continue            # the slot reused, or that minute gone from it: nothing left to give back
            at = off + _DATA + 4 * (minute % MINUTES)
            _U32.pack_into(mm, at, max(0, _U32.unpack_from(mm, at)[0] - n))

    @staticmethod
    def _generation(mm: mmap.mmap, renew: bool = False) -> int:
        """Under LOCK_EX: the file's generation, set (or with *renew* changed) to a random one when 0."""
        generation = 0 if renew else _HASH.unpack_from(mm, GENERATION_AT)[0]
        if not generation:
            generation = int.from_bytes(os.urandom(8), "little") or 1
            _HASH.pack_into(mm, GENERATION_AT, generation)
        return generation

    def close(self) -> None:
        self._refunds.stop()
        try:
            self.flush()
        except StoreUnavailable as exc:
            log.warning("%d recipients counted ahead not refunded: %s", len(self._refunds), exc)
        super().close()

    # -- the table --------------------------------------------------------------------

    def _find(self, mm: mmap.mmap, h: int, minute: int, create: bool) -> Optional[int]:
        """The offset of the slot for hash *h*; with *create*, a fresh one when there is none."""
        free = None
        base = h % SLOTS
        for i in range(PROBES):
            off = HEAD + ((base + i) % SLOTS) * SLOT
            sh, last = _HASH_MINUTE.unpack_from(mm, off)
            if sh == h:
                return off
            if sh == 0:
                if free is None:
                    free = off
                break
            if free is None and minute - last >= MINUTES:
                free = off          # stale: reusable, but the key may still be further on
        if not create:
            return None
        if free is None:
            raise self._fail("no free slot near this identity's (more live identities than the table holds)")
        return free

    def _slot(self, mm: mmap.mmap, family: str, identity: str, minute: int) -> tuple[int, int, tuple]:
        """(offset, last minute, per-minute values) of *family*'s slot for *identity*, made when missing."""
        h = _hash_of(family, identity)
        off = HEAD + (h % SLOTS) * SLOT         # the usual case: found at the first probe
        sh, last = _HASH_MINUTE.unpack_from(mm, off)
        if sh != h:
            found = self._find(mm, h, minute, create=True)
            assert found is not None
            off = found
            sh, last = _HASH_MINUTE.unpack_from(mm, off)
            if sh != h:
                # A new slot, or a stale one reused: its identity text and zero counts.
                text = identity.encode("utf-8", "surrogateescape")[:KEY_MAX]
                _SLOT_HEAD.pack_into(mm, off, h, minute, FAMILIES[family], len(text))
                mm[off + 16:off + 16 + len(text)] = text
                _BUCKETS.pack_into(mm, off + _DATA, *_ZEROS)
                return off, minute, _ZEROS
        return off, last, _BUCKETS.unpack_from(mm, off + _DATA)

    # -- operations -----------------------------------------------------------------

    def charge(self, identity: str, now: float, add: Mapping[str, int], limits: Mapping[str, int],
               address: Optional[str] = None, force: bool = False, ahead: int = 0) -> Charge:
        """Count *add* (family -> n) for *identity* unless a family would go over its limit.

        With *address*, it is first recorded among the identity's addresses
        of the hour (that family's limit is on the number of distinct
        addresses). A family over its limit is named in the answer and
        nothing is added, unless *force* (warn-only mode: count what went
        through). With *ahead*, that many more recipients are counted
        (Charge.reserved) when nothing is over and the count after them is
        within half the recipients limit (or there is none). One lock for
        the whole operation, which first takes off this process's refunds.
        """
        minute = int(now) // 60
        with self._mutex:
            mm = self._locked(fcntl.LOCK_EX)
            if mm is None:
                raise self._fail("does not exist")
            assert self._fd is not None
            try:
                if self._refunds:
                    self._apply_refunds(mm)
                counts: dict[str, int] = {}
                over: Optional[str] = None
                if address is not None:
                    n = self._see(mm, identity, address, minute)
                    counts["addresses"] = n
                    limit = limits.get("addresses")
                    if limit is not None and n > limit:
                        over = "addresses"
                slots = []
                for family, n in add.items():
                    off, last, values = self._slot(mm, family, identity, minute)
                    if last > minute:
                        minute = last       # another host's clock ahead: count in its minute
                    total = sum(values) if last == minute else window_sum(values, last, minute)
                    limit = limits.get(family)
                    if over is None and limit is not None and total + n > limit:
                        over = family
                    slots.append((family, off, last, values, n))
                    counts[family] = total
                reserved = 0        # none when over, even forced (warn-only): the next is asked again
                if ahead and over is None and "recipients" in counts:
                    limit = limits.get("recipients")
                    if limit is None or 2 * (counts["recipients"] + add["recipients"] + ahead) <= limit:
                        reserved = ahead
                if over is None or force:
                    for family, off, last, values, n in slots:
                        if reserved and family == "recipients":
                            n += reserved
                        i = minute % MINUTES
                        if last == minute:
                            _U32.pack_into(mm, off + _DATA + 4 * i, values[i] + n)
                        else:
                            moved = rolled(values, last, minute)
                            moved[i] += n
                            _BUCKETS.pack_into(mm, off + _DATA, *moved)
                            _U32.pack_into(mm, off + 8, minute)
                        counts[family] += n
                if reserved:
                    return Charge(over, counts, reserved, minute, self._generation(mm))
                return Charge(over, counts)
            finally:
                self._unlock(self._fd)

    def _see(self, mm: mmap.mmap, identity: str, address: str, minute: int) -> int:
        """Record *address* for *identity* at *minute*; how many distinct addresses in the hour (capped)."""
        h = _hash_of("addresses", identity)
        off = self._find(mm, h, minute, create=True)
        assert off is not None
        sh, last, _, _ = _SLOT_HEAD.unpack_from(mm, off)
        if sh != h:
            # A new slot, or a stale one reused: its identity text and no addresses.
            text = identity.encode("utf-8", "surrogateescape")[:KEY_MAX]
            _SLOT_HEAD.pack_into(mm, off, h, minute, FAMILIES["addresses"], len(text))
            mm[off + 16:off + 16 + len(text)] = text
            mm[off + _DATA:off + SLOT] = bytes(SLOT - _DATA)
            pairs: tuple = _NOPAIRS
        else:
            pairs = _PAIRS.unpack_from(mm, off + _DATA)
        hashes, minutes = pairs[0::2], pairs[1::2]
        cut = minute - MINUTES + 1          # entries seen at or after this minute are in the hour
        live = sum(1 for m in minutes if m >= cut)
        ah = address_hash(address)
        try:
            slot = hashes.index(ah)
        except ValueError:
            slot = -1
        if slot >= 0:
            seen = minutes[slot]
            if seen >= cut:
                if seen >= minute:
                    return live             # seen this minute already: nothing to write
                live -= 1                   # counted again below
        else:
            slot = next((i for i, m in enumerate(minutes) if m < cut), -1)
            if slot < 0:
                return live + 1             # all places taken by addresses of the hour: over any limit
        _PAIR.pack_into(mm, off + _DATA + 8 * slot, ah, minute)
        if minute > last:
            _U32.pack_into(mm, off + 8, minute)
        return live + 1

    def usage(self, now: float) -> list[Usage]:
        """Every (family, identity) with a count in the last hour, read under a shared lock."""
        minute = int(now) // 60
        found: list[Usage] = []
        self.flush()
        with self._mutex:
            mm = self._locked(fcntl.LOCK_SH)
            if mm is None:
                return []
            assert self._fd is not None
            try:
                for off in range(HEAD, SIZE, SLOT):
                    sh, last, fam, klen = _SLOT_HEAD.unpack_from(mm, off)
                    if not sh or minute - last >= MINUTES or fam not in _NAMES:
                        continue
                    family = _NAMES[fam]
                    if family == "addresses":
                        pairs = _PAIRS.unpack_from(mm, off + _DATA)
                        count = sum(1 for i in range(ADDRESSES) if pairs[2 * i + 1] and minute - pairs[2 * i + 1] < MINUTES)
                    else:
                        count = window_sum(_BUCKETS.unpack_from(mm, off + _DATA), last, max(minute, last))
                    if count:
                        text = mm[off + 16:off + 16 + klen].decode("utf-8", "surrogateescape")
                        found.append(Usage(family, text, count))
            finally:
                self._unlock(self._fd)
        return found

    def forget(self, identity: str) -> None:
        """Drop every count of *identity* (an admin lifting a suspension starts it afresh)."""
        with self._mutex:
            mm = self._locked(fcntl.LOCK_EX)
            if mm is None:
                return
            assert self._fd is not None
            try:
                if self._refunds:
                    self._apply_refunds(mm)
                self._generation(mm, renew=True)    # what was counted ahead before is refunded no more
                for family in FAMILIES:
                    h = slot_hash(family, identity)
                    off = self._find(mm, h, int(time.time()) // 60, create=False)
                    if off is not None:
                        # Stale rather than empty (probe chains through it stay intact), its text kept.
                        _SLOT_HEAD.pack_into(mm, off, h, 0, FAMILIES[family], _SLOT_HEAD.unpack_from(mm, off)[3])
                        mm[off + _DATA:off + SLOT] = bytes(SLOT - _DATA)
            finally:
                self._unlock(self._fd)
