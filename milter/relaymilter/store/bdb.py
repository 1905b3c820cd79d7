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
    ends its write, still under LOCK_EX, with fileguard.advance_mtime(): the file's
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

    What readers and writers share (the module, flock with a deadline, the
    key styles, the wording of errors) is store.bdbbase.

    Every write first passes store.fileguard: trusted symlinks only, regular
    files only, whole hash databases only, and the blocks it may need
    allocated before the file is touched (a full disk refuses the write and
    leaves the map as it was); it ends with fsync. The milter's long-lived
    reader is store.mapreader.MapReader.

DIAGNOSTICS
    StoreUnavailable for a file that exists but cannot be read or written
    (permissions, not a hash database, truncated, not a regular file, an
    untrusted symlink, no space left, a lock not obtained within the wait
    limit), naming the path and the cause. A missing file reads as an empty
    map.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
from typing import Callable, Iterator, Optional

from relaymilter.errors import StoreUnavailable
from relaymilter.store import fileguard
from relaymilter.store.bdbbase import (CREATE_MODE, by_fd, db, flock_wait, get_both_styles, key_has_nul, strip_nul,
                                       unavailable)

log = logging.getLogger("relaymilter.store")

RESERVE_SLACK = 8 << 10     # bytes reserved past the end beyond what a write says it adds


class WriteTxn:
    """A map opened for writing under LOCK_EX; keys go in the file's own NUL style."""

    def __init__(self, handle: db.DB, nul: bool, path: str = "", fd: int = -1) -> None:
        self.handle = handle
        self.nul = nul
        self.path = path
        self.fd = fd
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
        if len(gone) > len(keep) and self._compact(keep):
            return len(gone)
        for key in gone:
            self.handle.delete(key)
        return len(gone)

    def _compact(self, keep: list[tuple[bytes, bytes]]) -> bool:
        """Rewrite the file in place to hold only *keep*; False (nothing changed) when it cannot.

        The survivors are written to a temporary file first; only when that
        succeeded, and every block of the live file's new extent is
        allocated, are its bytes copied over the live file (same inode, so
        readers and flock holders keep their file) and the file cut to size.
        Overwriting allocated blocks cannot run out of space, so a full disk
        never leaves the map half written.
        """
        directory, base = os.path.split(self.path)
        tmp = os.path.join(directory, ".%s.%s.tmp" % (base, secrets.token_hex(6)))
        try:
            fresh = db.DB()
            try:
                fresh.open(tmp, dbtype=db.DB_HASH, flags=db.DB_CREATE | db.DB_EXCL)
                for key, value in keep:
                    fresh.put(key, value)
                fresh.sync()
            finally:
                with contextlib.suppress(db.DBError):
                    fresh.close()
            with open(tmp, "rb") as fh:
                data = fh.read()
            fileguard.reserve(self.fd, self.path, len(data) - os.fstat(self.fd).st_size)
        except (db.DBError, OSError, StoreUnavailable) as exc:
            log.info("%s: expiring record by record (%s)", self.path, exc)
            return False
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        self.handle.close()
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:done + (1 << 20)], done)
        os.ftruncate(self.fd, len(data))
        self.handle = db.DB()
        self.handle.open(by_fd(self.fd, self.path), dbtype=db.DB_HASH)
        return True


def _fsync_dir(path: str) -> None:
    try:
        dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


@contextlib.contextmanager
def write_map(path: str, create: bool = True, grow: Optional[int] = None) -> Iterator[WriteTxn]:
    """Open *path* for a read-modify-write under flock(LOCK_EX); sync and fsync before unlocking.

    The file is created (mode 0644 less umask) when missing and *create* is
    true, whole: an empty hash database hard-linked into place, never a
    0-byte file a reader could catch. Symlinks, non-regular files, files that are not (or no longer
    whole) hash databases are refused and left untouched (see fileguard).
    *grow* is how many bytes of keys and values the caller may add: room for
    them is allocated first, so a full disk refuses the write before the
    file is touched; 0 promises deletes only (which never need new blocks),
    None means unknown. On success the data is on disk and the file's mtime
    has moved (advance_mtime); on StoreUnavailable the map is as it was.
    """
    real = fileguard.resolve(path)
    while True:
        made = _create_whole(real, path) if create and not os.path.lexists(real) else None
        try:
            fd = fileguard.open_regular(real, os.O_RDWR | os.O_NOFOLLOW, CREATE_MODE)
        except FileNotFoundError as exc:
            if create:
                continue            # removed again between our link() and open(): make it anew
            raise unavailable(path, "open for writing", exc) from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise StoreUnavailable("%s: is a symlink: refused" % real) from None
            raise unavailable(path, "open for writing", exc) from None
        try:
            flock_wait(fd, fcntl.LOCK_EX, path)
            # Someone may have renamed a new file over the path while we waited:
            # then our lock guards a file nobody reads any more. Start again.
            try:
                same = os.path.samestat(os.fstat(fd), os.lstat(real))
            except FileNotFoundError:
                same = False
            if not same:
                continue
            before = os.fstat(fd)
            # Ours to remove again if this write fails: the empty map we put
            # there, untouched by any other writer since.
            existed = made is None or _ident(made) != _ident(before)
            txn = _open_txn(fd, real, path, create, grow, existed, before)
            done = False
            try:
                yield txn
                txn.handle.sync()
                txn.handle.close()
                done = True
                fileguard.release(fd)
            except db.DBError as exc:
                raise unavailable(path, "update", exc) from None
            except OSError as exc:
                raise unavailable(path, "update", exc) from None
            finally:
                if not done:
                    with contextlib.suppress(db.DBError):   # keep the first error, not close()'s
                        txn.handle.close()
                    _undo_reserve(fd, real, existed, before)
            if txn.changed:
                fileguard.advance_mtime(fd, before.st_mtime_ns)
            # Berkeley DB's sync() writes, it does not reach the disk. The data
            # is complete for readers already, so they need not wait for that.
            fcntl.flock(fd, fcntl.LOCK_UN)
            try:
                os.fsync(fd)
                if not existed:
                    _fsync_dir(real)
            except OSError as exc:
                raise unavailable(path, "sync to disk", exc) from None
            return
        finally:
            os.close(fd)


