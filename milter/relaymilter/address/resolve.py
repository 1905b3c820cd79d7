"""NAME
    relaymilter.address.resolve - resolve an envelope address as sendmail does

DESCRIPTION
    Every relay trick hides a remote destination inside an address that
    looks local: ``user%remote@local``, ``remote!user@local``,
    ``"user@remote"@local``, ``@local:user@remote``.  sendmail defeats them
    in ruleset 3 (canonify) and Parse0: source routes are stripped, an
    unqualified ``user%remote`` or ``remote!user`` gets its host, and when
    the domain is one of ours and the local part still holds ``@ % !`` the
    local domain is dropped and the rest parsed again.  resolve() does the
    same, round after round (bounded), and returns the final destination.

    Differences from sendmail, all on the strict side (an odd address is
    judged a relay attempt or malformed, never local by accident):
    a quoted or backslash-escaped local part at a local domain is dequoted
    and re-parsed whenever it holds a routing character, even when dots
    surround the quoted part; two words separated only by blanks are
    refused (sendmail glues them with its BlankSub); an address literal
    must hold an IP address.  Comments ``(...)`` and blanks around
    delimiters are dropped, as sendmail's tokenizer does.

    Tokenizing (quotes, comments, blanks, literals) lives in tokens.py.
    Domains are folded to lowercase on ASCII letters only: full Unicode
    case folding could map a foreign name onto a local one (the Kelvin
    sign lowercases to ``k``), and sendmail does not compare that way.

DIAGNOSTICS
    BadAddress (a ValueError) with a short reason, for anything sendmail
    would refuse at parse time (``user@remote@local``: "invalid route
    address"), control characters, invalid UTF-8, overlong input, broken
    quoting.  No other exception escapes resolve() for any str input.

Stdlib only: shared by the policy core and the stores (relaymilter.address).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass

from relaymilter.address.tokens import (
    BLANKS,
    DELIMITERS,
    GAP,
    MAX_ADDRESS_BYTES,
    BadAddress,
    Token,
    ascii_lower,
    clean_text,
    dequote,
    drop_gaps,
    join_tokens,
    tokenize,
)

__all__ = [
    "MAX_ADDRESS_BYTES",
    "MAX_ROUNDS",
    "BadAddress",
    "Resolved",
    "ascii_lower",
    "clean_text",
    "dequote",
    "is_null",
    "normalize_domain",
    "parent_domains",
    "resolve",
]

# Each round peels one routing layer; real mail never needs more than two.
MAX_ROUNDS = 10

# Left after the brackets and the source route are gone, these mean list
# syntax or a colon in a host name: sendmail refuses both.
_ILLEGAL = frozenset(",:;<>")


@dataclass(frozen=True)
class Resolved:
    """The final destination of an address.

    local_part keeps its case (and its quotes when it still needs them);
    domain is normalised (see normalize_domain) or None for an unqualified
    local address such as ``postmaster``.
    """

    local_part: str
    domain: str | None

    @property
    def is_literal(self) -> bool:
        return self.domain is not None and self.domain.startswith("[")

    def __str__(self) -> str:
        if self.domain is None:
            return self.local_part
        return "%s@%s" % (self.local_part, self.domain)


def _dequote_local(word: str) -> str:
    plain = dequote(word)
    if not plain:
        raise BadAddress("user address required")
    return plain


def normalize_domain(text: str) -> str:
    """Return the canonical form of a domain or ``[ip]`` literal; BadAddress if invalid.

    Hostnames: SMTP blanks stripped, every trailing dot dropped (sendmail's
    canonify drops them all: ``user@local.test..`` is delivered locally),
    ASCII lowercase. Literals keep the exact spelling sendmail's class w
    compares, letter case aside: ``[192.0.2.1]`` (a strict dotted quad) or
    ``[ipv6:ADDRESS]`` with ADDRESS as written. An IPv4-mapped
    ``[IPv6:::ffff:127.0.0.1]`` is not ``[127.0.0.1]`` (sendmail sends it
    out by SMTP), nor is ``[IPv6:0::1]`` ``[IPv6:::1]``; a literal with
    anything else inside (an untagged IPv6 address, a non-ASCII space) is
    refused. The config layer uses this for local_domains and relay_domains
    so both sides always agree.
    """
    raw = clean_text(text)
    if raw.startswith("["):
        if not raw.endswith("]") or raw.count("[") != 1 or raw.count("]") != 1:
            raise BadAddress("invalid address literal")
        return _literal(raw)
    raw = raw.rstrip(".")
    if not raw:
        raise BadAddress("hostname required")
    if raw.startswith(".") or ".." in raw:
        raise BadAddress("invalid host name %s" % _short(raw))
    if any(ch in DELIMITERS or ch in BLANKS or ch in '"\\' for ch in raw):
        raise BadAddress("invalid host name %s" % _short(raw))
    return ascii_lower(raw)


def _literal(raw: str) -> str:
    inner = raw[1:-1].strip(" \t")
    try:
        if inner[:5].lower() == "ipv6:" and "%" not in inner:
            ipaddress.IPv6Address(inner[5:])       # ASCII only, no stray spaces (and no %scope, above)
            return "[ipv6:%s]" % ascii_lower(inner[5:])
        return "[%s]" % ipaddress.IPv4Address(inner)
    except ValueError:
        raise BadAddress("invalid address literal %s" % _short(raw)) from None


def parent_domains(domain: str) -> list[str]:
    """``a.b.example`` -> ``["b.example", "example"]``, nearest first; none for a literal."""
    if domain.startswith("["):
        return []
    labels = domain.split(".")
    return [".".join(labels[k:]) for k in range(1, len(labels))]


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _strip_brackets(tokens: list[Token]) -> list[Token]:
    opens = [k for k, t in enumerate(tokens) if t.kind == "<"]
    closes = [k for k, t in enumerate(tokens) if t.kind == ">"]
    if not opens and not closes:
        return tokens
    if len(opens) != 1 or len(closes) != 1 or opens[0] > closes[0]:
        raise BadAddress("unbalanced angle brackets")
    # Like sendmail's RFC 733 heuristic, a phrase around <addr> is ignored.
    inner = tokens[opens[0] + 1:closes[0]]
    if all(t is GAP for t in inner):
        raise BadAddress("empty address")
    return inner


def _strip_route(tokens: list[Token]) -> list[Token]:
    """Drop a source route ``@a,@b:``: sendmail never routes through it."""
    if not tokens or tokens[0].kind != "@":
        return tokens
    i = 0
    while True:
        if i + 1 >= len(tokens) or tokens[i].kind != "@" or tokens[i + 1].kind not in ("word", "literal"):
            raise BadAddress("invalid source route")
        i += 2
        if i >= len(tokens):
            raise BadAddress("user address required")
        if tokens[i].kind == ",":
            i += 1
            continue
        if tokens[i].kind == ":":
            rest = tokens[i + 1:]
            if not rest:
                raise BadAddress("user address required")
            return rest
        raise BadAddress("invalid source route")


def _check_local(tokens: list[Token]) -> None:
    if not tokens:
        raise BadAddress("user address required")
    for tok in tokens:
        if tok.kind not in ("word", "%", "!"):
            raise BadAddress("invalid local part")


def _domain_of(tokens: list[Token]) -> str:
    if len(tokens) != 1 or tokens[0].kind not in ("word", "literal") or tokens[0].quoted:
        raise BadAddress("invalid domain")
    return normalize_domain(tokens[0].text)


class _Resolver:
    def __init__(self, is_local: Callable[[str], bool], percent_hack: bool, bang_paths: bool) -> None:
        self.is_local = is_local
        self.percent_hack = percent_hack
        self.bang_paths = bang_paths

    def routing(self, text: str) -> bool:
        """True if *text* (already dequoted) would route somewhere else."""
        return "@" in text or (self.percent_hack and "%" in text) or (self.bang_paths and "!" in text)

    def has_routing_tokens(self, tokens: list[Token]) -> bool:
        return any((t.kind == "%" and self.percent_hack) or (t.kind == "!" and self.bang_paths) for t in tokens)

    def run(self, text: str) -> Resolved:
        for _ in range(MAX_ROUNDS):
            outcome = self.one_round(text)
            if isinstance(outcome, Resolved):
                return outcome
            text = outcome
        raise BadAddress("too many routing levels")

    def one_round(self, text: str) -> Resolved | str:
        """Resolve one layer: a final Resolved, or the text to parse again."""
        tokens = _strip_route(drop_gaps(_strip_brackets(tokenize(text))))
        for tok in tokens:
            if tok.kind in _ILLEGAL:
                raise BadAddress("%s illegal in address" % ("colon" if tok.kind == ":" else repr(tok.kind)))
        ats = [k for k, t in enumerate(tokens) if t.kind == "@"]
        if len(ats) > 1:
            raise BadAddress("invalid route address")
        if ats:
            local, domain = tokens[:ats[0]], tokens[ats[0] + 1:]
            _check_local(local)
            if domain:
                return self.qualified(local, _domain_of(domain))
            tokens = local  # "user@" is "user", as sendmail's Parse0 has it
        return self.unqualified(tokens)

    def unqualified(self, tokens: list[Token]) -> Resolved | str:
        _check_local(tokens)
        kinds = [t.kind for t in tokens]
        if self.bang_paths and "!" in kinds:
            # host!rest: the first hop is the destination (canonify's UUCP rule).
            k = kinds.index("!")
            host, rest = tokens[:k], tokens[k + 1:]
            if len(host) != 1 or host[0].quoted or not rest:
                raise BadAddress("invalid bang path")
            _check_local(rest)
            return self.qualified(rest, normalize_domain(host[0].text))
        if self.percent_hack and "%" in kinds:
            k = len(kinds) - 1 - kinds[::-1].index("%")
            local, host = tokens[:k], tokens[k + 1:]
            _check_local(local)
            return self.qualified(local, _domain_of(host))
        if len(tokens) == 1 and tokens[0].quoted:
            plain = _dequote_local(tokens[0].text)
            if self.routing(plain):
                return plain
            return Resolved(plain, None)
        return Resolved(join_tokens(tokens), None)

    def qualified(self, local: list[Token], domain: str) -> Resolved | str:
        if not self.is_local(domain):
            if len(local) == 1 and local[0].quoted:
                return Resolved(_dequote_local(local[0].text), domain)
            return Resolved(join_tokens(local), domain)
        if self.has_routing_tokens(local):
            return join_tokens(local)
        if len(local) == 1 and local[0].quoted:
            plain = _dequote_local(local[0].text)
            if self.routing(plain):
                return plain
            return Resolved(plain, domain)
        return Resolved(join_tokens(local), domain)


def _never(domain: str) -> bool:
    return False


def resolve(
    address: str,
    is_local: Callable[[str], bool] = _never,
    *,
    percent_hack: bool = True,
    bang_paths: bool = True,
) -> Resolved:
    """Resolve *address* to its final destination; BadAddress if it cannot be parsed.

    *is_local* says whether a normalised domain is one of ours, i.e. whether
    routing characters left in its local part are unwrapped.  With
    *percent_hack* / *bang_paths* off, ``%`` / ``!`` are plain characters.
    """
    plain = _plain(address)
    if plain is not None:
        return plain
    text = clean_text(address)
    if not text:
        raise BadAddress("empty address")
    return _Resolver(is_local, percent_hack, bang_paths).run(text)


# Nearly every real address is a plain dot-atom at a hostname: no routing
# characters, quotes, comments, literals or blanks. Those resolve to
# themselves, so the milter answers them without tokenizing (the full
# resolver costs tens of microseconds; a test proves both agree).
_PLAIN_RE = re.compile(r"([A-Za-z0-9_+=-]+(?:\.[A-Za-z0-9_+=-]+)*)@([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)\.?")


def _plain(address: str) -> Resolved | None:
    if not isinstance(address, str):
        return None
    inner = address[1:-1] if address[:1] == "<" and address[-1:] == ">" else address
    m = _PLAIN_RE.fullmatch(inner)
    if m is None or len(address) > MAX_ADDRESS_BYTES:
        return None
    return Resolved(m.group(1), m.group(2).lower())


def is_null(address: str) -> bool:
    """True for the null reverse-path ``<>`` (blanks allowed) or an empty string."""
    if not isinstance(address, str):
        return False
    return address.strip(" \t\r\n").replace(" ", "").replace("\t", "") in ("", "<>")
