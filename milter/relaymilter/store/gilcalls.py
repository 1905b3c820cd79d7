"""NAME
    relaymilter.store.gilcalls - flock and fstat that keep the GIL, for the counters' hot path

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
from typing import Any, Callable, Optional

STAT_LAYOUT = {"x86_64": (struct.Struct("<Q"), 16, 48), "aarch64": (struct.Struct("<I"), 20, 48)}
_I64 = struct.Struct("<q")


def _libc(name: str, argtypes: tuple[Any, ...]) -> Optional[Callable[..., int]]:
    """libc's *name* called through ctypes.PyDLL (the GIL held), or None where there is none."""
    try:
        func = getattr(ctypes.PyDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    func.argtypes, func.restype = argtypes, ctypes.c_int
    return func


_FLOCK = _libc("flock", (ctypes.c_int, ctypes.c_int))
_FSTAT = _libc("fstat", (ctypes.c_int, ctypes.c_void_p))


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
        links, at_links, at_size = self._layout
        return _I64.unpack_from(self._buf, at_size)[0], links.unpack_from(self._buf, at_links)[0]

    def __call__(self, fd: int) -> tuple[int, int]:
        return self._fast(fd) if self._layout is not None else os_examine(fd)
