"""NAME
    relaymilter.popwatch.patterns - the log patterns, as data, strictly checked

DESCRIPTION
    rules/logpatterns.yaml says, for each POP/IMAP server, what a successful
    login looks like in the mail log (and optionally a logout, or a two-line
    login correlated by process id). The watcher loads it once (and again on
    SIGHUP); a mistake stops it with ``FILE:LINE: message``.

    A file holds ``patterns:``, a list of mappings:

      name       short unique word ([a-z0-9][a-z0-9_.-]*), used by
                 ``popwatch.patterns`` and printed with each login
      server     which server and versions the pattern is for
      regex      a successful login; named groups: ``ip`` (required),
                 ``session`` and ``user`` (optional), ``ts`` (optional)
      prefilter  literal text every line the regex matches contains; lines
                 without it never reach the regex (most lines are not logins)
      logout     list of {regex, prefilter}: a session's end, with ``ip`` or
                 ``session``; while a login has no logout yet its address
                 is kept
      pending    {regex, prefilter} with ``pid`` and ``ip``: first line of a
                 two-line login (the address)
      confirm    {regex, prefilter} with ``pid``: second line (the success)
      cancel     {regex, prefilter} with ``pid``: a failure that drops a
                 pending address

    A regex without a ``ts`` group is matched (anchored) right after the
    line's leading timestamp (see timestamps.py); a regex with a ``ts`` group
    is matched from the start of the line and gives the time itself.
    Regexes run on raw bytes; ``\\d``, ``\\s``, ``\\w`` mean ASCII only.

DIAGNOSTICS
    ConfigError ``FILE:LINE: ...`` for unknown keys, a bad regex, a missing
    or unknown named group, a duplicate name, an empty prefilter, a pattern
    with neither ``regex`` nor ``pending``/``confirm``, unknown selected names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import yaml

from relaymilter.config import rules_dir
from relaymilter.errors import ConfigError
from relaymilter.yamlcheck import Mapping, compose_file, where

TOP_KEYS = ("patterns",)
PATTERN_KEYS = ("name", "server", "regex", "prefilter", "logout", "pending", "confirm", "cancel")
RULE_KEYS = ("regex", "prefilter")
GROUPS = frozenset(("ip", "ts", "user", "session", "pid"))
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,39}$")

# kind -> (groups it must have (any one of each tuple), groups it may have)
KIND_GROUPS = {
    "login": ((("ip",),), {"ip", "ts", "user", "session"}),
    "logout": ((("ip", "session"),), {"ip", "ts", "user", "session"}),
    "pending": ((("pid",), ("ip",)), {"pid", "ip", "ts", "user"}),
    "confirm": ((("pid",),), {"pid", "ts", "user"}),
    "cancel": ((("pid",),), {"pid", "ts", "user"}),
}


@dataclass(frozen=True)
class Rule:
    """One regex of a pattern, with what it means."""

    pattern: str
    kind: str                        # login, logout, pending, confirm, cancel
    regex: "re.Pattern[bytes]"
    prefilters: tuple[bytes, ...]    # empty: the regex sees every line
    whole_line: bool                 # has a ts group: match from the start of the line
    where: str                       # FILE:LINE of the regex, for messages

    @property
    def text(self) -> str:
        return self.regex.pattern.decode("utf-8", "replace")


@dataclass(frozen=True)
class Pattern:
    name: str
    server: str
    rules: tuple[Rule, ...]

    @property
    def tracks_sessions(self) -> bool:
        return any(r.kind == "logout" for r in self.rules)


@dataclass(frozen=True)
class PatternSet:
    source: str
    patterns: tuple[Pattern, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.patterns)

    @property
    def rules(self) -> tuple[Rule, ...]:
        return tuple(r for p in self.patterns for r in p.rules)

    def get(self, name: str) -> Pattern:
        for p in self.patterns:
            if p.name == name:
                return p
        raise KeyError(name)

    def select(self, names: Optional[Sequence[str]]) -> "PatternSet":
        """Only the named patterns (in file order); None keeps all. ConfigError for unknown names."""
        if names is None:
            return self
        wanted = list(dict.fromkeys(n.strip() for n in names if n.strip()))
        unknown = [n for n in wanted if n not in self.names]
        if unknown:
            raise ConfigError("%s: unknown pattern%s %s (known: %s)" % (
                self.source, "s" if len(unknown) > 1 else "", ", ".join(unknown), ", ".join(self.names)))
        if not wanted:
            raise ConfigError("%s: no pattern selected" % self.source)
        return PatternSet(self.source, tuple(p for p in self.patterns if p.name in wanted))


def default_pattern_file() -> str:
    return str(Path(rules_dir()) / "logpatterns.yaml")


def load_patterns(path: Optional[str] = None, names: Optional[Sequence[str]] = None) -> PatternSet:
    """Read, check and compile a pattern file (default: the bundled one), then select *names*."""
    source = path or default_pattern_file()
    top = Mapping(source, compose_file(source), "the pattern file")
    top.check_keys(TOP_KEYS)
    node = top.node_of("patterns")
    if not isinstance(node, yaml.SequenceNode) or not node.value:
        raise ConfigError("%s: patterns: must be a non-empty list" % where(source, node or top.node))
    patterns: list[Pattern] = []
    seen: dict[str, str] = {}
    for item in node.value:
        pat = _pattern(source, item)
        if pat.name in seen:
            raise ConfigError("%s: duplicate pattern name %r (first at %s)" % (where(source, item), pat.name, seen[pat.name]))
        seen[pat.name] = where(source, item)
        patterns.append(pat)
    return PatternSet(source, tuple(patterns)).select(names)


def _pattern(source: str, node: yaml.Node) -> Pattern:
    m = Mapping(source, node, "a pattern")
    if m.node is None:
        raise ConfigError("%s: a pattern must be a mapping" % where(source, node))
    m.check_keys(PATTERN_KEYS, "pattern key")
    for key in ("name", "server"):
        if not m.has(key):
            raise ConfigError("%s: pattern needs %r" % (where(source, node), key))
    name = m.required_str("name")
    if not NAME_RE.match(name):
        raise m.err("name", "want a short lowercase word like 'dovecot' or 'uw-imap', got %r" % name)
    server = m.required_str("server")
    rules: list[Rule] = []
    if m.has("regex"):
        rules.append(_rule(name, "login", m, "regex", m.value("prefilter")))
    elif m.has("prefilter"):
        raise m.err("prefilter", "belongs with a regex")
    if m.has("logout"):
        lnode = m.node_of("logout")
        items = lnode.value if isinstance(lnode, yaml.SequenceNode) else [lnode]
        if not items:
            raise m.err("logout", "must be a list of {regex, prefilter}")
        for item in items:
            rules.append(_sub_rule(source, name, "logout", item))
    for kind in ("pending", "confirm", "cancel"):
        if m.has(kind):
            rules.append(_sub_rule(source, name, kind, m.node_of(kind)))
    kinds = {r.kind for r in rules}
    if ("pending" in kinds) != ("confirm" in kinds):
        raise ConfigError("%s: pattern %r: pending and confirm go together" % (where(source, node), name))
    if "cancel" in kinds and "pending" not in kinds:
        raise m.err("cancel", "needs pending and confirm")
    if "login" in kinds and "pending" in kinds:
        raise ConfigError("%s: pattern %r: use either regex or pending/confirm, not both" % (where(source, node), name))
    if "login" not in kinds and "pending" not in kinds:
        raise ConfigError("%s: pattern %r needs a regex (or pending and confirm)" % (where(source, node), name))
    login_groups = set()
    for r in rules:
        if r.kind == "login":
            login_groups = set(r.regex.groupindex)
    for r in rules:
        if r.kind == "logout" and "ip" not in r.regex.groupindex and "session" not in login_groups:
            raise ConfigError("%s: pattern %r: this logout finds sessions by 'session' but the login regex"
                              " has no session group" % (r.where, name))
    return Pattern(name, server, tuple(rules))


def _sub_rule(source: str, name: str, kind: str, node: Optional[yaml.Node]) -> Rule:
    sub = Mapping(source, node, "%r" % kind)
    if sub.node is None or not sub.has("regex"):
        raise ConfigError("%s: %s: want a mapping with regex (and prefilter)" % (where(source, node), kind))
    sub.check_keys(RULE_KEYS, "%s key" % kind)
    return _rule(name, kind, sub, "regex", sub.value("prefilter"))


def _prefilters(m: Mapping, raw: object) -> tuple[bytes, ...]:
    if raw is None:
        return ()
    items: Iterable[object] = raw if isinstance(raw, list) else [raw]
    out = []
    for item in items:
        if not isinstance(item, str) or not item or "\n" in item:
            raise m.err("prefilter", "each prefilter must be non-empty literal text on one line")
        out.append(item.encode("utf-8"))
    if not out:
        raise m.err("prefilter", "must not be an empty list")
    return tuple(dict.fromkeys(out))


def _rule(name: str, kind: str, m: Mapping, key: str, prefilter: object) -> Rule:
    text = m.value(key)
    at = where(m.source, m.node_of(key))
    if not isinstance(text, str) or not text:
        raise ConfigError("%s: %s: regex must be a non-empty string" % (at, kind))
    try:
        regex = re.compile(text.encode("utf-8"))
    except re.error as exc:
        raise ConfigError("%s: pattern %r: bad %s regex: %s" % (at, name, kind, exc)) from None
    groups = set(regex.groupindex)
    unknown = groups - GROUPS
    if unknown:
        raise ConfigError("%s: pattern %r: unknown named group%s %s (known: %s)" % (
            at, name, "s" if len(unknown) > 1 else "", ", ".join(sorted(unknown)), ", ".join(sorted(GROUPS))))
    required, allowed = KIND_GROUPS[kind]
    for choice in required:
        if not groups.intersection(choice):
            raise ConfigError("%s: pattern %r: the %s regex needs a named group %s" % (
                at, name, kind, " or ".join("(?P<%s>...)" % g for g in choice)))
    extra = groups - allowed
    if extra:
        raise ConfigError("%s: pattern %r: group %s means nothing in a %s regex" % (at, name, ", ".join(sorted(extra)), kind))
    return Rule(name, kind, regex, _prefilters(m, prefilter), "ts" in groups, at)
