"""NAME
    relaymilter.popwatch.cursor - the journal source's place in the journal, kept in a file

DESCRIPTION
    A journalctl cursor names one journal entry (``s=...;i=...;b=...;m=...;
    t=...;x=...``; t is its time in microseconds, hexadecimal). The journal
    source saves the cursor of the last entry it has fully handled in
    popwatch.journal_cursor and continues after it at the next start.

    The file is replaced as a whole: the cursor goes to a new file beside it
    (O_EXCL, O_NOFOLLOW), is synced, and is renamed over the old one, so a
    crash leaves the old cursor or the new one, and a symlink planted at the
    path is replaced, never written through.

DIAGNOSTICS
    read_cursor() logs an unreadable file or one that holds no cursor and
    answers None (the watcher then starts without it); write_cursor()
    raises OSError for the caller to log.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Optional

log = logging.getLogger("relaymilter.popwatch")

CURSOR_RE = re.compile(r"^s=[0-9a-f]+;i=[0-9a-f]+;b=[0-9a-f]+;m=[0-9a-f]+;t=([0-9a-f]+);x=[0-9a-f]+$")


def read_cursor(path: str) -> Optional[str]:
    """The saved cursor, or None (missing, or not a cursor: said in the log)."""
    try:
        with open(path, "rb") as fh:
            text = fh.read(4096).decode("ascii", "replace").strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.error("cannot read the journal cursor %s: %s (starting without it)", path, exc.strerror or exc)
        return None
    if not CURSOR_RE.match(text):
        log.error("%s does not hold a journal cursor (starting without it)", path)
        return None
    return text


def cursor_time(cursor: str) -> float:
    """The time (epoch seconds) of the entry a cursor names (its t= field)."""
    m = CURSOR_RE.match(cursor)
    return int(m.group(1), 16) / 1e6 if m else 0.0


def write_cursor(path: str, cursor: str) -> None:
    """Replace *path* by a file holding *cursor* (a new file renamed over it; a link there is replaced, never followed)."""
    tmp = "%s.%d.tmp" % (path, os.getpid())
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, cursor.encode("ascii") + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
