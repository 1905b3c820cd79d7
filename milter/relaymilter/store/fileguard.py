"""NAME
    relaymilter.store.fileguard - open a map file without being fooled by what sits at its path

DESCRIPTION
    The tools that write relayers.db and spammers.db often run as root in a
    directory another user owns (~vuser/etc). Whoever owns the directory can
    put a symlink, a FIFO, a directory or a cut-down file where the map was.

    Symlinks: writers follow a symlink (at the map's path or in any directory
    above it) only when the link itself is owned by root or by the user
    running the tool; any other link, and a dangling link, is refused. The
    final file is then opened with O_NOFOLLOW, so a link planted after the
    check is refused too, and Berkeley DB's own descriptor is checked to be
    the same file (same_file).

    Non-regular files: every open is O_NONBLOCK (opening a FIFO never
    waits), and anything but a regular file is refused at once, naming what
    it is.

    Truncation: a hash file's first page holds its magic number, page size
    and last page number. A file that exists but is empty, has another magic
    number, or is shorter than its header says is refused as "not a hash
    database" or "truncated" (Berkeley DB itself opens a cut-down file and
    answers "not found" for what was cut off).

    File times: advance_mtime() moves a file's mtime past a given second,
    which is how a whole-second reader (sendmail, Postfix) learns of a
    change (see store.bdb).

    Full disk: before a write, the blocks it may need are allocated
    (reserve): holes inside the file are filled and room past its end is
    reserved without changing its size, so a write that would run out of
    space is refused before the file is touched. What was not used past the
    end is given back afterwards (release). On a file system without
    fallocate, the free space is checked instead (a weaker guarantee).

DIAGNOSTICS
    StoreUnavailable with the path and the cause: "is a symlink owned by
    uid N (neither root nor the running user)", "is a dangling symlink",
    "is a directory", "is a FIFO", "is not a regular file", "is empty (0
    bytes): not a hash database", "is not a hash database", "is truncated
    (N bytes, its header says M)", "no space left on device".
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import stat
import struct
import time
from typing import Optional

from relaymilter.errors import StoreUnavailable

log = logging.getLogger("relaymilter.store")

HASH_MAGIC = 0x061561
_FALLOC_KEEP_SIZE = 0x01
_FALLOC_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


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


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "is a directory"
    if stat.S_ISFIFO(mode):
        return "is a FIFO"
    if stat.S_ISSOCK(mode):
        return "is a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device"
    return "is not a regular file"


def resolve(path: str) -> str:
    """*path* with its symlinks resolved, each one checked (see the module header).

    A missing last component is fine (the map will be created) unless a
    symlink pointed there: creating a file through a dangling link is refused.
    """
    me = os.geteuid()
    # (component, the link it came from or "")
    pending = [(part, "") for part in os.path.abspath(path).split(os.sep)[1:]]
    done = "/"
    hops = 0
    while pending:
        part, via = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            done = os.path.dirname(done)
            continue
        here = os.path.join(done, part)
        try:
            st = os.lstat(here)
        except FileNotFoundError:
            if via:
                raise StoreUnavailable("%s: %s is a dangling symlink: refused" % (path, via)) from None
            return os.path.join(here, *(p for p, _ in pending))
        except OSError as exc:
            raise StoreUnavailable("%s: cannot examine %s: %s" % (path, here, exc.strerror)) from None
        if not stat.S_ISLNK(st.st_mode):
            done = here
            continue
        if st.st_uid not in (0, me):
            raise StoreUnavailable("%s: %s is a symlink owned by uid %d (neither root nor the running user): "
                                   "refused" % (path, here, st.st_uid))
        hops += 1
        if hops > 40:
            raise StoreUnavailable("%s: too many levels of symbolic links" % path)
        target = os.readlink(here)
        if target.startswith("/"):
            done = "/"
        pending = [(p, via or here) for p in target.split("/")] + pending
    return done


def open_regular(path: str, flags: int, mode: int = 0o644) -> int:
    """os.open() that never blocks on a FIFO and refuses anything but a regular file.

    O_NOFOLLOW applies to the last component: callers that write pass a
    path from resolve(). OSError from the open itself is left to the caller.
    """
    fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StoreUnavailable("%s: %s" % (path, _kind(st.st_mode)))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def refuse_odd(path: str, st: os.stat_result) -> None:
    """StoreUnavailable when *st* (a stat of *path*) is not a regular file."""
    if not stat.S_ISREG(st.st_mode):
        raise StoreUnavailable("%s: %s" % (path, _kind(st.st_mode)))


def check_header(fd: int, path: str, allow_empty: bool = False) -> None:
    """Refuse a file that is empty, not a hash database, or shorter than its header says."""
    size = os.fstat(fd).st_size
    if size == 0:
        if allow_empty:
            return
        raise StoreUnavailable("%s: is empty (0 bytes): not a hash database" % path)
    head = os.pread(fd, 36, 0)
    if len(head) < 36:
        raise StoreUnavailable("%s: is truncated (%d bytes): not a hash database" % (path, size))
    for order in ("<", ">"):
        magic, _version, pagesize = struct.unpack(order + "III", head[12:24])
        if magic == HASH_MAGIC:
            (last_pgno,) = struct.unpack(order + "I", head[32:36])
            break
    else:
        raise StoreUnavailable("%s: is not a hash database" % path)
    if pagesize < 512 or pagesize & (pagesize - 1):
        raise StoreUnavailable("%s: is not a hash database (page size %d)" % (path, pagesize))
    want = (last_pgno + 1) * pagesize
    if size < want or size % pagesize:
        raise StoreUnavailable("%s: is truncated (%d bytes, its header says %d)" % (path, size, want))


def same_file(fd: int, other_fd: int) -> bool:
    return os.path.samestat(os.fstat(fd), os.fstat(other_fd))


def _fallocate(fd: int, mode: int, offset: int, length: int) -> Optional[int]:
    """errno of fallocate(2), or None on success."""
    if length <= 0:
        return None
    if _libc.fallocate(fd, mode, offset, length) == 0:
        return None
    return ctypes.get_errno()


def reserve(fd: int, path: str, grow: int) -> None:
    """Allocate what a write may need (holes inside, *grow* bytes past the end); refuse if it cannot."""
    size = os.fstat(fd).st_size
    err = _fallocate(fd, 0, 0, size)
    if err is None:
        err = _fallocate(fd, _FALLOC_KEEP_SIZE, size, grow)
    if err is None:
        return
    if err in (errno.ENOSPC, errno.EDQUOT):
        release(fd)
        raise StoreUnavailable("%s: cannot update: %s (nothing was written)" % (path, os.strerror(err)))
    if err in (errno.EOPNOTSUPP, errno.ENOSYS):
        vfs = os.fstatvfs(fd)
        free = vfs.f_bavail * vfs.f_frsize if os.geteuid() else vfs.f_bfree * vfs.f_frsize
        if free < size + grow:
            raise StoreUnavailable("%s: cannot update: %s (nothing was written)"
                                   % (path, os.strerror(errno.ENOSPC)))
        return
    raise StoreUnavailable("%s: cannot update: %s" % (path, os.strerror(err)))


def release(fd: int) -> None:
    """Give back blocks reserved past the end of the file (best effort)."""
    size = os.fstat(fd).st_size
    _fallocate(fd, _FALLOC_PUNCH_HOLE | _FALLOC_KEEP_SIZE, size, 1 << 40)
