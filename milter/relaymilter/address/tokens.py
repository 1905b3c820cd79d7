"""NAME
    relaymilter.address.tokens - split an envelope address into tokens

DESCRIPTION
    The lexical half of address resolution, after sendmail's prescan: a
    word is a maximal run of ordinary characters, quoted strings and
    backslash escapes (so a quoted ``@`` never counts as one); the
    delimiters ``@ % ! , : ; < >`` are tokens of their own; ``[...]`` is
    one literal token; blanks and ``(comments)`` separate tokens and are
    dropped, but never silently between two words.

DIAGNOSTICS
    BadAddress (a ValueError) with a short reason: NUL, control characters,
    invalid UTF-8 (lone surrogates), input over MAX_ADDRESS_BYTES,
    unbalanced quotes, parentheses or brackets.

Stdlib only: shared by the policy core and the stores (relaymilter.address).
"""

from __future__ import annotations

from dataclasses import dataclass

# RFC 5321 allows a 256-octet path and sendmail refuses longer ones itself
# (MAXNAME); twice that leaves headroom so nothing a real MTA passes on is
# refused for its length here.
MAX_ADDRESS_BYTES = 512

DELIMITERS = frozenset("@%!,:;<>()[]")
BLANKS = frozenset(" \t")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


class BadAddress(ValueError):
    """An address that cannot be parsed; the message is a short reason."""


@dataclass(frozen=True)
class Token:
    kind: str  # "word", "literal", or the delimiter character itself
    text: str  # as written: quotes and backslashes kept
    quoted: bool = False  # a word holding a quoted string or a backslash escape


GAP = Token(" ", " ")


def ascii_lower(text: str) -> str:
    """Lowercase ASCII letters only.

    Full Unicode folding could map a foreign name onto a local one (the
    Kelvin sign lowercases to ``k``); sendmail and makemap fold ASCII only.
    """
    return text.translate(_ASCII_LOWER)


def clean_text(text: object) -> str:
    """Strip surrounding blanks and line ends from *text* and check the rest is sane; BadAddress if not."""
    if not isinstance(text, str):
        raise BadAddress("address is not text")
    text = text.strip(" \t\r\n")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise BadAddress("invalid character encoding") from None
    if size > MAX_ADDRESS_BYTES:
        raise BadAddress("address too long (%d bytes)" % size)
    for ch in text:
        code = ord(ch)
        if code == 0:
            raise BadAddress("NUL in address")
        if (code < 32 and ch != "\t") or 127 <= code < 160:
            raise BadAddress("control character in address")
    return text


def _skip_comment(text: str, i: int) -> int:
    depth = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise BadAddress("unbalanced parenthesis")


def tokenize(text: str) -> list[Token]:
    tokens: list[Token] = []
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch in BLANKS:
            i += 1
            tokens.append(GAP)
        elif ch == "(":
            i = _skip_comment(text, i)
            tokens.append(GAP)
        elif ch == ")":
            raise BadAddress("unbalanced parenthesis")
        elif ch == "[":
            end = text.find("]", i + 1)
            if end < 0 or "[" in text[i + 1:end]:
                raise BadAddress("unterminated address literal")
            tokens.append(Token("literal", text[i:end + 1]))
            i = end + 1
        elif ch == "]":
            raise BadAddress("unbalanced bracket")
        elif ch in DELIMITERS:
            tokens.append(Token(ch, ch))
            i += 1
        else:
            i = _read_word(text, i, tokens)
    return tokens


def drop_gaps(tokens: list[Token]) -> list[Token]:
    """Remove blanks and comments; refuse them between two words.

    sendmail would glue the words together (with its BlankSub); an address
    like that is either a typo or a trick, and never needed.
    """
    kept: list[Token] = []
    gap = False
    for tok in tokens:
        if tok is GAP:
            gap = True
            continue
        if gap and tok.kind == "word" and kept and kept[-1].kind == "word":
            raise BadAddress("unquoted blank inside address")
        gap = False
        kept.append(tok)
    return kept


def _read_word(text: str, i: int, tokens: list[Token]) -> int:
    start = i
    quoted = False
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == '"':
            quoted = True
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            if i >= n:
                raise BadAddress("unterminated quoted string")
            i += 1
        elif ch == "\\":
            if i + 1 >= n:
                raise BadAddress("backslash at end of address")
            quoted = True
            i += 2
        elif ch in DELIMITERS or ch in BLANKS:
            break
        else:
            i += 1
    tokens.append(Token("word", text[start:i], quoted))
    return i


def dequote(word: str) -> str:
    """Remove double quotes and backslash escapes from one word."""
    out = []
    i = 0
    while i < len(word):
        ch = word[i]
        if ch == "\\" and i + 1 < len(word):
            out.append(word[i + 1])
            i += 2
            continue
        if ch != '"':
            out.append(ch)
        i += 1
    return "".join(out)


def join_tokens(tokens: list[Token]) -> str:
    return "".join(t.text for t in tokens)
