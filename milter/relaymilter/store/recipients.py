"""NAME
    relaymilter.store.recipients - the local_recipients sources: who is known at the local domains

DESCRIPTION
    LocalRecipients answers "which source knows this local part at this
    domain?" for the milter, from the sources the configuration lists, in
    this order: passwd, aliases files, user lists, Berkeley DB maps. The
    first source that knows the user answers; the policy core
    (relaymilter.policy.recipients) turns the answer into a decision.

    passwd asks getpwnam_r(3), so NSS (files, LDAP, sss) is honoured and
    nothing is cached here (nscd or sssd cache if configured). An NSS that
    cannot answer (passwd unreadable, LDAP or sssd down) is a lookup
    failure, told apart from "no such account" by getpwnam_r's return.

    aliases files and user lists (relaymilter.store.localfiles) are read
    whole into tables (dicts), so a lookup is a membership test however long the
    file. Each lookup stats the files (for aliases, with every :include:
    file read) and compares device, inode, size, mtime and ctime with what
    was read: a change is seen by the first lookup after it, as relayers.db
    is. A file changed less than bdbbase.RACY_NS before it was read is read
    again at the next lookup (its time stamp cannot tell a later write
    from this one), and meanwhile an *unknown* answer from it is
    tempfailed rather than refused: the file may have been read half
    written (a list rewritten with ``>``), and a known user must never get
    a 550 for it; the same for a file that changed while it was read.
    Write lists by rename to avoid the window altogether.

    maps are Berkeley DB hash files (makemap hash, postmap hash:, either
    NUL style) read the same way: every key, under flock(LOCK_SH) as
    sendmail and Postfix read them (store.bdb.read_items), into two sets,
    re-read when the file changes (makemap holds LOCK_EX while it rewrites
    in place, so a read never sees half a map). A lookup tries
    ``user@domain``, then ``user``, then ``@domain``, lowercase; a key whose
    value starts with ``error:`` (sendmail's virtusertable
    ``error:nouser``) means "not known" for that map. Why not ask the file
    key by key: each such lookup costs a flock, an fstat and a Berkeley DB
    read per key (tens of microseconds on a busy machine, measured with
    benchmarks/local_recipients.py), a set lookup well under one; the
    price is memory (about 12 MB per 100,000 keys) and a full read (about
    0.25 s per 100,000 keys; benchmarks/local_recipients.py prints both) at
    each change, by the thread that notices it, as for spammers.db.

DIAGNOSTICS
    A source that exists but cannot be read or parsed, or has gone since
    start-up, raises StoreUnavailable for a recipient no other source
    knows: the policy tempfails it (451 4.3.0), never refuses it. Each
    failure is logged once per change of the file, and its recovery once.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

from relaymilter.errors import StoreUnavailable
from relaymilter.address.tokens import ascii_lower
from relaymilter.store.bdb import read_items
from relaymilter.store.bdbbase import RACY_NS
from relaymilter.store.localfiles import AliasNames, Keys, SourceError, UserList, keys_of, read_aliases, read_list

log = logging.getLogger("relaymilter.store.recipients")

Parsed = Union[AliasNames, UserList, "MapTable"]
Sig = tuple
# (local parts, domain) -> the kind of the source that knows them, or None: policy.recipients.Lookup's shape
# (the store does not import the policy core).
Lookup = Callable[[tuple[str, ...], Optional[str]], Optional[str]]


def _sig(path: str) -> Sig:
    try:
        st = os.stat(path)
    except OSError as exc:
        return ("error", exc.errno)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _settled(sigs: tuple[Sig, ...]) -> bool:
    now = time.time_ns()
    return all(len(s) == 5 and now - max(s[3], s[4]) > RACY_NS for s in sigs)


def _getpwnam_r() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.getpwnam_r
    fn.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t,
                   ctypes.POINTER(ctypes.c_void_p)]
    fn.restype = ctypes.c_int
    return fn


class PasswdSource:
    """System accounts through NSS, asked with getpwnam_r(3) itself.

    pwd.getpwnam() raises the same KeyError for "no such account" and for
    "NSS could not answer" (an unreadable passwd file, LDAP or sssd down):
    getpwnam_r returns 0 with no entry for the first, an errno for the
    second, which is a lookup failure (451), never a 550 for a known user.
    """

    kind = "passwd"
    path = "passwd"

    def __init__(self) -> None:
        self._getpwnam_r = _getpwnam_r()
        self._failed = False

    def _account(self, name: str) -> bool:
        raw = name.encode("utf-8", "surrogateescape")
        if b"\0" in raw:
            return False
        size = 4096
        while True:
            entry = ctypes.create_string_buffer(256)    # struct passwd: 48 bytes on LP64
            buf = ctypes.create_string_buffer(size)
            found = ctypes.c_void_p()
            rc = self._getpwnam_r(raw, entry, buf, size, ctypes.byref(found))
            if rc == errno.ERANGE and size < (1 << 20):
                size *= 4
                continue
            if rc:
                raise OSError(rc, os.strerror(rc))
            return bool(found.value)

    def knows(self, locals_: tuple[str, ...], domain: Optional[str]) -> bool:
        try:
            for local in locals_:
                if self._account(local):
                    if self._failed:
                        self._failed = False
                        log.info("local recipients passwd: NSS answers again")
                    return True
        except OSError as exc:
            why = "NSS lookup failed: %s" % (exc.strerror or exc)
            if not self._failed:
                self._failed = True
                log.error("local recipients passwd: %s; users no other source knows get 451 until it answers", why)
            raise StoreUnavailable("passwd: %s" % why) from None
        if self._failed:
            self._failed = False
            log.info("local recipients passwd: NSS answers again")
        return False

    def unsettled(self) -> bool:
        return False


class TextSource:
    """An aliases file or a user list, read whole and re-read when a file it came from changes."""

    def __init__(self, kind: str, path: str, reader: Callable[[str], Parsed]) -> None:
        self.kind = kind
        self.path = path
        self._reader = reader
        self._mutex = threading.Lock()
        # (the files read, their signatures, settled, the parsed table or the failure text)
        self._state: Optional[tuple[tuple[str, ...], tuple[Sig, ...], bool, Any]] = None
        self._failed = False

    def _current(self) -> Optional[Any]:
        state = self._state
        if state is None or not state[2]:
            return None
        files, sigs = state[0], state[1]
        if len(files) == 1:
            if _sig(files[0]) != sigs[0]:
                return None
        elif tuple(_sig(f) for f in files) != sigs:
            return None
        return state[3]

    def table(self) -> Parsed:
        """The parsed file as it is now; StoreUnavailable when it cannot be read or parsed."""
        found = self._current()
        if found is None:
            with self._mutex:
                found = self._current()
                if found is None:
                    found = self._load()
        if isinstance(found, str):
            raise StoreUnavailable(found)
        return found

    def _load(self) -> Any:
        previous = self._state
        # The files as they were before the read: one that changed while it was read (a list
        # rewritten in place, this thread held up between its read and its stat) is read again.
        before = {f: _sig(f) for f in (previous[0] if previous is not None else (self.path,))}
        try:
            table: Any = self._reader(self.path)
            files = table.files
        except SourceError as exc:
            table, files = str(exc), exc.files or (self.path,)
        sigs = tuple(_sig(f) for f in files)
        steady = all(before.get(f, sig) == sig for f, sig in zip(files, sigs))
        self._state = (files, sigs, steady and _settled(sigs), table)
        if isinstance(table, str):
            if previous is None or previous[1] != sigs or not self._failed:
                log.error("local recipients %s %s: %s; its users get 451 until it is fixed", self.kind, self.path, table)
            self._failed = True
        elif self._failed:
            log.info("local recipients %s %s is readable again", self.kind, self.path)
            self._failed = False
        elif previous is None or previous[1] != sigs:
            log.info("local recipients %s %s loaded: %d entries", self.kind, self.path, _size(table))
        return table

    def knows(self, locals_: tuple[str, ...], domain: Optional[str]) -> bool:
        return self.table().knows(locals_, domain)

    def unsettled(self) -> bool:
        state = self._state
        return state is not None and not state[2]


def _size(table: Parsed) -> int:
    if isinstance(table, AliasNames):
        return len(table.names)
    if isinstance(table, MapTable):
        return len(table.known) + len(table.refused)
    return len(table.users) + len(table.addresses) + len(table.domains)


@dataclass(frozen=True)
class MapTable:
    """A map's keys (lowercase, trailing NUL removed): those that know a user and those whose value is error:..."""

    known: Keys
    refused: Keys
    files: tuple[str, ...]

    def knows(self, locals_: tuple[str, ...], domain: Optional[str]) -> bool:
        known, refused = self.known, self.refused
        for key in _keys(locals_, domain):
            if key in known:
                return True
            if key in refused:
                return False
        return False


