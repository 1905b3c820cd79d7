"""NAME
    relaymilter.store.mapreader - the milter's long-lived, thread-safe reader of one map file

DESCRIPTION
    One read-only Berkeley DB handle, reopened when the file changes. A
    change is detected with one stat (inode, size, mtime); because file
    times are taken from a coarse clock, a file modified less than RACY_NS
    before it was opened is never trusted from cache (the "racy git" rule),
    so the first lookup after any write sees it. A mutex serialises lookups:
    flock state belongs to the open file, not the thread, and libmilter's
    worker pool calls in from many threads.

    Every lookup is bounded by READ_WAIT (2 s) in all: waiting for another
    lookup's turn and for a writer's flock together, well inside sendmail's
    and Postfix's 10 s milter timeouts, so a writer that holds its lock
    turns lookups into prompt 451s instead of letting them queue.

    Nothing at the path can make a lookup hang or pass for an empty map:
    a FIFO, directory or other non-regular file is refused at once (the
    open is O_NONBLOCK), and a file that exists but is not a whole hash
    database (0 bytes, wrong magic, shorter than its header says) is
    unavailable. Only a missing file is an empty map.

DIAGNOSTICS
    StoreUnavailable naming the path and the cause: "is a FIFO", "is a
    directory", "is empty (0 bytes): not a hash database", "is truncated
    (...)", "cannot open: Permission denied", "lock not obtained in 2000
    ms", "cannot read as a hash database: ...". A missing file is logged
    once and reads as empty.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from typing import Any, Callable, Hashable, Optional

from relaymilter.errors import StoreUnavailable
from relaymilter.store import fileguard
from relaymilter.store.bdbbase import RACY_NS, READ_WAIT, by_fd, db, flock_wait, get_both_styles, unavailable

log = logging.getLogger("relaymilter.store")

CACHE_MAX = 65536           # answers kept per file version by a MapReader
_MISS = object()


def _same(value: Any) -> Any:
    return value


class MapReader:
    """A long-lived, thread-safe reader of one map file; see the module header."""

    def __init__(self, path: str, name: str = "map") -> None:
        self.path = path
        self.name = name
        self._mutex = threading.Lock()
        self._fd: Optional[int] = None
        self._ident: Optional[tuple[int, int]] = None     # (st_dev, st_ino) of the file _fd is open on
        self._handle: Optional[db.DB] = None
        self._sig: Optional[tuple] = None
        self._trusted = False
        self._cache: Optional[tuple[tuple, dict]] = None
        self._missing_logged = False
        # For the metrics (relaymilter.metrics.milter), read by another thread:
        self.reloads = 0            # the file opened afresh: first use, or a new version of it
        self.lookup_errors = 0      # lookups that raised StoreUnavailable
        self._opened: Optional[tuple] = None     # the signature of the version last opened
        self._errors_lock = threading.Lock()

    def close(self) -> None:
        with self._mutex:
            self._drop()

    def _drop(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._ident = None
        self._sig = None
        self._cache = None

    def get(self, key: bytes) -> Optional[bytes]:
        """The value for *key* (either NUL style), None when absent or the file is missing."""
        return self.get_as(key, _same, _same)

    def get_as(self, token: Hashable, key_of: Callable[[Any], bytes],
               convert: Callable[[Optional[bytes]], Any]) -> Any:
        """convert(the value for key_of(token)), answered from cache while the file is unchanged.

        The cache is per file version and keyed by *token* (what the caller
        asked with, before any normalising), so a repeated question costs one
        stat and one dict lookup; key_of and convert run only on a miss.
        """
        # Fast path, no lock: answers read under LOCK_SH are kept per file
        # signature, and only once the file's mtime is settled (see RACY_NS).
        # Any write completed since then changes the signature, so a matching
        # stat proves the cached answer is still the map's answer.
        try:
            st: Optional[os.stat_result] = os.stat(self.path)
        except OSError:
            st = None
        cache = self._cache
        if st is not None and cache is not None and cache[0] == (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns):
            hit = cache[1].get(token, _MISS)
            if hit is not _MISS:
                return hit
        try:
            return self._lookup(token, key_of, convert, st)
        except StoreUnavailable:
            with self._errors_lock:
                self.lookup_errors += 1
            raise

    def _lookup(self, token: Hashable, key_of: Callable[[Any], bytes],
                convert: Callable[[Optional[bytes]], Any], st: Optional[os.stat_result]) -> Any:
        deadline = time.monotonic() + READ_WAIT
        if not self._mutex.acquire(timeout=READ_WAIT):
            raise StoreUnavailable("%s: lock not obtained in %d ms (behind another lookup)"
                                   % (self.path, round(READ_WAIT * 1000)))
        try:
            value = convert(self._get(key_of(token), st, deadline))
            if self._trusted and self._sig is not None:
                if self._cache is None or self._cache[0] != self._sig or len(self._cache[1]) >= CACHE_MAX:
                    self._cache = (self._sig, {})
                self._cache[1][token] = value
            return value
        finally:
            self._mutex.release()

    def _get(self, key: bytes, st: Optional[os.stat_result] = None,
             deadline: Optional[float] = None) -> Optional[bytes]:
        """The value under LOCK_SH; *st* is the caller's stat of the path, taken just before."""
        if st is None:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                self._drop()
                if not self._missing_logged:
                    log.info("%s %s does not exist yet: treating it as empty", self.name, self.path)
                    self._missing_logged = True
                return None
            except OSError as exc:
                raise unavailable(self.path, "stat", exc) from None
        self._missing_logged = False
        fileguard.refuse_odd(self.path, st)
        if self._fd is None or self._ident != (st.st_dev, st.st_ino):
            # First use, or the path now names another file (replaced by rename).
            self._drop()
            try:
                self._fd = fileguard.open_regular(self.path, os.O_RDONLY)
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise unavailable(self.path, "open", exc) from None
            opened = os.fstat(self._fd)
            self._ident = (opened.st_dev, opened.st_ino)
        wait = READ_WAIT if deadline is None else max(0.0, deadline - time.monotonic())
        flock_wait(self._fd, fcntl.LOCK_SH, self.path, wait, READ_WAIT)
        try:
            st = os.fstat(self._fd)
            sig = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if self._handle is None or sig != self._sig or not self._trusted:
                if self._handle is not None:
                    self._handle.close()
                    self._handle = None
                self._sig = None
                fileguard.check_header(self._fd, self.path)
                handle = db.DB()
                try:
                    handle.open(by_fd(self._fd, self.path), dbtype=db.DB_HASH, flags=db.DB_RDONLY | db.DB_THREAD)
                except db.DBError as exc:
                    handle.close()
                    self._sig = None
                    raise unavailable(self.path, "read as a hash database", exc) from None
                self._handle = handle
                self._sig = sig
                if sig != self._opened:
                    self._opened = sig
                    self.reloads += 1
                # A future mtime was set by advance_mtime(): the next write moves it again.
                self._trusted = abs(time.time_ns() - st.st_mtime_ns) > RACY_NS
            try:
                return get_both_styles(self._handle, key)
            except db.DBError as exc:
                self._handle.close()
                self._handle = None
                raise unavailable(self.path, "read", exc) from None
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
