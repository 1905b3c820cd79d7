"""NAME
    relaymilter.store.spammers - the spammers blocklist: ~/etc/spammers -> spammers.db

DESCRIPTION
    The source is parsed by relaymilter.store.spammerslist (one `user@host`
    or `host` per line, normalised exactly as the sender check's lookup keys
    are, so the file and the lookups cannot disagree).

    rebuild() writes spammers.db the way `makemap hash` would (Berkeley DB
    hash, keys lowercase without a trailing NUL) with the value REJECT, so
    the file also works as a sendmail access-style map (`Kspammers hash
    /path/spammers`, any value means "listed") and as a Postfix
    `check_sender_access hash:` table. Unlike makemap it never truncates the
    live file: it writes a temporary file in the same directory, fsyncs it,
    and renames it over the old one, so a reader sees the old map or the new
    one, never part of one. The replaced file's mtime is then advanced past
    its previous second (fileguard.advance_mtime): sendmail watches the inode it
    has open, in whole seconds, and reopens the path only when that grows;
    Postfix notices the unlinked inode; the milter notices the new inode. The old file's mode (and, when allowed, owner)
    is kept; a symlink is followed only when root or the running user owns
    it (store.fileguard), and the new file is renamed within the directory
    of the file it replaces. An exclusive flock on `DB.lock` is held
    while the source is read and the map written, so two rebuilds apply in
    order (the later run reads the later source and its map stays). The
    source is parsed completely before the map is touched, so a bad line
    changes nothing (at most the lock file is created).

    SpammersMap is the milter's long-lived reader. It keeps the whole list
    in memory as a frozenset, read under flock(LOCK_SH) whenever the file
    changes (one stat per lookup: inode, size, mtime, ctime; a file changed
    less than bdbbase.RACY_NS before it was read is read again). Why not answer
    from the live file through bdb.MapReader: (1) the last good list must
    survive a corrupt file (README), and a corrupt file is often the
    *same* inode (makemap and `>` rewrite in place, a disk error damages a
    page), where keeping the old descriptor open gives nothing back; (2) a
    single-key probe cannot tell a damaged page from a miss, whereas reading
    every key validates every page; (3) a sender check asks 3 to 6 keys, and
    a set answers each in well under a microsecond. The price is memory
    (about 12 MB for 100,000 entries) and a full read (about 0.1 s for
    100,000 entries) on each change, by the thread that notices it.

DIAGNOSTICS
    SpammersSyntaxError (a ConfigError) "SOURCE:LINE: reason" for a bad line:
    NUL bytes, invalid UTF-8, control characters, more than one word, or what
    normalize_entry refuses. SpammersSourceError for a source that cannot be
    read. StoreUnavailable when the new map cannot be written (the old one is
    untouched and the temporary file removed). SpammersMap: a missing file
    is an empty list (logged once); a FIFO or other non-regular file, a file
    of 0 bytes or cut short, an unreadable or corrupt one keeps the
    last good list and logs one error per change of the file; with no good
    list yet, lookups raise StoreUnavailable (the sender check tempfails).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import stat
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

from relaymilter.errors import StoreUnavailable
from relaymilter.address.resolve import ascii_lower
from relaymilter.store import fileguard
from relaymilter.store.bdbbase import CREATE_MODE, RACY_NS, by_fd, db, flock_wait  # db: berkeleydb or bsddb3
from relaymilter.store.spammerslist import (  # noqa: F401 - re-exported: the parser's public names
    SpammersSourceError,
    SpammersSyntaxError,
    parse_line,
    parse_source,
    read_source,
    split_words,
)
from relaymilter.store.bdbbase import unavailable as _unavailable    # one wording for store errors

log = logging.getLogger("relaymilter.store.spammers")

VALUE = b"REJECT"           # access-map action; sendmail rules only test for presence
CACHE_BYTES = 32 << 20      # Berkeley DB cache while building: no page evictions at 100k entries


@contextlib.contextmanager
def rebuild_lock(target: str) -> Iterator[None]:
    """Hold flock(LOCK_EX) on TARGET.lock; the lock file is never removed (that would race)."""
    lock_path = target + ".lock"
    try:
        fd = fileguard.open_regular(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, CREATE_MODE)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StoreUnavailable("%s: is a symlink: refused" % lock_path) from None
        raise _unavailable(lock_path, "open the lock file", exc) from None
    try:
        flock_wait(fd, fcntl.LOCK_EX, lock_path)
        yield
    finally:
        os.close(fd)


def _fill(path: str, keys: list[str]) -> None:
    handle = db.DB()
    try:
        handle.set_cachesize(0, CACHE_BYTES)
        if keys:
            handle.set_h_nelem(len(keys))   # size the table once instead of splitting buckets
        handle.open(path, dbtype=db.DB_HASH, flags=db.DB_CREATE)
        for key in keys:
            handle.put(key.encode("utf-8"), VALUE)
        handle.sync()
    except BaseException:
        with contextlib.suppress(db.DBError):   # keep the first error, not close()'s
            handle.close()
        raise
    handle.close()


def _keep_attrs(fd: int, target: str) -> None:
    """Give the new file the old one's mode and, when we may, its owner and group."""
    try:
        old = os.stat(target)
    except FileNotFoundError:
        return
    os.fchmod(fd, stat.S_IMODE(old.st_mode))
    mine = os.fstat(fd)
    if (mine.st_uid, mine.st_gid) != (old.st_uid, old.st_gid):
        try:
            os.fchown(fd, old.st_uid, old.st_gid)
        except PermissionError:
            # Not root: a user may still keep the group if they belong to it.
            with contextlib.suppress(PermissionError):
                os.fchown(fd, -1, old.st_gid)