def read_map(path: str) -> MapTable:
    """Every key of a Berkeley DB hash map, read under flock(LOCK_SH) (store.bdb.read_items)."""
    try:
        os.stat(path)
    except OSError as exc:          # a map gone since start-up is not an empty map
        raise SourceError("%s: cannot read: %s" % (path, exc.strerror or exc), (path,)) from None
    try:
        items = read_items(path)
    except StoreUnavailable as exc:
        raise SourceError(str(exc), (path,)) from None
    known: set[str] = set()
    refused: set[str] = set()
    for key, value in items:
        name = ascii_lower(key.decode("utf-8", "surrogateescape"))
        (refused if value[:6].lower() == b"error:" else known).add(name)
    return MapTable(keys_of(known), keys_of(refused), (path,))


def map_source(path: str) -> TextSource:
    """A map as a source: read whole when it changes, like the text sources."""
    return TextSource("map", path, read_map)


def _keys(locals_: tuple[str, ...], domain: Optional[str]) -> list[str]:
    """Map keys in lookup order: user@domain for each local part, then each bare local part, then @domain."""
    if domain is None:
        return list(locals_)
    return ["%s@%s" % (local, domain) for local in locals_] + list(locals_) + ["@" + domain]


Source = Union[PasswdSource, TextSource]