def _ident(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _create_whole(real: str, path: str) -> Optional[os.stat_result]:
    """Put an empty hash database at *real* in one step: its stat, or None if someone else was first.

    The database is made under a temporary name in the same directory and
    hard-linked into place, so the path never names a file that is still
    0 bytes: a reader (the milter, sendmail, Postfix) that opened it in that
    instant would see no hash database and tempfail.
    """
    directory, base = os.path.split(real)
    tmp = os.path.join(directory, ".%s.%d.%s.new" % (base, os.getpid(), secrets.token_hex(4)))
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, CREATE_MODE)
    except OSError as exc:
        raise unavailable(path, "create", exc) from None
    try:
        handle = db.DB()
        try:
            handle.open(by_fd(fd, tmp), dbtype=db.DB_HASH, flags=db.DB_CREATE)
            handle.sync()
        except db.DBError as exc:
            raise unavailable(path, "create", exc) from None
        finally:
            handle.close()
        try:
            os.fsync(fd)
            made = os.fstat(fd)
            os.link(tmp, real)
        except FileExistsError:
            return None
        except OSError as exc:
            raise unavailable(path, "create", exc) from None
        return made
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _open_txn(fd: int, real: str, path: str, create: bool, grow: Optional[int], existed: bool,
              before: os.stat_result) -> WriteTxn:
    """The locked file on *fd* opened by Berkeley DB, with room for *grow* more bytes."""
    try:
        fileguard.check_header(fd, path, allow_empty=True)
        if grow != 0:
            # A put may split buckets up to a doubling of the table (about the
            # file's size) and add overflow pages for what it stores.
            size = os.fstat(fd).st_size
            fileguard.reserve(fd, path, size + 4 * (grow or 0) + RESERVE_SLACK)
        handle = db.DB()
        try:
            handle.open(by_fd(fd, real), dbtype=db.DB_HASH, flags=db.DB_CREATE if create else 0)
        except db.DBError as exc:
            handle.close()
            raise unavailable(path, "open as a hash database", exc) from None
        txn = WriteTxn(handle, False, real, fd)
        try:
            txn.nul = bool(key_has_nul(handle))
        except db.DBError as exc:
            handle.close()
            raise unavailable(path, "read", exc) from None
        return txn
    except StoreUnavailable:
        _undo_reserve(fd, real, existed, before)
        raise


def _undo_reserve(fd: int, real: str, existed: bool, before: os.stat_result) -> None:
    """After a failed write: give back reserved blocks, put the mtime back, drop a file we created.

    fallocate() moves the mtime to "now", which may be earlier than a time
    advance_mtime() set: left so, a later write could fail to move it past
    what sendmail recorded.
    """
    fileguard.release(fd)
    if not existed:
        with contextlib.suppress(OSError):
            os.unlink(real)
        return
    with contextlib.suppress(OSError):
        os.utime(fd, ns=(before.st_atime_ns, before.st_mtime_ns))


def read_items(path: str) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of the map, read under flock(LOCK_SH); [] when missing.

    A file that exists but is not a whole hash database (0 bytes included)
    is StoreUnavailable, never an empty map.
    """
    try:
        fd = fileguard.open_regular(path, os.O_RDONLY)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise unavailable(path, "open", exc) from None
    try:
        flock_wait(fd, fcntl.LOCK_SH, path)
        fileguard.check_header(fd, path)
        handle = db.DB()
        try:
            handle.open(by_fd(fd, path), dbtype=db.DB_HASH, flags=db.DB_RDONLY)
            return list(WriteTxn(handle, False).items())
        except db.DBError as exc:
            raise unavailable(path, "read as a hash database", exc) from None
        finally:
            with contextlib.suppress(db.DBError):
                handle.close()
    finally:
        os.close(fd)


# The milter's reader lives in its own module; kept importable from here.
from relaymilter.store.mapreader import MapReader  # noqa: E402

__all__ = ["MapReader", "WriteTxn", "read_items", "write_map"]
