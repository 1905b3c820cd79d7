"""NAME
    relaymilter.popwatch.matcher - find logins and logouts in a block of log lines

DESCRIPTION
    Matcher.scan() takes a block of complete lines (bytes, each ending in a
    newline, as the follower hands them over) and returns the login/logout
    events in line order.

    Speed: most mail log lines are not logins. Each rule has literal
    prefilters; the block is searched for each literal with bytes.find (a
    C-speed scan over the whole block, not a Python loop per line), and only
    the lines that hold a literal are cut out and given to the rules whose
    literal they hold. Rules without a prefilter fall back to a per-line loop.

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

from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Optional

from relaymilter.popwatch.patterns import PatternSet, Rule
from relaymilter.popwatch.timestamps import TimestampParser

PENDING_MAX = 10000


@dataclass
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
        lits: dict[bytes, int] = {}
        self._always = 0
        for i, rule in enumerate(self.rules):
            if rule.prefilters:
                for lit in rule.prefilters:
                    lits[lit] = lits.get(lit, 0) | (1 << i)
            else:
                self._always |= 1 << i
        # Longer literals first: they are rarer, so the later scans find fewer new lines.
        self._lits = sorted(lits.items(), key=lambda kv: -len(kv[0]))
        self._ts = TimestampParser()
        self._pending: OrderedDict[tuple[str, bytes], tuple[Optional[str], Optional[float], Optional[str]]] = OrderedDict()
        self.stats: Counter[str] = Counter()

    def scan(self, block: bytes, now: float) -> list[Event]:
        """Events from *block* (complete lines), in line order."""
        if not block:
            return []
        if not block.endswith(b"\n"):
            block += b"\n"
        if self._always:
            return self._scan_each(block, now)
        cand: dict[int, int] = {}
        find = block.find
        rfind = block.rfind
        for lit, mask in self._lits:
            i = find(lit)
            while i >= 0:
                start = rfind(b"\n", 0, i) + 1
                end = find(b"\n", i)
                cand[start] = cand.get(start, 0) | mask
                i = find(lit, end + 1)
        if not cand:
            return []
        self.stats["candidates"] += len(cand)
        events: list[Event] = []
        for start in sorted(cand):
            end = find(b"\n", start)
            self._line(block[start:end], cand[start], now, events)
        return events

    def _scan_each(self, block: bytes, now: float) -> list[Event]:
        events: list[Event] = []
        lits = self._lits
        for line in block.split(b"\n")[:-1]:
            self.stats["candidates"] += 1
            mask = self._always
            for lit, m in lits:
                if lit in line:
                    mask |= m
            self._line(line, mask, now, events)
        return events

    def _line(self, line: bytes, mask: int, now: float, events: list[Event]) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if b"\0" in line:
            line = line.lstrip(b"\0")
            if b"\0" in line:
                self.stats["binary"] += 1
                return
        if line.isascii() is False:
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                self.stats["nonutf8"] += 1
        lead = b""
        pos = -1
        while mask:
            low = mask & -mask
            mask ^= low
            rule = self.rules[low.bit_length() - 1]
            if rule.whole_line:
                m = rule.regex.match(line)
            else:
                if pos < 0:
                    lead, pos = self._ts.skip(line)
                m = rule.regex.match(line, pos)
            if m is None:
                continue
            groups = m.groupdict()
            stamp = groups.get("ts") or lead
            ts = self._ts.parse(stamp, now) if stamp else None
            self._apply(rule, groups, ts, events)
            return

    def _apply(self, rule: Rule, g: dict[str, Optional[bytes]], ts: Optional[float], events: list[Event]) -> None:
        kind = rule.kind
        name = rule.pattern
        if kind == "login" or kind == "logout":
            ip = g.get("ip")
            session = _text(g.get("session"))
            by_ip, by_session = self.tracking[name]
            events.append(Event(kind, name, None if ip is None else ip.decode("ascii", "replace"), ts,
                                session, _text(g.get("user")), by_ip or (by_session and session is not None)))
        elif kind == "pending":
            key = (name, g["pid"] or b"")
            self._pending.pop(key, None)
            self._pending[key] = (_text(g.get("ip")), ts, _text(g.get("user")))
            if len(self._pending) > PENDING_MAX:
                self._pending.popitem(last=False)
                self.stats["pending_dropped"] += 1
        elif kind == "confirm":
            found = self._pending.pop((name, g["pid"] or b""), None)
            if found is not None:
                ip, first_ts, user = found
                events.append(Event("login", name, ip, ts if ts is not None else first_ts, None,
                                    _text(g.get("user")) or user, self.tracking[name][0]))
        elif kind == "cancel":
            self._pending.pop((name, g["pid"] or b""), None)
