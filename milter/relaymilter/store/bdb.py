"""NAME
    relaymilter.store.bdb - Berkeley DB hash maps, the way sendmail and Postfix share them

DESCRIPTION
    relayers.db and spammers.db are plain Berkeley DB *hash* files, the format
    `makemap hash` and `postmap hash:` write, so that sendmail (K ... hash) and
    Postfix (hash:) can read them natively. This module is the only place that
    opens them.

    Keys are written makemap style: lowercase, no trailing NUL. A file that
    already holds NUL-terminated keys (built by `makemap -N` or `postmap`) is
    written in that style instead, because sendmail and Postfix lock in the
    style of their first hit and a mixed file would hide entries. Lookups try
    both styles.

    Locking follows Debian's sendmail (HASFLOCK) and Postfix: flock(LOCK_SH)
    on the .db around every read, flock(LOCK_EX) around every
    read-modify-write, with the database synced before the lock is released.
    Writers modify the file in place (as makemap does) so that the inode
    readers hold stays the one writers lock.

    What a reader sees, and when: sendmail (map.c db_map_lookup) and Postfix
    (dict_changed_name) notice a change by fstat() of the descriptor they
    hold open and compare its mtime *in whole seconds* with the one recorded
    when they opened the map (sendmail reopens when it is greater, Postfix
    restarts the smtpd when it differs or the file was unlinked). A second
    in-place write within the second of the previous one would leave that
    second unchanged and be missed until some later write. So every writer
    ends its write, still under LOCK_EX, with advance_mtime(): the file's
    mtime second is made greater than the second the file had before the
    write (the clock's own second when that is already greater, else the
    previous second + 1, keeping the clock's sub-second part so that two
    versions never share an mtime). Every completed write is therefore seen
    by sendmail at its next lookup and by Postfix at its next connection;
    the milter sees it at its next lookup (inode, size, mtime). Publishing by
    rename would not do: sendmail keeps reading the old inode, whose mtime
    never changes again. Under a sustained burst of more than one write per
    second the mtime runs ahead of the clock by the excess, and falls back
    to the clock once writes slow down; nothing compares it with the clock
    but MapReader, which treats a future mtime as settled.

    MapReader is the long-lived reader the milter uses: one read-only handle,
    reopened when the file changes. A change is detected with one stat
    (inode, size, mtime); because file times are taken from a coarse clock,
    a file modified less than RACY_NS before it was opened is never trusted
    from cache (the "racy git" rule), so the first lookup after any write sees
    it. A mutex serialises lookups: flock state belongs to the open file, not
    the thread, and libmilter's worker pool calls in from many threads.

DIAGNOSTICS
    StoreUnavailable for a file that exists but cannot be read or written
    (permissions, not a hash database, checksum errors, a lock not obtained
    within the wait limit). A missing file reads as an empty map.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from typing import Any, Callable, Hashable, Iterator, Optional

try:
    from berkeleydb import db
except ModuleNotFoundError:  # Debian 12 packages the same module as bsddb3 (python3-bsddb3)
    from bsddb3 import db  # type: ignore[no-redef,import-not-found,unused-ignore]

from relaymilter.errors import StoreUnavailable

log = logging.getLogger("relaymilter.store")

LOCK_WAIT = 30.0            # seconds a writer or reader waits for a flock
RACY_NS = 100_000_000       # file mtimes closer than this to "now" are not trusted
CREATE_MODE = 0o644
CACHE_MAX = 65536           # answers kept per file version by a MapReader
_MISS = object()


def _same(value: Any) -> Any:
    return value


def _fail(path: str, what: str, exc: BaseException) -> StoreUnavailable:
    detail = exc.args[-1] if isinstance(exc, db.DBError) and exc.args else exc
    if isinstance(exc, OSError) and exc.strerror:
        detail = exc.strerror
    return StoreUnavailable("%s: cannot %s: %s" % (path, what, detail))


def flock_wait(fd: int, how: int, path: str, wait: float = LOCK_WAIT) -> None:
    """flock(fd, how) with a bounded wait; StoreUnavailable after *wait* seconds."""
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    deadline = time.monotonic() + wait
    pause = 0.0005
    while True:
        try:
            fcntl.flock(fd, how | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise StoreUnavailable("%s: lock not obtained within %gs" % (path, wait)) from None
            time.sleep(pause)
            pause = min(pause * 2, 0.02)


def advance_mtime(fd: int, before_ns: int) -> None:
    """Give the file on *fd* an mtime whose whole second is past *before_ns*'s (see header).

    An explicit time needs the file's owner (or root); anyone else who may
    write the file waits for the clock to pass that second and sets "now".
    """
    st = os.fstat(fd)
    before_s = before_ns // 1_000_000_000
    if st.st_mtime_ns // 1_000_000_000 > before_s:
        return
    frac = st.st_mtime_ns % 1_000_000_000
    try:
        os.utime(fd, ns=(st.st_atime_ns, (before_s + 1) * 1_000_000_000 + frac))
        return
    except PermissionError:
        pass
    time.sleep(max(0.0, (before_s + 1) - time.time()) + 0.001)
    try:
        os.utime(fd)
    except PermissionError as exc:
        log.warning("fd %d: cannot advance the mtime (%s): whole-second readers such as sendmail"
                    " and Postfix may miss this change until the next write", fd, exc.strerror)


def strip_nul(raw: bytes) -> bytes:
    return raw[:-1] if raw.endswith(b"\0") else raw


def key_has_nul(handle: db.DB) -> Optional[bool]:
    """True/False for the NUL style of the file's first key; None when empty."""
    cur = handle.cursor()
    try:
        first = cur.first()
    finally:
        cur.close()
    if first is None:
        return None
    return first[0].endswith(b"\0")


