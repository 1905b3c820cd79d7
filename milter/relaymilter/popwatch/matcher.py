"""NAME
    relaymilter.popwatch.matcher - find logins and logouts in a block of log lines

DESCRIPTION
    Matcher.scan() takes a block of complete lines (bytes, each ending in a
    newline, as the follower hands them over) and returns the login/logout
    events in line order.

    Speed: most mail log lines are not logins, so no Python code runs for
    them: a ScanPlan (scanplan.py) finds the lines holding a prefilter in a
    few C-level passes over the block and says which rules may match each.
    Only those lines are cut out (by map/slice calls over all of them at
    once), and a line's rule is one dict lookup by the roots found on it
    when no longer prefilter is left to check. A rule's regex is compiled
    once together with the leading-timestamp alternatives (taken atomically,
    so the rule is still anchored right after the timestamp), so trying a
    rule is one regex call; a matched line's timestamp is parsed only then
    (and cached by its text). Rules without a prefilter fall back to a
    per-line loop.

    Two-line logins (pending/confirm by process id) keep a bounded table of
    pending addresses; a cancel line (a failure) drops the entry.

    Lines are bytes: nothing is decoded except the matched groups (ASCII for
    addresses, UTF-8 with replacement for user names). A candidate line
    holding NUL bytes (binary garbage, or the hole a copy-truncate leaves
    before a writer's next line) has its leading NULs dropped; one with NULs
    inside is skipped and counted.

DIAGNOSTICS
    None raised for any input; counters in Matcher.stats:
    candidates, binary, nonutf8, pending_dropped.
"""

from __future__ import annotations

import re
from collections import Counter, OrderedDict
from dataclasses import dataclass
from itertools import repeat
from typing import Callable, Optional

from relaymilter.popwatch.patterns import PatternSet, Rule
from relaymilter.popwatch.scanplan import ScanPlan
from relaymilter.popwatch.timestamps import LEAD_TEXT, TimestampParser

PENDING_MAX = 10000
LEAD_GROUP = "_lead"        # not a name patterns may use (see patterns.GROUPS)
_EVENT_KINDS = ("login", "logout")
# A regex that refers to groups by number must not get a group in front of its own,
# and one that starts with global inline flags ("(?i)...") must keep them first.
_KEEP_ALONE = re.compile(rb"\\[1-9]|\(\?\(\d|^\(\?[aiLmsux]+\)")


@dataclass(slots=True)
class Event:
    """One login or logout seen in the log."""

    kind: str                   # "login" or "logout"
    pattern: str
    ip: Optional[str]           # as written in the log (not yet checked)
    ts: Optional[float]         # the line's own time, when it has one
    session: Optional[str] = None
    user: Optional[str] = None
    tracks_sessions: bool = False


def _text(raw: Optional[bytes]) -> Optional[str]:
    return None if raw is None else raw.decode("utf-8", "replace")


class _Compiled:
    """A rule ready to try on one line: match(line) -> match object or None."""

    __slots__ = ("rule", "kind", "name", "match", "lead", "has_ip", "has_user", "has_session", "by_ip",
                 "by_session")

    def __init__(self, rule: Rule, tracking: tuple[bool, bool], lead_of: Callable[[bytes], tuple[bytes, int]]) -> None:
        self.rule = rule
        self.kind = rule.kind
        self.name = rule.pattern
        groups = rule.regex.groupindex
        self.has_ip = "ip" in groups
        self.has_user = "user" in groups
        self.has_session = "session" in groups
        self.by_ip, self.by_session = tracking
        self.lead = False           # the match holds the leading timestamp in LEAD_GROUP
        self.match: Callable[[bytes], Optional["re.Match[bytes]"]]
        if rule.whole_line:
            self.match = rule.regex.match
            return
        src = rule.regex.pattern
        if not _KEEP_ALONE.search(src):
            # (?=(?P<t>TS ))(?P=t) takes the timestamp atomically: when the line has one, the
            # rule's regex starts right after it and never at the start of the line instead.
            combined = b"(?:(?=(?P<%s>(?:%s) ))(?P=%s)|(?!(?:%s) ))(?:%s)" % (
                LEAD_GROUP.encode(), LEAD_TEXT, LEAD_GROUP.encode(), LEAD_TEXT, src)
            try:
                self.match = re.compile(combined, rule.regex.flags).match
                self.lead = True
                return
            except re.error:
                pass
        regex = rule.regex

        def two_step(line: bytes) -> Optional["re.Match[bytes]"]:
            return regex.match(line, lead_of(line)[1])
        self.match = two_step


