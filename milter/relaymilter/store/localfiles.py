"""NAME
    relaymilter.store.localfiles - aliases(5) files and user lists, read for the names they make known

DESCRIPTION
    The text sources of local_recipients. Both are read whole into frozen
    sets, so that a lookup is a set membership test however long the file.

    aliases(5), as sendmail's newaliases and Postfix's postalias read it:
    ``name: value, value, ...``. A line that starts with a blank or a tab
    continues the entry above it; empty lines and lines whose first
    non-blank character is ``#`` are ignored (also between continuation
    lines). The name ends at the first colon outside double quotes; a
    quoted name (``"john doe": jdoe``) is dequoted; names compare
    case-insensitively (ASCII, as sendmail and Postfix fold them). Only the
    names matter to relaymilter, but every entry must have a value, and a
    ``:include:/path`` value names a file that must be readable: a list
    whose members cannot be read bounces at delivery, so it counts as the
    aliases source being unreadable. Included files (addresses separated
    by commas and newlines, # comments) are followed recursively; each is
    read once, so an include loop ends where it returns to a file already
    read, as sendmail suppresses a duplicate expansion.

    A user list: one entry per line, ``#`` starts a comment. ``user``
    (known at every local domain), ``user@domain`` (known at that domain
    only) or ``@domain`` (every user at that domain).

DIAGNOSTICS
    SourceError (a ConfigError) ``FILE:LINE: reason``: a line that is not
    UTF-8 or holds a NUL or control character, an entry without a colon, a
    name, or a value, a continuation line with nothing to continue, an
    unterminated quote, a non-local (``@``) alias name, a relative or
    unreadable ``:include:`` file, one nested more than MAX_INCLUDE_DEPTH
    (10, sendmail's MaxAliasRecursion) deep or past MAX_SOURCE_FILES (1000
    files read for one aliases file); a list line with more than one word or
    a bad domain. ``FILE: cannot read: reason`` for a file that cannot be
    read at all, ``FILE: too large`` for a source whose files hold more
    than MAX_SOURCE_BYTES (64 MiB) together. *files* on the exception names every file read or tried,
    so a reader can tell when retrying is worthwhile.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from typing import Iterable, Optional

from relaymilter.errors import ConfigError
from relaymilter.address.resolve import BadAddress, normalize_domain
from relaymilter.address.tokens import ascii_lower, dequote

CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
INCLUDE = ":include:"
# sendmail's MaxAliasRecursion default: a list nested deeper bounces there, and a chain of files
# any user can write must not exhaust the reader's stack.
MAX_INCLUDE_DEPTH = 10
# What one source (a list, or an aliases file with every file it includes) may hold: a sparse
# terabyte file in a user's home, :include:d, must not be read into every milter worker's memory.
MAX_SOURCE_BYTES = 64 << 20
# Every lookup stats every file a source was read from (to see a change at once): a user who
# :include:s a million empty files must not make each RCPT a million stats.
MAX_SOURCE_FILES = 1000


# Tables are dicts of key -> None, not frozensets: a dict holding only strings is not tracked by
# the garbage collector, whereas each full collection walks every member of a set (about 10 ms
# per 100,000 keys, paid by whichever milter callback triggers it).
Keys = dict[str, None]


def keys_of(words: Iterable[str]) -> Keys:
    return dict.fromkeys(words)


class SourceError(ConfigError):
    """A local-recipients source that cannot be read or parsed; the message names FILE[:LINE]."""

    def __init__(self, message: str, files: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.files = files


@dataclass(frozen=True)
class AliasNames:
    """The alias names of one aliases file (lowercased, dequoted) and every file read for them."""

    names: Keys
    files: tuple[str, ...]

    def knows(self, locals_: tuple[str, ...], domain: Optional[str]) -> bool:
        names = self.names
        return any(local in names for local in locals_)


@dataclass(frozen=True)
class UserList:
    """A user list: bare users, user@domain addresses and @domain catch-alls (all lowercase)."""

    users: Keys
    addresses: Keys
    domains: Keys
    files: tuple[str, ...] = field(default=())

    def knows(self, locals_: tuple[str, ...], domain: Optional[str]) -> bool:
        for local in locals_:
            if local in self.users:
                return True
            if domain is not None and "%s@%s" % (local, domain) in self.addresses:
                return True
        return domain is not None and domain in self.domains


def not_regular(mode: int) -> str:
    """Why a file of *mode* cannot be a source ("" for a regular file)."""
    if stat.S_ISREG(mode):
        return ""
    if stat.S_ISDIR(mode):
        return "Is a directory"
    if stat.S_ISFIFO(mode):
        return "Is a FIFO"
    return "Not a regular file"


def _read(path: str, files: list[str], where: str = "", budget: int = MAX_SOURCE_BYTES) -> bytes:
    """The whole file, at most *budget* bytes; never waits on a FIFO (O_NONBLOCK), reads only a regular file."""
    files.append(path)
    head = "%s: %s" % (where, path) if where else path
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise SourceError("%s: cannot read: %s" % (head, exc.strerror or exc), tuple(files)) from None
    try:
        st = os.fstat(fd)
        why = not_regular(st.st_mode)
        if why:
            raise SourceError("%s: cannot read: %s" % (head, why), tuple(files))
        chunks: list[bytes] = []
        got = 0
        while st.st_size <= budget and got <= budget:     # the file may grow while it is read
            chunk = os.read(fd, min(1 << 20, budget + 1 - got))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            got += len(chunk)
        raise SourceError("%s: too large: more than %d bytes in one source and the files it includes"
                          % (head, MAX_SOURCE_BYTES), tuple(files))
    except OSError as exc:
        raise SourceError("%s: cannot read: %s" % (head, exc.strerror or exc), tuple(files)) from None
    finally:
        os.close(fd)


def _lines(data: bytes, path: str, files: list[str]) -> list[tuple[int, str]]:
    """(line number, text) of every line, checked for text a person wrote."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    out = []
    for no, raw in enumerate(data.split(b"\n"), 1):
        raw = raw[:-1] if raw.endswith(b"\r") else raw
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise SourceError("%s:%d: not valid UTF-8" % (path, no), tuple(files)) from None
        bad = CONTROL_RE.search(text)
        if bad:
            what = "binary data (NUL byte)" if bad.group() == "\0" else "control character 0x%02x" % ord(bad.group())
            raise SourceError("%s:%d: %s" % (path, no, what), tuple(files))
        out.append((no, text))
    return out


