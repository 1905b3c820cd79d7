"""NAME
    relaymilter.store.bdbbase - what every reader and writer of a Berkeley DB map shares

DESCRIPTION
    The Berkeley DB module (berkeleydb, or bsddb3 as Debian 12 packages the
    same code), the waits, the one wording of a store error, flock with a
    bounded wait, and the two key styles: makemap writes keys without a
    trailing NUL, postmap (and makemap -N) with one, and sendmail and
    Postfix look up in the style of their first hit, so every lookup here
    tries both.

    Used by the writer and whole-map reader (store.bdb), the milter's
    long-lived reader (store.mapreader), spammers.db and the local
    recipients maps.

    flock has no queue: a waiter with a deadline polls, often enough (every
    2 ms at most for a lookup's short budget) that a stream of writers
    cannot keep it out for its whole budget.

DIAGNOSTICS
    StoreUnavailable "PATH: lock not obtained in N ms" when flock_wait runs
    out of time; unavailable() words every other store error as
    "PATH: cannot WHAT: cause".
"""

from __future__ import annotations

import fcntl
import os
import time
from typing import Optional

try:
    from berkeleydb import db
except ModuleNotFoundError:  # Debian 12 packages the same module as bsddb3 (python3-bsddb3)
    from bsddb3 import db  # type: ignore[no-redef,import-not-found,unused-ignore]

from relaymilter.errors import StoreUnavailable

LOCK_WAIT = 30.0            # seconds a writer waits for a flock
READ_WAIT = 2.0             # seconds a lookup waits, well inside the MTA's milter timeout (10 s)
RACY_NS = 100_000_000       # file mtimes closer than this to "now" are not trusted
CREATE_MODE = 0o644


def unavailable(path: str, what: str, exc: BaseException) -> StoreUnavailable:
    """The store error for *exc* met while trying to *what* the map at *path*."""
    detail = exc.args[-1] if isinstance(exc, db.DBError) and exc.args else exc
    if isinstance(exc, OSError) and exc.strerror:
        detail = exc.strerror
    return StoreUnavailable("%s: cannot %s: %s" % (path, what, detail))


def flock_wait(fd: int, how: int, path: str, wait: float = LOCK_WAIT, budget: Optional[float] = None) -> None:
    """flock(fd, how) with a bounded wait; StoreUnavailable after *wait* seconds.

    The message names *budget* (the whole allowance, of which *wait* may be
    what is left) in milliseconds.
    """
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
                raise StoreUnavailable("%s: lock not obtained in %d ms"
                                       % (path, round((wait if budget is None else budget) * 1000))) from None
            time.sleep(pause)
            # flock has no queue: a lookup with a deadline polls often, or a
            # stream of writers could keep it out for its whole budget.
            pause = min(pause * 2, 0.02 if budget is None else 0.002)


def by_fd(fd: int, path: str) -> str:
    """A name that opens the very file *fd* is open on (so Berkeley DB cannot be handed another)."""
    proc = "/proc/self/fd/%d" % fd
    return proc if os.path.exists(proc) else path


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
