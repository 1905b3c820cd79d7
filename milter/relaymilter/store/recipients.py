"""NAME
    relaymilter.store.recipients - the local_recipients sources: who is known at the local domains

DESCRIPTION
    LocalRecipients answers "which source knows this local part at this
    domain?" for the milter, from the sources the configuration lists, in
    this order: passwd, aliases files, user lists, Berkeley DB maps. The
    first source that knows the user answers; the policy core
    (relaymilter.policy.recipients) turns the answer into a decision.

    passwd asks pwd.getpwnam(), so NSS (files, LDAP, sss) is honoured and
    nothing is cached here (nscd or sssd cache if configured).

    aliases files and user lists (relaymilter.store.localfiles) are read
    whole into sets, so a lookup is a set membership test however long the
    file. Each lookup stats the files (for aliases, with every :include:
    file read) and compares device, inode, size, mtime and ctime with what
    was read: a change is seen by the first lookup after it, as relayers.db
    is. A file changed less than bdb.RACY_NS before it was read is read
    again at the next lookup (its time stamp cannot tell a later write
    from this one), and meanwhile an *unknown* answer from it is
    tempfailed rather than refused: the file may have been read half
    written (a list rewritten with ``>``), and a known user must never get
    a 550 for it. Write lists by rename to avoid the window altogether.

    maps are Berkeley DB hash files (makemap hash, postmap hash:) looked up
    key by key, never scanned: keys ``user@domain``, then ``user``, then
    ``@domain``, each with and without a trailing NUL (either makemap or
    postmap style), lowercase. A value starting with ``error:`` (sendmail's
    virtusertable ``error:nouser``) means "not known" for that map. The
    reader holds one read-only DB_THREAD handle per file version, takes
    flock(LOCK_SH) around each lookup as sendmail and Postfix do, and keeps
    the answers per settled file version (bounded), so a repeated question
    costs one stat and one dict lookup.

DIAGNOSTICS
    A source that exists but cannot be read or parsed, or has gone since
    start-up, raises StoreUnavailable for a recipient no other source
    knows: the policy tempfails it (451 4.3.0), never refuses it. Each
    failure is logged once per change of the file, and its recovery once.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import pwd
import threading
import time
from typing import Any, Callable, Optional, Sequence, Union

from relaymilter.errors import StoreUnavailable
from relaymilter.store.bdb import RACY_NS, _fail, db, flock_wait, get_both_styles  # db: berkeleydb or bsddb3
from relaymilter.store.localfiles import AliasNames, SourceError, UserList, not_regular, read_aliases, read_list

log = logging.getLogger("relaymilter.store.recipients")

CACHE_MAX = 65536           # answers kept per map file version
Parsed = Union[AliasNames, UserList]
Sig = tuple


def _sig(path: str) -> Sig:
    try:
        st = os.stat(path)
    except OSError as exc:
        return ("error", exc.errno)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _settled(sigs: tuple[Sig, ...]) -> bool:
    now = time.time_ns()
    return all(len(s) == 5 and now - max(s[3], s[4]) > RACY_NS for s in sigs)


class PasswdSource:
    """System accounts through NSS."""

    kind = "passwd"
    path = "passwd"

    def knows(self, locals_: tuple[str, ...], domain: Optional[str]) -> bool:
        for local in locals_:
            try:
                pwd.getpwnam(local)
                return True
            except (KeyError, ValueError):      # ValueError: a NUL in the name
                continue
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
        try:
            table: Any = self._reader(self.path)
            files = table.files
        except SourceError as exc:
            table, files = str(exc), exc.files or (self.path,)
        sigs = tuple(_sig(f) for f in files)
        self._state = (files, sigs, _settled(sigs), table)
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
    return len(table.users) + len(table.addresses) + len(table.domains)


class MapSource:
    """A Berkeley DB hash map looked up key by key (see the module header)."""

    kind = "map"

    def __init__(self, path: str) -> None:
        self.path = path
        self._mutex = threading.Lock()
        self._fd: Optional[int] = None
        self._ident: Optional[tuple[int, int]] = None
        self._handle: Optional[db.DB] = None
        self._sig: Optional[Sig] = None
        self._cache: tuple[Sig, dict] = ((), {})
        self._failed: Optional[str] = None

    def knows(self, locals_: tuple[str, ...], domain: Optional[str]) -> bool:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise self._failure(_fail(self.path, "stat", exc)) from None
        sig = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        token = (locals_, domain)
        cache = self._cache
        if cache[0] == sig:
            hit = cache[1].get(token)
            if hit is not None:
                return hit
        with self._mutex:
            known, trusted = self._probe(st, sig, _keys(locals_, domain))
            if trusted:
                if self._cache[0] != sig or len(self._cache[1]) >= CACHE_MAX:
                    self._cache = (sig, {})
                self._cache[1][token] = known
            return known

    def _failure(self, exc: StoreUnavailable) -> StoreUnavailable:
        if self._failed != str(exc):
            log.error("local recipients map %s: its users get 451 until it is fixed", exc)
            self._failed = str(exc)
        return exc

    def _probe(self, st: os.stat_result, sig: Sig, keys: list[bytes]) -> tuple[bool, bool]:
        """(known, answer may be cached) under LOCK_SH on the file the path names now."""
        if self._fd is None or self._ident != (st.st_dev, st.st_ino):
            self._close()
            try:
                # O_NONBLOCK: a FIFO put in the map's place must not hang a milter thread.
                fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                raise self._failure(_fail(self.path, "open", exc)) from None
            opened = os.fstat(fd)
            why = not_regular(opened.st_mode)
            if why:
                os.close(fd)
                raise self._failure(StoreUnavailable("%s: cannot open: %s" % (self.path, why)))
            self._fd = fd
            self._ident = (opened.st_dev, opened.st_ino)
        try:
            flock_wait(self._fd, fcntl.LOCK_SH, self.path)
        except StoreUnavailable as exc:
            raise self._failure(exc) from None
        try:
            held = os.fstat(self._fd)
            now_sig = (held.st_dev, held.st_ino, held.st_size, held.st_mtime_ns, held.st_ctime_ns)
            if self._handle is None or now_sig != self._sig:
                if self._handle is not None:
                    self._handle.close()
                    self._handle = None
                handle = db.DB()
                try:
                    handle.open(self.path, dbtype=db.DB_HASH, flags=db.DB_RDONLY | db.DB_THREAD)
                except db.DBError as exc:
                    with contextlib.suppress(db.DBError):
                        handle.close()
                    self._sig = None
                    raise self._failure(_fail(self.path, "read as a hash database", exc)) from None
                self._handle, self._sig = handle, now_sig
            try:
                known = _known(self._handle, keys)
            except db.DBError as exc:
                self._handle.close()
                self._handle = None
                raise self._failure(_fail(self.path, "read", exc)) from None
            if self._failed is not None:
                log.info("local recipients map %s is readable again", self.path)
                self._failed = None
            trusted = now_sig == sig and time.time_ns() - max(held.st_mtime_ns, held.st_ctime_ns) > RACY_NS
            return known, trusted
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _close(self) -> None:
        if self._handle is not None:
            with contextlib.suppress(db.DBError):
                self._handle.close()
            self._handle = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._ident = None
        self._sig = None

    def close(self) -> None:
        with self._mutex:
            self._close()
            self._cache = ((), {})

    def unsettled(self) -> bool:
        return False


def _keys(locals_: tuple[str, ...], domain: Optional[str]) -> list[bytes]:
    """Map keys in lookup order: user@domain for each local part, then each bare local part, then @domain."""
    keys = []
    if domain is not None:
        keys += [("%s@%s" % (local, domain)).encode("utf-8", "surrogateescape") for local in locals_]
    keys += [local.encode("utf-8", "surrogateescape") for local in locals_]
    if domain is not None:
        keys.append(("@" + domain).encode("utf-8", "surrogateescape"))
    return keys


def _known(handle: db.DB, keys: list[bytes]) -> bool:
    for key in keys:
        value = get_both_styles(handle, key)
        if value is not None:
            return not value.lower().startswith(b"error:")
    return False


Source = Union[PasswdSource, TextSource, MapSource]


class LocalRecipients:
    """Every configured source, asked in order; see the module header."""

    def __init__(self, passwd: bool = False, aliases: Sequence[str] = (), lists: Sequence[str] = (),
                 maps: Sequence[str] = ()) -> None:
        sources: list[Source] = []
        if passwd:
            sources.append(PasswdSource())
        sources += [TextSource("aliases", os.path.expanduser(p), read_aliases) for p in aliases]
        sources += [TextSource("list", os.path.expanduser(p), read_list) for p in lists]
        sources += [MapSource(os.path.expanduser(p)) for p in maps]
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

    def close(self) -> None:
        for source in self.sources:
            if isinstance(source, MapSource):
                source.close()