def _split_outside_quotes(text: str, sep: str) -> Optional[list[str]]:
    """Split at *sep* outside double quotes (backslash escapes kept); None for an open quote."""
    parts, cur, quoted, i = [], [], False, 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            cur.append(text[i:i + 2])
            i += 2
            continue
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    if quoted:
        return None
    parts.append("".join(cur))
    return parts


def _alias_name(raw: str, where: str, files: list[str]) -> str:
    name = raw.strip()
    if not name:
        raise SourceError("%s: missing alias name before the colon" % where, tuple(files))
    if name.startswith('"'):
        if len(name) < 2 or not name.endswith('"'):
            raise SourceError("%s: text after the quoted name %s" % (where, name), tuple(files))
        plain = dequote(name)
        if not plain:
            raise SourceError("%s: empty quoted alias name" % where, tuple(files))
        return ascii_lower(plain)
    if any(ch in name for ch in ' \t"'):
        raise SourceError("%s: bad alias name %r (quote a name with blanks)" % (where, name), tuple(files))
    if "@" in name:
        raise SourceError("%s: %s: cannot alias non-local names" % (where, name), tuple(files))
    return ascii_lower(dequote(name))


class _AliasReader:
    def __init__(self) -> None:
        self.files: list[str] = []
        self.seen: set[str] = set()
        self.bytes = 0

    def include(self, target: str, where: str, depth: int) -> None:
        """Read an :include: file (once) and the files it includes in turn."""
        if not target.startswith("/"):
            raise SourceError("%s: :include: needs an absolute path, got %r" % (where, target), tuple(self.files))
        if depth > MAX_INCLUDE_DEPTH:
            raise SourceError("%s: :include: %s nested more than %d deep" % (where, target, MAX_INCLUDE_DEPTH),
                              tuple(self.files))
        real = os.path.realpath(target)
        if real in self.seen:
            return          # a loop, or the same list twice: already read
        if len(self.files) >= MAX_SOURCE_FILES:
            raise SourceError("%s: :include: %s: more than %d files in one aliases source" % (where, target, MAX_SOURCE_FILES),
                              tuple(self.files))
        self.seen.add(real)
        data = _read(target, self.files, where, MAX_SOURCE_BYTES - self.bytes)
        self.bytes += len(data)
        for no, text in _lines(data, target, self.files):
            line = text.strip()
            if not line or line.startswith("#"):
                continue
            items = _split_outside_quotes(line, ",")
            if items is None:
                raise SourceError("%s:%d: unterminated quote" % (target, no), tuple(self.files))
            for item in items:
                self._value(item.strip(), "%s:%d" % (target, no), depth + 1)

    def _value(self, item: str, where: str, depth: int = 1) -> None:
        if item[:len(INCLUDE)].lower() == INCLUDE:
            self.include(item[len(INCLUDE):].strip(), where, depth)

    def aliases(self, path: str) -> AliasNames:
        self.seen.add(os.path.realpath(path))
        data = _read(path, self.files)
        self.bytes += len(data)
        entries: list[tuple[int, list[str]]] = []
        for no, text in _lines(data, path, self.files):
            stripped = text.strip()
            if not stripped or stripped.startswith("#"):
                continue
            if text[0] in " \t":
                if not entries:
                    raise SourceError("%s:%d: continuation line with no entry to continue" % (path, no),
                                      tuple(self.files))
                entries[-1][1].append(stripped)
            else:
                entries.append((no, [stripped]))
        names = set()
        for no, parts in entries:
            where = "%s:%d" % (path, no)
            logical = " ".join(parts)
            split = _split_outside_quotes(logical, ":")
            if split is None:
                raise SourceError("%s: unterminated quote" % where, tuple(self.files))
            if len(split) < 2:
                raise SourceError("%s: missing colon after the alias name" % where, tuple(self.files))
            name = _alias_name(split[0], where, self.files)
            value = ":".join(split[1:])
            items = _split_outside_quotes(value, ",") or []
            items = [item.strip() for item in items if item.strip()]
            if not items:
                raise SourceError("%s: alias %r has no value" % (where, name), tuple(self.files))
            for item in items:
                self._value(item, where)
            names.add(name)
        return AliasNames(keys_of(sorted(names)), tuple(self.files))


