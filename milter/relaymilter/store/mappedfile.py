"""NAME
    relaymilter.store.mappedfile - a fixed-size file every process maps, updated under flock

DESCRIPTION
    MappedFile is the plumbing of a table that several processes share by
    mapping one file (mmap, MAP_SHARED): relaymilter.store.counters is one.
    The file is made on first use at its full size (allocated, not sparse)
    with its header, under flock(LOCK_EX); a file of another size or header
    is refused. _locked() gives the mapping with the lock held: LOCK_EX for
    a read-modify-write, LOCK_SH for a reader.

    flock belongs to the open file, not the process, so each process opens
    the file itself (a forked child reopens it) and the threads of one
    process also take a mutex (the subclass's operations hold it). A file
    cut short or removed while mapped is mapped afresh: the size and link
    count are checked under the lock at every use, since a mapping of a
    shortened file would SIGBUS. The non-blocking locks and that check keep
    the GIL (store.gilcalls); a lock held elsewhere is asked for again a few
    times at once, then every half millisecond until lock_wait.

DIAGNOSTICS
    StoreUnavailable naming the path when the file cannot be opened, made,
    mapped or examined, is of another size or header (the *foreign* text),
    or the lock is not obtained within lock_wait (a stuck process).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import threading
import time
from typing import Callable, Optional

from relaymilter.errors import StoreUnavailable
from relaymilter.store.gilcalls import Examiner, flock_nb, os_examine, pid

LOCK_WAIT = 0.25            # seconds: a decision never waits longer than this for the file
SPINS = 40                  # immediate tries of a lock held elsewhere (about 30 microseconds) before sleeping


class MappedFile:
    """The file at *path*, *size* bytes starting with *header* (made on first use unless create is false)."""

    def __init__(self, path: str, size: int, header: bytes, foreign: str, create: bool = True,
                 lock_wait: float = LOCK_WAIT) -> None:
        self.path = path
        self.size = size
        self.header = header
        self.foreign = foreign              # what a file of another size or header is said to be
        self.create = create
        self.lock_wait = lock_wait
        self._mutex = threading.Lock()
        self._pid = 0
        self._fd: Optional[int] = None
        self._map: Optional[mmap.mmap] = None
        self._examine: Callable[[int], tuple[int, int]] = os_examine     # Examiner once a file is open

    def close(self) -> None:
        with self._mutex:
            self._drop()

    def _drop(self) -> None:
        if self._map is not None and self._pid == pid():
            self._map.close()
        if self._fd is not None and self._pid == pid():
            os.close(self._fd)
        self._map, self._fd, self._pid = None, None, 0

    def _fail(self, what: str, exc: Optional[BaseException] = None) -> StoreUnavailable:
        detail = ": %s" % (exc.strerror or exc) if isinstance(exc, OSError) else ""
        return StoreUnavailable("%s: %s%s" % (self.path, what, detail))

    def _lock(self, fd: int, how: int) -> None:
        # A lock held by another process is as a rule in the middle of an update of a few
        # microseconds on another CPU: asked for again at once a few times before sleeping (a
        # sleep costs this thread half a millisecond and two thread switches).
        for _ in range(SPINS):
            if flock_nb(fd, how):
                return
        deadline = time.monotonic() + self.lock_wait
        while True:
            time.sleep(0.0005)
            if flock_nb(fd, how):
                return
            if time.monotonic() >= deadline:
                raise self._fail("lock not obtained within %gs" % self.lock_wait)

    @staticmethod
    def _unlock(fd: int) -> None:
        flock_nb(fd, fcntl.LOCK_UN)

    def _attach(self) -> Optional[mmap.mmap]:
        """This process's mapping (opened, and created when missing and allowed); None: no file."""
        if self._map is not None and self._pid == pid():
            return self._map
        # A forked child inherits the parent's descriptor, and flock on a shared open file
        # would not exclude the parent: open our own (the inherited map is left alone).
        self._map, self._fd = None, None
        flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | (os.O_CREAT if self.create else 0)
        try:
            fd = os.open(self.path, flags, 0o640)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._fail("cannot open", exc) from None
        try:
            st = os.fstat(fd)
            if st.st_size == 0:
                self._lock(fd, fcntl.LOCK_EX)
                try:
                    if os.fstat(fd).st_size == 0:
                        # Blocks allocated now, not at the first write to each page of a sparse
                        # file (a page fault that allocates, in the middle of a decision).
                        os.posix_fallocate(fd, 0, self.size)
                        os.pwrite(fd, self.header, 0)
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
            # Under LOCK_SH: another process may be between its fallocate() and its header.
            self._lock(fd, fcntl.LOCK_SH)
            try:
                head = os.pread(fd, len(self.header), 0)
                size = os.fstat(fd).st_size
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
            if size != self.size or head != self.header:
                raise self._fail(self.foreign)
            self._map = mmap.mmap(fd, self.size)
        except OSError as exc:
            os.close(fd)
            raise self._fail("cannot map", exc) from None
        except StoreUnavailable:
            os.close(fd)
            raise
        self._fd, self._pid = fd, pid()
        self._examine = Examiner(fd)
        return self._map

    def _locked(self, how: int) -> Optional[mmap.mmap]:
        """This process's mapping, locked *how*, of the file at the path now (None: no file).

        A file cut short (``: > relayers-counters``) would make the mapping
        SIGBUS; one removed would be counted in by this process alone.
        """
        for _ in range(2):
            mm = self._map
            if mm is None or self._pid != pid():
                mm = self._attach()
                if mm is None:
                    return None
            fd = self._fd
            assert fd is not None
            self._lock(fd, how)
            try:
                size, links = self._examine(fd)
            except OSError as exc:
                flock_nb(fd, fcntl.LOCK_UN)
                raise self._fail("cannot examine", exc) from None
            if size == self.size and links > 0:
                return mm
            flock_nb(fd, fcntl.LOCK_UN)
            self._drop()
        raise self._fail("cut short or replaced while in use, again")