def _target(db_path: str) -> str:
    """The file to replace: trusted symlinks followed (fileguard.resolve); refused when not a regular file."""
    target = fileguard.resolve(db_path)
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        fileguard.refuse_odd(target, os.lstat(target))
    return target


def _replace(target: str, keys: list[str]) -> None:
    directory, base = os.path.split(target)
    tmp = os.path.join(directory, ".%s.%s.tmp" % (base, secrets.token_hex(6)))
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, CREATE_MODE)
    except OSError as exc:
        raise _unavailable(directory, "create a temporary file", exc) from None
    done = False
    try:
        try:
            _fill(tmp, keys)
            _keep_attrs(fd, target)
            os.fsync(fd)        # Berkeley DB's sync() does not reach the disk
        except (OSError, db.DBError) as exc:
            raise _unavailable(target, "write the new map", exc) from None
        finally:
            os.close(fd)
        old_fd = _open_old(target)
        try:
            try:
                os.rename(tmp, target)
            except OSError as exc:
                raise _unavailable(target, "replace", exc) from None
            done = True
            if old_fd is not None:
                # sendmail keeps reading the replaced inode until its mtime second grows.
                fileguard.advance_mtime(old_fd, os.fstat(old_fd).st_mtime_ns)
        finally:
            if old_fd is not None:
                os.close(old_fd)
    finally:
        if not done:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    _fsync_dir(directory)


def _open_old(target: str) -> Optional[int]:
    """A descriptor on the map about to be replaced, or None when there is none."""
    try:
        return os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None


def write_db(db_path: str, keys: list[str]) -> None:
    """Write *keys* to a new hash file and rename it over *db_path* (see the module header)."""
    target = _target(db_path)
    with rebuild_lock(target):
        _replace(target, keys)


def _fsync_dir(directory: str) -> None:
    """Make the rename itself durable; the new map is already in place if this fails."""
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        log.warning("%s: cannot sync the directory: %s", directory, exc.strerror)
        return
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def rebuild(source_path: str, db_path: str) -> int:
    """Parse *source_path* and atomically replace *db_path*; return the number of entries.

    The source is read under the rebuild lock, so of two runs the later one
    reads the later source and its map is the one left in place.
    """
    target = _target(db_path)
    with rebuild_lock(target):
        keys = read_source(source_path)
        _replace(target, keys)
    return len(keys)


Signature = tuple


def _signature(st: os.stat_result) -> Signature:
    # SpammersMap.members() spells this tuple out inline: keep the two alike.
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _settled(st: os.stat_result) -> bool:
    """False while the file's times are too recent to tell a later change from this one."""
    return time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > RACY_NS


@dataclass(frozen=True)
class _Snapshot:
    """A list as read (keys), or why it could not be (failure), for one file signature."""
    sig: Optional[Signature]        # None: the file did not exist
    settled: bool
    keys: frozenset = frozenset()
    failure: str = ""