def read_aliases(path: str) -> AliasNames:
    """The names an aliases(5) file defines; SourceError naming FILE:LINE (see the module header)."""
    return _AliasReader().aliases(path)


def parse_list_entry(word: str) -> tuple[str, str]:
    """("user"|"address"|"domain", normalised key) for one list word; ValueError with the reason."""
    local, at, domain = word.rpartition("@")
    if not at:
        return "user", ascii_lower(word)
    try:
        dom = normalize_domain(domain)
    except BadAddress:
        raise ValueError("bad domain %r" % domain) from None
    if not local:
        return "domain", dom
    if "@" in local:
        raise ValueError("more than one @ in %r" % word)
    return "address", "%s@%s" % (ascii_lower(local), dom)


def read_list(path: str) -> UserList:
    """The entries of a user list; SourceError naming FILE:LINE (see the module header)."""
    files: list[str] = []
    data = _read(path, files)
    found: dict[str, set[str]] = {"user": set(), "address": set(), "domain": set()}
    for no, text in _lines(data, path, files):
        words = text.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) > 1:
            raise SourceError("%s:%d: more than one word (one user or user@domain per line)" % (path, no),
                              tuple(files))
        try:
            kind, key = parse_list_entry(words[0])
        except ValueError as exc:
            raise SourceError("%s:%d: %s" % (path, no, exc), tuple(files)) from None
        found[kind].add(key)
    return UserList(keys_of(found["user"]), keys_of(found["address"]), keys_of(found["domain"]), tuple(files))