def get_both_styles(handle: db.DB, key: bytes) -> Optional[bytes]:
    """Look *key* up makemap style, then postmap style (with a trailing NUL)."""
    value = handle.get(key)
    if value is None:
        value = handle.get(key + b"\0")
    return None if value is None else strip_nul(value)


class WriteTxn:
    """A map opened for writing under LOCK_EX; keys go in the file's own NUL style."""

    def __init__(self, handle: db.DB, nul: bool, path: str = "") -> None:
        self.handle = handle
        self.nul = nul
        self.path = path
        self.changed = False

    def _k(self, key: bytes) -> bytes:
        return key + b"\0" if self.nul else key

    def get(self, key: bytes) -> Optional[bytes]:
        return get_both_styles(self.handle, key)

    def put(self, key: bytes, value: bytes) -> None:
        self.changed = True
        self.handle.put(self._k(key), value + b"\0" if self.nul else value)

    def delete(self, key: bytes) -> bool:
        found = False
        for k in (key, key + b"\0"):
            try:
                self.handle.delete(k)
                found = True
                self.changed = True
            except db.DBNotFoundError:
                pass
        return found

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        cur = self.handle.cursor()
        try:
            rec = cur.first()
            while rec is not None:
                yield strip_nul(rec[0]), strip_nul(rec[1])
                rec = cur.next()
        finally:
            cur.close()

    def remove_where(self, pred: Callable[[bytes], bool]) -> int:
        """Delete every record whose (stripped) value satisfies *pred*; return how many.

        One cursor pass sorts records into kept and removed. When most go (the
        nightly "expire everything old"), the file is truncated in place
        (DB_TRUNCATE keeps the inode readers and sendmail lock) and the few
        survivors written back, which is several times faster than deleting
        record by record and returns the space; otherwise records are deleted
        one by one.
        """
        keep: list[tuple[bytes, bytes]] = []
        gone: list[bytes] = []
        cur = self.handle.cursor()
        try:
            rec = cur.first()
            while rec is not None:
                if pred(strip_nul(rec[1])):
                    gone.append(rec[0])
                else:
                    keep.append(rec)
                rec = cur.next()
        finally:
            cur.close()
        if gone:
            self.changed = True
        if len(gone) > len(keep):
            self.handle.close()
            self.handle = db.DB()
            self.handle.open(self.path, dbtype=db.DB_HASH, flags=db.DB_CREATE | db.DB_TRUNCATE)
            for key, value in keep:
                self.handle.put(key, value)
        else:
            for key in gone:
                self.handle.delete(key)
        return len(gone)


