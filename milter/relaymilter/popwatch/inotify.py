"""NAME
    relaymilter.popwatch.inotify - Linux inotify through ctypes, just enough to wake up

DESCRIPTION
    The follower sleeps in select() on an inotify descriptor so that a log
    line is read within milliseconds of being written, without polling. It
    only needs to know *that* something happened (it then re-checks every
    file it follows), so events are drained, not decoded.

    libc's inotify_init1 / inotify_add_watch / inotify_rm_watch are called
    through ctypes: no extra dependency.

DIAGNOSTICS
    Inotify.create() returns None where inotify is missing (not Linux, no
    libc symbol, the per-user instance limit reached); the follower then
    polls. add() returns None when a path cannot be watched (missing,
    permission, watch limit); the follower's safety-net poll covers it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
from typing import Optional

log = logging.getLogger("relaymilter.popwatch")

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

FILE_MASK = IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVE_SELF | IN_DELETE_SELF
DIR_MASK = IN_CREATE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE | IN_ONLYDIR

_libc: Optional[ctypes.CDLL] = None


def _load() -> Optional[ctypes.CDLL]:
    global _libc  # one process-wide handle on libc, loaded on first use
    if _libc is None:
        name = ctypes.util.find_library("c") or "libc.so.6"
        try:
            lib = ctypes.CDLL(name, use_errno=True)
            lib.inotify_init1.argtypes = [ctypes.c_int]
            lib.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
            lib.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
        except (OSError, AttributeError):
            return None
        _libc = lib
    return _libc


class Inotify:
    """One inotify instance: watch paths, expose the fd for select(), drain events."""

    def __init__(self, fd: int, lib: ctypes.CDLL) -> None:
        self.fd = fd
        self._lib = lib

    @classmethod
    def create(cls) -> Optional["Inotify"]:
        lib = _load()
        if lib is None:
            return None
        fd = lib.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            log.warning("inotify unavailable (%s): polling the logs instead", os.strerror(ctypes.get_errno()))
            return None
        return cls(fd, lib)

    def add(self, path: str, mask: int) -> Optional[int]:
        """Watch *path*; the watch descriptor, or None when it cannot be watched."""
        wd = self._lib.inotify_add_watch(self.fd, os.fsencode(path), mask)
        if wd < 0:
            err = ctypes.get_errno()
            if err not in (errno.ENOENT, errno.ENOTDIR):
                log.debug("cannot watch %s: %s", path, os.strerror(err))
            return None
        return wd

    def remove(self, wd: int) -> None:
        # EINVAL: the kernel already dropped it (file deleted); nothing to do.
        self._lib.inotify_rm_watch(self.fd, wd)

    def drain(self) -> int:
        """Read and discard pending events; the number of bytes read."""
        total = 0
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return total
            except InterruptedError:
                continue
            if not data:
                return total
            total += len(data)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