class Matcher:
    """Applies a PatternSet to blocks of log lines; keeps two-line state between calls."""

    def __init__(self, patterns: PatternSet) -> None:
        self.patterns = patterns
        self.rules: tuple[Rule, ...] = patterns.rules
        # A login opens a session only if a logout of that pattern can close it:
        # by address, or by session id when the login line carried one.
        self.tracking = {p.name: (any(r.kind == "logout" and "ip" in r.regex.groupindex for r in p.rules),
                                  any(r.kind == "logout" and "session" in r.regex.groupindex for r in p.rules))
                         for p in patterns.patterns}
        self._ts = TimestampParser()
        self._compiled = [_Compiled(rule, self.tracking[rule.pattern], self._ts.skip) for rule in self.rules]
        lits: dict[bytes, int] = {}
        self._always = 0
        for i, rule in enumerate(self.rules):
            if rule.prefilters:
                for lit in rule.prefilters:
                    lits[lit] = lits.get(lit, 0) | (1 << i)
            else:
                self._always |= 1 << i
        self._lits = sorted(lits.items(), key=lambda kv: -len(kv[0]))
        self.plan = ScanPlan(lits)
        self._rules_by_mask: dict[int, tuple[_Compiled, ...]] = {}
        self._single: dict[int, Optional[_Compiled]] = {}
        self._fast: dict[int, Optional[_Compiled]] = {}     # candidate roots -> the one rule to try
        self._times: dict[bytes, Optional[float]] = {}     # timestamp text -> epoch, for one hour of now
        self._times_hour = -1
        self._pending: OrderedDict[tuple[str, bytes], tuple[Optional[str], Optional[float], Optional[str]]] = OrderedDict()
        self.stats: Counter[str] = Counter()

    @property
    def passes(self) -> int:
        """How many times scan() searches a block (one C-level pass each)."""
        return len(self.plan.passes)

    def scan(self, block: bytes, now: float) -> list[Event]:
        """Events from *block* (complete lines), in line order."""
        if not block:
            return []
        if not block.endswith(b"\n"):
            block += b"\n"
        if self._always:
            return self._scan_each(block, now)
        cand = self.plan.candidates(block)
        if not cand:
            return []
        self.stats["candidates"] += len(cand)
        # Block-level C checks spare the per-line ones in the usual all-ASCII, NUL-free case.
        clean = block.isascii() and block.find(b"\0") < 0 and block.find(b"\r") < 0
        events: list[Event] = []
        plan = self.plan
        fast = self._fast
        times = self._times_for(now)
        starts = sorted(cand)
        # Lines cut by C calls over all candidates at once (map/slice), not one by one.
        lines = map(block.__getitem__, map(slice, starts, map(block.find, repeat(b"\n"), starts)))
        for line, roots in zip(lines, map(cand.__getitem__, starts)):
            if not clean:
                cleaned = self._clean(line)
                if cleaned is None:
                    continue
                if cleaned is not line:
                    self._try_mask(plan.mask_of(cleaned, roots), cleaned, now, events)
                    continue
            # roots -> the one rule to try, when the roots alone say so (the common case).
            try:
                c = fast[roots]
            except KeyError:
                c = self._fast_for(roots)
            if c is None:
                mask, longer = plan.resolve(roots)
                for lit, more in longer:
                    if line.find(lit) >= 0:     # not `in`: for bytes it first tries lit as an int
                        mask |= more
                self._try_mask(mask, line, now, events)
                continue
            m = c.match(line)
            if m is None:
                continue
            stamp = m[LEAD_GROUP]
            ts = times.get(stamp) if stamp else None
            if ts is None and stamp:
                ts = self._time(stamp, now)
            user = m["user"] if c.has_user else None
            ip = m["ip"] if c.has_ip else None
            session = m["session"] if c.has_session else None
            events.append(Event(c.kind, c.name, None if ip is None else ip.decode("ascii", "replace"), ts,
                                None if session is None else session.decode("utf-8", "replace"),
                                None if user is None else user.decode("utf-8", "replace"),
                                c.by_ip or (c.by_session and session is not None)))
        return events

    def candidate_starts(self, block: bytes) -> Optional[set[int]]:
        """Where the lines of *block* that some rule may match start; None: any line may (a rule has no prefilter)."""
        if self._always:
            return None
        return set(self.plan.candidates(block))

    def _fast_for(self, roots: int) -> Optional[_Compiled]:
        """The single rule for lines with *roots* when no longer prefilter is left to check; else None."""
        mask, longer = self.plan.resolve(roots)
        c = None if longer or not mask else self._single_for(mask)
        self._fast[roots] = c
        return c

    def _try_mask(self, mask: int, line: bytes, now: float, events: list[Event]) -> None:
        if mask:
            self._try(self._rules_by_mask.get(mask) or self._rules_for(mask), line, now, events)

    def _scan_each(self, block: bytes, now: float) -> list[Event]:
        events: list[Event] = []
        lits = self._lits
        for line in block.split(b"\n")[:-1]:
            self.stats["candidates"] += 1
            cleaned = self._clean(line)
            if cleaned is None:
                continue
            mask = self._always
            for lit, m in lits:
                if cleaned.find(lit) >= 0:
                    mask |= m
            self._try(self._rules_by_mask.get(mask) or self._rules_for(mask), cleaned, now, events)
        return events

    def _rules_for(self, mask: int) -> tuple[_Compiled, ...]:
        out = tuple(c for i, c in enumerate(self._compiled) if mask >> i & 1)
        self._rules_by_mask[mask] = out
        return out

    def _single_for(self, mask: int) -> Optional[_Compiled]:
        """The rule for *mask* when it is one login/logout rule anchored after the timestamp."""
        rules = self._rules_for(mask)
        c = rules[0] if len(rules) == 1 and rules[0].lead and rules[0].kind in _EVENT_KINDS else None
        self._single[mask] = c
        return c

    def _clean(self, line: bytes) -> Optional[bytes]:
        if line.endswith(b"\r"):
            line = line[:-1]
        if line.find(b"\0") >= 0:
            line = line.lstrip(b"\0")
            if line.find(b"\0") >= 0:
                self.stats["binary"] += 1
                return None
        if not line.isascii():
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                self.stats["nonutf8"] += 1
        return line

    def _try(self, rules: tuple[_Compiled, ...], line: bytes, now: float, events: list[Event]) -> None:
        """Apply the first of *rules* (file order) that matches *line*."""
        for c in rules:
            m = c.match(line)
            if m is None:
                continue
            if c.lead:
                stamp = m[LEAD_GROUP]
            elif c.rule.whole_line:
                stamp = m["ts"] or self._ts.skip(line)[0]
            else:
                stamp = self._ts.skip(line)[0]
            self._apply(c, m, self._time(stamp, now) if stamp else None, events)
            return

    def _times_for(self, now: float) -> dict[bytes, Optional[float]]:
        # A burst shares a handful of timestamp texts; the year guess depends on the hour of now.
        hour = int(now) // 3600
        if hour != self._times_hour or len(self._times) > 4096:
            self._times.clear()
            self._times_hour = hour
        return self._times

    def _time(self, stamp: bytes, now: float) -> Optional[float]:
        times = self._times_for(now)
        try:
            return times[stamp]
        except KeyError:
            ts = times[stamp] = self._ts.parse(stamp, now)
            return ts

    def _apply(self, c: _Compiled, m: "re.Match[bytes]", ts: Optional[float], events: list[Event]) -> None:
        kind = c.kind
        user = m["user"] if c.has_user else None
        if user is not None:
            user = user.decode("utf-8", "replace")
        if kind == "login" or kind == "logout":
            ip = m["ip"] if c.has_ip else None
            session = m["session"] if c.has_session else None
            events.append(Event(kind, c.name, None if ip is None else ip.decode("ascii", "replace"), ts,
                                None if session is None else session.decode("utf-8", "replace"), user,
                                c.by_ip or (c.by_session and session is not None)))
            return
        key = (c.name, m["pid"] or b"")
        if kind == "pending":
            self._pending.pop(key, None)
            self._pending[key] = (_text(m["ip"]), ts, user)
            if len(self._pending) > PENDING_MAX:
                self._pending.popitem(last=False)
                self.stats["pending_dropped"] += 1
        elif kind == "confirm":
            found = self._pending.pop(key, None)
            if found is not None:
                ip_text, first_ts, first_user = found
                events.append(Event("login", c.name, ip_text, ts if ts is not None else first_ts, None,
                                    user or first_user, c.by_ip))
        elif kind == "cancel":
            self._pending.pop(key, None)