@contextlib.contextmanager
def write_map(path: str, create: bool = True) -> Iterator[WriteTxn]:
    """Open *path* for a read-modify-write under flock(LOCK_EX); sync before unlocking.

    The file is created (mode 0644 less umask) when missing and *create* is
    true. A file that is not a hash database is refused and left untouched.
    """
    while True:
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        try:
            existed = os.path.exists(path)
            fd = os.open(path, flags | os.O_CLOEXEC, CREATE_MODE)
        except OSError as exc:
            raise _fail(path, "open for writing", exc) from None
        try:
            flock_wait(fd, fcntl.LOCK_EX, path)
            # Someone may have renamed a new file over the path while we waited:
            # then our lock guards a file nobody reads any more. Start again.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if not same:
                continue
            before = os.fstat(fd)
            handle = db.DB()
            try:
                handle.open(path, dbtype=db.DB_HASH, flags=db.DB_CREATE if create else 0)
            except db.DBError as exc:
                handle.close()
                if not existed and os.fstat(fd).st_size == 0:
                    os.unlink(path)
                raise _fail(path, "open as a hash database", exc) from None
            txn = WriteTxn(handle, False, path)
            try:
                txn.nul = bool(key_has_nul(handle))
                yield txn
                txn.handle.sync()
            except db.DBError as exc:
                raise _fail(path, "update", exc) from None
            finally:
                txn.handle.close()
            if txn.changed:
                advance_mtime(fd, before.st_mtime_ns)
            return
        finally:
            os.close(fd)


def read_items(path: str) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of the map, read under flock(LOCK_SH); [] when missing."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise _fail(path, "open", exc) from None
    try:
        flock_wait(fd, fcntl.LOCK_SH, path)
        if os.fstat(fd).st_size == 0:
            return []
        handle = db.DB()
        try:
            handle.open(path, dbtype=db.DB_HASH, flags=db.DB_RDONLY)
            return list(WriteTxn(handle, False).items())
        except db.DBError as exc:
            raise _fail(path, "read as a hash database", exc) from None
        finally:
            handle.close()
    finally:
        os.close(fd)


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
        with self._mutex:
            value = convert(self._get(key_of(token), st))
            if self._trusted and self._sig is not None:
                if self._cache is None or self._cache[0] != self._sig or len(self._cache[1]) >= CACHE_MAX:
                    self._cache = (self._sig, {})
                self._cache[1][token] = value
            return value

    def _get(self, key: bytes, st: Optional[os.stat_result] = None) -> Optional[bytes]:
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
                raise _fail(self.path, "stat", exc) from None
        self._missing_logged = False
        if self._fd is None or self._ident != (st.st_dev, st.st_ino):
            # First use, or the path now names another file (replaced by rename).
            self._drop()
            try:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise _fail(self.path, "open", exc) from None
            opened = os.fstat(self._fd)
            self._ident = (opened.st_dev, opened.st_ino)
        flock_wait(self._fd, fcntl.LOCK_SH, self.path)
        try:
            st = os.fstat(self._fd)
            sig = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if st.st_size == 0:
                self._sig, self._trusted = None, False
                return None
            if self._handle is None or sig != self._sig or not self._trusted:
                if self._handle is not None:
                    self._handle.close()
                    self._handle = None
                handle = db.DB()
                try:
                    handle.open(self.path, dbtype=db.DB_HASH, flags=db.DB_RDONLY | db.DB_THREAD)
                except db.DBError as exc:
                    handle.close()
                    self._sig = None
                    raise _fail(self.path, "read as a hash database", exc) from None
                self._handle = handle
                self._sig = sig
                # A future mtime was set by advance_mtime(): the next write moves it again.
                self._trusted = abs(time.time_ns() - st.st_mtime_ns) > RACY_NS
            try:
                return get_both_styles(self._handle, key)
            except db.DBError as exc:
                self._handle.close()
                self._handle = None
                raise _fail(self.path, "read", exc) from None
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
