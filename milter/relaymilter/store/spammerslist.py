"""NAME
    relaymilter.store.spammerslist - parse the ~/etc/spammers text list

DESCRIPTION
    One entry per line, `user@host` or `host`. A `#` at the start of a line,
    or after whitespace, starts a comment (a `#` inside a word is part of it:
    it is a legal local-part character). Blank lines and surrounding
    whitespace are ignored, duplicates collapse into one entry. Every entry
    goes through relaymilter.address.keys.normalize_entry, the normaliser the
    sender check uses to build its lookup keys, so the file and the lookups
    cannot disagree (case, quoting, trailing dots).

DIAGNOSTICS
    SpammersSyntaxError (a ConfigError) "SOURCE:LINE: reason" for a bad line:
    NUL bytes, invalid UTF-8, control characters, more than one word, or what
    normalize_entry refuses. SpammersSourceError for a source that cannot be
    read.
"""

from __future__ import annotations

import re
from typing import Optional

from relaymilter.errors import ConfigError
from relaymilter.ipaddr import shorten
from relaymilter.address.keys import normalize_entry

# C0 controls other than the whitespace ones str.isspace() already treats as separators.
CONTROL_RE = re.compile(r"[\x01-\x08\x0e-\x1f\x7f]")
COMMENT_RE = re.compile(r"(?:^|\s)#")


class SpammersSyntaxError(ConfigError):
    """A bad line in the spammers source; str() is "SOURCE:LINE: reason"."""

    def __init__(self, source: str, lineno: int, reason: str) -> None:
        super().__init__("%s:%d: %s" % (source, lineno, reason))
        self.source = source
        self.lineno = lineno
        self.reason = reason


class SpammersSourceError(ConfigError):
    """The spammers source file cannot be read at all."""


def split_words(text: str) -> list[str]:
    """The whitespace-separated words of *text*, comment removed, quoted strings kept whole."""
    if '"' not in text:                 # the common case, without the character loop
        found = COMMENT_RE.search(text)
        return (text[:found.start()] if found else text).split()
    words: list[str] = []
    cur = ""
    quoted = escaped = False
    for ch in text:
        if quoted:
            escaped, quoted = (False, True) if escaped else (ch == "\\", ch != '"')
        elif ch.isspace():
            words, cur = (words + [cur] if cur else words), ""
            continue
        elif ch == "#" and not cur:
            break
        else:
            quoted = ch == '"'
        cur += ch
    return words + [cur] if cur else words


def parse_line(raw: bytes) -> Optional[str]:
    """The normalised entry of one source line, None for a blank or comment line.

    Raises ValueError with a short reason for an invalid line.
    """
    if b"\0" in raw:
        raise ValueError("binary data (NUL byte)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not valid UTF-8") from None
    bad = CONTROL_RE.search(text)
    if bad:
        raise ValueError("control character 0x%02x" % ord(bad.group()))
    words = split_words(text)
    if not words:
        return None
    if len(words) > 1:
        raise ValueError("more than one word: %r (one entry per line, no spaces)" % shorten(" ".join(words)))
    return normalize_entry(words[0])


def parse_source(data: bytes, source: str) -> list[str]:
    """The distinct entries of a whole source text, in first-seen order."""
    if data.startswith(b"\xef\xbb\xbf"):       # a UTF-8 BOM some editors write
        data = data[3:]
    keys: dict[str, None] = {}
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        try:
            key = parse_line(raw)
        except ValueError as exc:
            raise SpammersSyntaxError(source, lineno, str(exc)) from None
        if key is not None:
            keys.setdefault(key, None)
    return list(keys)


def read_source(source_path: str) -> list[str]:
    """Read and parse the source file; SpammersSourceError / SpammersSyntaxError."""
    try:
        with open(source_path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise SpammersSourceError("%s: cannot read: %s" % (source_path, exc.strerror or exc)) from None
    return parse_source(data, source_path)
