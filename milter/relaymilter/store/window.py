"""NAME
    relaymilter.store.window - the sliding hour in one-minute buckets

DESCRIPTION
    A count over the last hour is kept as MINUTES per-minute buckets, a ring
    indexed by epoch minute mod MINUTES, with the minute it was last written.
    window_sum() is the hour's total as of a later minute (the buckets that
    have left the window not counted); rolled() is the ring moved on to a
    later minute (the buckets of the minutes in between emptied). Both work
    on the values as read: the caller holds whatever lock guards them.

Stdlib only, no state.
"""

from __future__ import annotations

MINUTES = 60


def window_sum(values: tuple, last: int, minute: int) -> int:
    """Sum of the per-minute *values* (last written at *last*) over the hour ending at *minute*."""
    age = minute - last
    if age >= MINUTES:
        return 0
    if age <= 0:
        return sum(values)
    # The buckets of minutes last-59 .. minute-60 have left the window.
    total = sum(values)
    for m in range(last - MINUTES + 1, minute - MINUTES + 1):
        total -= values[m % MINUTES]
    return total


def rolled(values: tuple, last: int, minute: int) -> list[int]:
    """*values* moved on from *last* to *minute*: the buckets of minutes in between start at 0."""
    age = minute - last
    if age >= MINUTES:
        return [0] * MINUTES
    out = list(values)
    for m in range(last + 1, minute + 1):
        out[m % MINUTES] = 0
    return out