def _read_keys(path: str) -> _Snapshot:
    try:
        fd = fileguard.open_regular(path, os.O_RDONLY)
    except FileNotFoundError:
        return _Snapshot(None, True)
    except OSError as exc:
        raise _unavailable(path, "open", exc) from None
    try:
        flock_wait(fd, fcntl.LOCK_SH, path)
        # The signature of what we hold locked. Should the path be renamed
        # over before Berkeley DB opens it, we read something newer than the
        # signature says, which costs one more read later, never a stale list.
        st = os.fstat(fd)
        fileguard.check_header(fd, path)
        handle = db.DB()
        try:
            handle.open(by_fd(fd, path), dbtype=db.DB_HASH, flags=db.DB_RDONLY)
            raw = handle.keys()
        except db.DBError as exc:
            raise _unavailable(path, "read as a hash database", exc) from None
        finally:
            # A damaged page panics the handle's private region; close then
            # fails as well, and the error above already says why.
            with contextlib.suppress(db.DBError):
                handle.close()
        keys = frozenset((k[:-1] if k.endswith(b"\0") else k).decode("utf-8", "surrogateescape") for k in raw)
        return _Snapshot(_signature(st), _settled(st), keys)
    finally:
        os.close(fd)


class SpammersMap:
    """The spammers list for the milter: thread-safe, reloaded on change, see the module header."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._mutex = threading.Lock()
        self._good: Optional[_Snapshot] = None      # the last list read whole
        self._bad: Optional[_Snapshot] = None       # the file as last found unreadable
        self.reloads = 0            # the list in use replaced by a newly read one: for the metrics
        self.lookup_errors = 0      # lookups that raised StoreUnavailable (no good list)

    def contains(self, key: str) -> bool:
        """Whether *key* is listed; ASCII letters compare caseless, as in sendmail and makemap."""
        return ascii_lower(key) in self._keys()

    __call__ = contains

    def lookup(self, keys: Iterable[str]) -> bool:
        """Whether any of *keys* is listed; one change check for all of them."""
        current = self._keys()
        return any(ascii_lower(k) in current for k in keys)

    def members(self) -> frozenset:
        """The listed keys (ASCII-lowercased) as they are now: one change check for a whole MAIL FROM.

        StoreUnavailable when no good list can be had (the caller tempfails
        the sender check; a null sender, never looked up, still passes).
        """
        # The common case inline (the milter calls this at every MAIL): the
        # good list is settled and the file is still the one it was read from.
        good = self._good
        if good is not None and good.settled:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                if good.sig is None:        # still missing, as when the (empty) list was settled
                    return good.keys
                return self._keys()
            except OSError:
                return self._keys()
            if good.sig == (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns):
                return good.keys
        return self._keys()

    def __len__(self) -> int:
        return len(self._keys())

    def close(self) -> None:
        """Forget the list; the next lookup reads the file again."""
        with self._mutex:
            self._good = self._bad = None

    def _stat(self) -> Optional[Signature]:
        try:
            return _signature(os.stat(self.path))
        except FileNotFoundError:
            return None
        except OSError as exc:
            # A directory we may not search and the like: a signature of its
            # own, so the failure is logged once and retried when it changes.
            return ("stat", exc.errno)

    def _cached(self, sig: Optional[Signature]) -> Optional[frozenset]:
        good, bad = self._good, self._bad
        if good is not None and good.sig == sig and good.settled:
            return good.keys
        if bad is not None and bad.sig == sig and bad.settled:
            if good is None:
                raise StoreUnavailable(bad.failure)
            return good.keys
        return None

    def _keys(self) -> frozenset:
        sig = self._stat()
        try:
            keys = self._cached(sig)            # the fast path takes no lock
            if keys is not None:
                return keys
            with self._mutex:
                keys = self._cached(sig)        # another thread may have just read it
                return keys if keys is not None else self._reload(sig)
        except StoreUnavailable:
            with self._mutex:
                self.lookup_errors += 1
            raise

    def _reload(self, sig: Optional[Signature]) -> frozenset:
        good, bad = self._good, self._bad
        try:
            snap = _read_keys(self.path)
        except StoreUnavailable as exc:
            try:
                settled = _settled(os.stat(self.path))
            except OSError:
                settled = True
            fsig = sig if sig is not None else ("gone",)
            if bad is None or bad.sig != fsig:
                if good is not None:
                    log.error("%s; keeping the last good spammers list (%d entries)", exc, len(good.keys))
                else:
                    log.error("%s; no good spammers list yet, sender checks will tempfail", exc)
            self._bad = _Snapshot(fsig, settled, failure=str(exc))
            if good is None:
                raise
            return good.keys
        if bad is not None:
            log.info("%s is readable again: %d entries", self.path, len(snap.keys))
            self._bad = None
        if snap.sig is None:
            if good is None or good.sig is not None:
                log.info("spammers list %s does not exist: treating it as empty", self.path)
        elif good is None or good.sig != snap.sig:
            log.info("spammers list %s loaded: %d entries", self.path, len(snap.keys))
        if good is None or good.sig != snap.sig:
            self.reloads += 1
        self._good = snap
        return snap.keys
