"""NAME
    relaymilter.popwatch.timestamps - the time a log line says it was written

DESCRIPTION
    The watcher needs a line's own time to read back the last few minutes of
    a log after a restart (--readback) and to print --test results. Three
    shapes are recognised, at the start of a line or as a pattern's ``ts``
    group:

      BSD syslog      ``Nov 21 18:14:14`` (day space- or zero-padded; what
                      sysklogd, rsyslog's traditional format and Dovecot's
                      default log_timestamp write)
      ISO 8601        ``2024-11-21T18:14:14.123456+01:00``, ``2024-11-21
                      18:14:14`` (rsyslog RFC 3339 high precision, the
                      Debian 12 default; Dovecot ``%Y-%m-%d %H:%M:%S``),
                      optional fraction, optional ``Z`` or ``+HH:MM``
      ctime           ``Tue Nov 21 18:14:14 2023`` (Qpopper's own log)

    Times without a zone are local time. BSD syslog carries no year: the
    current year is assumed, or the previous one when that would put the
    line more than a day in the future (a December line read in January).

DIAGNOSTICS
    None: anything unrecognised gives None, never an exception.
"""

from __future__ import annotations

import calendar
import re
import time
from typing import Optional

MONTHS = {m.encode(): i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}
FUTURE_SLACK = 86400.0

_BSD = re.compile(rb"([A-Z][a-z]{2}) {1,2}(\d{1,2}) (\d\d):(\d\d):(\d\d)")
_ISO = re.compile(rb"(\d{4})-(\d\d)-(\d\d)[T ](\d\d):(\d\d):(\d\d)(?:[.,](\d{1,9}))?(Z|[+-]\d\d:?\d\d)?")
_CTIME = re.compile(rb"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) ([A-Z][a-z]{2}) {1,2}(\d{1,2}) (\d\d):(\d\d):(\d\d) (\d{4})")
_LEAD = re.compile(b"(" + b"|".join(r.pattern for r in (_BSD, _ISO, _CTIME)) + b") ")
# The same alternatives without capturing groups: the matcher puts them in front
# of a pattern's regex, whose own groups must keep their numbers.
LEAD_TEXT = re.sub(rb"\((?!\?)", b"(?:", b"|".join(r.pattern for r in (_BSD, _ISO, _CTIME)))
_CACHE_MAX = 4096


def _local(y: int, mo: int, d: int, h: int, mi: int, s: int) -> Optional[float]:
    if not (1 <= mo <= 12 and 1 <= d <= 31 and h <= 23 and mi <= 59 and s <= 60):
        return None
    try:
        return time.mktime((y, mo, d, h, mi, s, 0, 0, -1))
    except (OverflowError, ValueError):
        return None


class TimestampParser:
    """Parses line timestamps; caches by text because a burst shares a handful of seconds."""

    def __init__(self) -> None:
        self._cache: dict[tuple[bytes, int], Optional[float]] = {}

    def skip(self, line: bytes) -> tuple[bytes, int]:
        """(the leading timestamp text, offset just past it and one space); (b"", 0) when none."""
        m = _LEAD.match(line)
        if m is None:
            return b"", 0
        return m.group(1), m.end()

    def leading(self, line: bytes, now: float) -> tuple[Optional[float], int]:
        """(epoch or None, offset just past the timestamp and one space; 0 when none)."""
        m = _BSD.match(line) or _ISO.match(line) or _CTIME.match(line)
        if m is None or line[m.end():m.end() + 1] != b" ":
            return None, 0
        return self._parse(m.group(0), now), m.end() + 1

    def parse(self, text: bytes, now: float) -> Optional[float]:
        """The epoch of a whole timestamp text (a pattern's ``ts`` group), or None."""
        return self._parse(text.strip(), now)

    def _parse(self, text: bytes, now: float) -> Optional[float]:
        # The year guess depends on now; a cache keyed by the hour of now is exact enough.
        key = (text, int(now) // 3600)
        try:
            return self._cache[key]
        except KeyError:
            pass
        value = parse_timestamp(text, now)
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[key] = value
        return value


def parse_timestamp(text: bytes, now: Optional[float] = None) -> Optional[float]:
    """The epoch seconds of one timestamp in any recognised shape, or None."""
    now = time.time() if now is None else now
    m = _BSD.fullmatch(text)
    if m:
        mo = MONTHS.get(m.group(1))
        if mo is None:
            return None
        d, h, mi, s = (int(m.group(i)) for i in range(2, 6))
        year = time.localtime(now).tm_year
        t = _local(year, mo, d, h, mi, s)
        if t is not None and t > now + FUTURE_SLACK:
            t = _local(year - 1, mo, d, h, mi, s)
        return t
    m = _ISO.fullmatch(text)
    if m:
        y, mo, d, h, mi, s = (int(m.group(i)) for i in range(1, 7))
        frac = float(b"0." + m.group(7)) if m.group(7) else 0.0
        zone = m.group(8)
        if zone is None:
            t = _local(y, mo, d, h, mi, s)
            return None if t is None else t + frac
        if not (1 <= mo <= 12 and 1 <= d <= 31 and h <= 23 and mi <= 59 and s <= 60):
            return None
        offset = 0
        if zone != b"Z":
            z = zone.replace(b":", b"")
            offset = (int(z[1:3]) * 3600 + int(z[3:5]) * 60) * (-1 if z[:1] == b"-" else 1)
        try:
            return calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0)) - offset + frac
        except (OverflowError, ValueError):
            return None
    m = _CTIME.fullmatch(text)
    if m:
        mo = MONTHS.get(m.group(1))
        if mo is None:
            return None
        d, h, mi, s, y = (int(m.group(i)) for i in range(2, 7))
        return _local(y, mo, d, h, mi, s)
    return None
