"""NAME
    relaymilter.store.gilcalls - the counters' system calls: flock and fstat keeping the GIL, the PID without one

DESCRIPTION
    fcntl.flock and os.fstat let go of the GIL around the call, as they must
    for a call that may block. A non-blocking flock, an unlock and an fstat
    never block, and in a milter whose libmilter threads all want the GIL
    each letting-go hands it to another thread and waits to get it back:
    two thread switches per count. These wrappers call libc's own functions
    through ctypes.PyDLL, which keeps the GIL; a lock that has to be waited
    for is waited for by the caller with the GIL let go (time.sleep between
    tries). Where libc's functions cannot be found, the fcntl / os calls are
    used.

    pid() is this process's PID without a system call (glibc's getpid() is
    one): kept in a variable that a forked child updates (os.register_at_fork).

    struct stat differs between architectures: the offsets of st_nlink and
    st_size in STAT_LAYOUT are checked against os.fstat when an Examiner is
    made for a file, and where they are not known or do not match, os.fstat
    is used.

DIAGNOSTICS
    OSError with libc's errno, as fcntl and os would raise it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import platform
import struct
from typing import Callable, Optional

# (st_nlink, st_size) out of struct stat, per architecture.
STAT_LAYOUT = {"x86_64": struct.Struct("<16xQ24xq"), "aarch64": struct.Struct("<20xI24xq")}


def _libc(name: str) -> Optional[Callable[..., int]]:
    """libc's *name* called through ctypes.PyDLL (the GIL held), or None where there is none.

    No argtypes: the arguments here are C ints and a buffer, which ctypes
    passes as such by default, and the per-call conversion argtypes asks
    for costs a third of the call.
    """
    try:
        func = getattr(ctypes.PyDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    func.restype = ctypes.c_int
    return func


_FLOCK = _libc("flock")
_FSTAT = _libc("fstat")


def _errno_error() -> OSError:
    err = ctypes.get_errno()
    return OSError(err, os.strerror(err))


def flock_nb(fd: int, how: int) -> bool:
    """flock(fd, how | LOCK_NB) (how: LOCK_EX, LOCK_SH or LOCK_UN): whether it was done now."""
    if _FLOCK is None:
        try:
            fcntl.flock(fd, how | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
    if _FLOCK(fd, how | fcntl.LOCK_NB) == 0:
        return True
    if ctypes.get_errno() == errno.EWOULDBLOCK:
        return False
    raise _errno_error()


def os_examine(fd: int) -> tuple[int, int]:
    """(size, link count) of an open file, by os.fstat."""
    st = os.fstat(fd)
    return st.st_size, st.st_nlink


class Examiner:
    """(size, link count) of an open file: libc's fstat with the GIL held where checked, else os.fstat."""

    def __init__(self, fd: int) -> None:
        self._buf = ctypes.create_string_buffer(512)
        layout = STAT_LAYOUT.get(platform.machine())
        self._layout = layout if _FSTAT is not None and layout is not None else None
        if self._layout is not None:
            try:
                fast: Optional[tuple[int, int]] = self._fast(fd)
            except OSError:
                fast = None
            if fast != os_examine(fd):
                self._layout = None

    def _fast(self, fd: int) -> tuple[int, int]:
        assert _FSTAT is not None and self._layout is not None
        if _FSTAT(fd, self._buf) != 0:
            raise _errno_error()
        links, size = self._layout.unpack_from(self._buf)
        return size, links

    def __call__(self, fd: int) -> tuple[int, int]:
        return self._fast(fd) if self._layout is not None else os_examine(fd)


_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def pid() -> int:
    """This process's PID (os.getpid(), remembered; a forked child's own)."""
    return _pid