class LocalRecipients:
    """Every configured source, asked in order; see the module header."""

    def __init__(self, passwd: bool = False, aliases: Sequence[str] = (), lists: Sequence[str] = (),
                 maps: Sequence[str] = ()) -> None:
        sources: list[Source] = []
        if passwd:
            sources.append(PasswdSource())
        sources += [TextSource("aliases", os.path.expanduser(p), read_aliases) for p in aliases]
        sources += [TextSource("list", os.path.expanduser(p), read_list) for p in lists]
        sources += [map_source(os.path.expanduser(p)) for p in maps]
        self.sources: tuple[Source, ...] = tuple(sources)

    def find(self, locals_: tuple[str, ...], domain: Optional[str]) -> Optional[Source]:
        """The first source that knows one of *locals_* at *domain*, or None.

        StoreUnavailable when none knows it and a source could not be asked
        (or a text source changed too recently to trust a miss).
        """
        failure: Optional[StoreUnavailable] = None
        for source in self.sources:
            try:
                if source.knows(locals_, domain):
                    return source
            except StoreUnavailable as exc:
                failure = failure or exc
        if failure is not None:
            raise failure
        for source in self.sources:
            if source.unsettled():
                raise StoreUnavailable("%s %s changed a moment ago; not refusing on it yet" % (source.kind, source.path))
        return None

    def lookup(self, locals_: tuple[str, ...], domain: Optional[str]) -> Optional[str]:
        """find()'s source kind ("passwd", "aliases", "list", "map"), for the policy core."""
        source = self.find(locals_, domain)
        return None if source is None else source.kind

    def snapshot(self) -> "Snapshot":
        """Every source as it is now, checked for changes once: what one transaction decides with."""
        entries: list[tuple[str, Any]] = []
        for source in self.sources:
            if isinstance(source, PasswdSource):
                entries.append((source.kind, source))
                continue
            try:
                entries.append((source.kind, source.table()))
            except StoreUnavailable as exc:
                entries.append((source.kind, exc))
        unsettled = next(("%s %s changed a moment ago; not refusing on it yet" % (s.kind, s.path)
                          for s in self.sources if s.unsettled()), "")
        return Snapshot(tuple(entries), unsettled)

    def transaction_lookup(self) -> Lookup:
        """snapshot().lookup: the milter asks for one per transaction (policy.session)."""
        return self.snapshot().lookup


class Snapshot:
    """The sources' tables as of one moment; lookups do no file I/O (passwd still asks NSS)."""

    __slots__ = ("entries", "unsettled")

    def __init__(self, entries: tuple[tuple[str, Any], ...], unsettled: str) -> None:
        self.entries = entries          # (kind, table | PasswdSource | the StoreUnavailable it raised)
        self.unsettled = unsettled      # why a miss may not be trusted yet, or ""

    def lookup(self, locals_: tuple[str, ...], domain: Optional[str]) -> Optional[str]:
        """The kind of the first source that knows the user, None; StoreUnavailable as LocalRecipients.find."""
        failure: Optional[StoreUnavailable] = None
        for kind, table in self.entries:
            if type(table) is StoreUnavailable:
                failure = failure or table
                continue
            try:
                if table.knows(locals_, domain):
                    return kind
            except StoreUnavailable as exc:     # passwd: NSS could not answer now
                failure = failure or exc
        if failure is not None:
            raise failure
        if self.unsettled:
            raise StoreUnavailable(self.unsettled)
        return None

