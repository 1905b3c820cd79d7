"""NAME
    relaymilter.popwatch.scanplan - find a block's candidate lines in few C-level passes

DESCRIPTION
    Most mail log lines are not logins. A pattern's prefilters are literal
    texts every line its regexes match contains; ScanPlan finds the lines
    holding any prefilter without running Python code for the others, and
    says for each found line which rules may match it.

    Searching a block once per prefilter would cost one pass over the block
    each (the shipped patterns have two dozen). The plan cuts that down:

    root      a prefilter no other prefilter is part of. A line holding a
              prefilter holds some root, so finding the roots is enough.
    anchored  a root holding ANCHOR (": ", what syslog puts between a program
              and its message) with at least MIN_TAIL bytes after it. All of
              them are found by ONE regex: ANCHOR as its literal first part
              (the re engine skips ahead to a literal as fast as bytes.find
              does), then a class of the bytes that may follow (most stops
              end there), then the alternatives: what follows ANCHOR, and,
              as a look-behind, what precedes it (">" of ">: Disconnected").
    others    roots sharing their first SHARED_PREFIX bytes are one regex
              the same way; a root alone is one literal search.

    The shipped patterns cost four passes, not two dozen. A pass consumes
    only its shared first part (which cannot overlap itself), so no root
    occurrence is skipped; the alternative that matched names its root (and
    any root that could match at the same place, to be safe). A line's rules
    are then known from its roots; a prefilter longer than its root is
    checked with bytes.find on that one line.

    The found places become line starts by C calls over a whole pass at
    once (map over the matches, rfind, dict.fromkeys/zip): no Python code
    runs per found line unless two roots of a pass share it.

DIAGNOSTICS
    None: the plan is built from already checked prefilters.
"""

from __future__ import annotations

import re
from itertools import repeat
from typing import Callable, Iterator, Union

ANCHOR = b": "
MIN_TAIL = 4
SHARED_PREFIX = 2
_ONE = 1
_START = re.Match.start
_GROUP = re.Match.group

Search = Callable[[bytes], Iterator["re.Match[bytes]"]]
Bits = Union[int, dict[bytes, int]]      # the root bit of a pass, or root bits by the text matched after it
Resolved = tuple[int, tuple[tuple[bytes, int], ...]]


def anchor_of(root: bytes) -> int:
    """Where ANCHOR starts in *root*, when enough follows it; -1 otherwise."""
    i = root.find(ANCHOR)
    return i if i >= 0 and len(root) - i - len(ANCHOR) >= MIN_TAIL else -1


class ScanPlan:
    """The passes for a set of prefilters, each with the rule mask it stands for."""

    def __init__(self, lits: dict[bytes, int]) -> None:
        self.roots = sorted(lit for lit in lits if not any(o != lit and o in lit for o in lits))
        bit = {root: 1 << i for i, root in enumerate(self.roots)}
        # Per root: the mask of the prefilter that is that root, and the longer ones to check.
        self._exact = [0] * len(self.roots)
        self._longer: list[list[tuple[bytes, int]]] = [[] for _ in self.roots]
        self._behind: list[list[tuple[bytes, int]]] = [[] for _ in self.roots]
        for lit, mask in lits.items():
            i = next(i for i, r in enumerate(self.roots) if r in lit)
            self._behind[i].append((lit, mask))
            if lit == self.roots[i]:
                self._exact[i] |= mask
            else:
                self._longer[i].append((lit, mask))
        self.passes: list[tuple[Search, Bits]] = []
        anchored = [r for r in self.roots if anchor_of(r) >= 0]
        if anchored:
            self.passes.append(_anchored_pass(anchored, bit))
        groups: dict[bytes, list[bytes]] = {}
        for root in self.roots:
            if anchor_of(root) < 0:
                groups.setdefault(root[:SHARED_PREFIX], []).append(root)
        for group in groups.values():
            shared = _common_prefix(group)
            if len(group) == 1 or _overlaps_itself(shared):
                self.passes += [(re.compile(re.escape(r)).finditer, bit[r]) for r in group]
            else:
                tails = [r[len(shared):] for r in group]
                self.passes.append(_pass(shared, [(b"", t) for t in tails], {t: bit[r] for t, r in zip(tails, group)}))
        self.resolved: dict[int, Resolved] = {}

    def candidates(self, block: bytes) -> dict[int, int]:
        """Line start -> bits of the roots found on that line."""
        # Every step below is a C call over a whole pass (map, zip, dict): no Python code runs
        # per found line, except where two passes, or two roots of one pass, share a line.
        cand: dict[int, int] = {}
        rfind = block.rfind
        for search, bits in self.passes:
            found = list(search(block))
            if not found:
                continue
            starts = list(map(_ONE.__add__, map(rfind, repeat(b"\n"), repeat(0), map(_START, found))))
            if isinstance(bits, int):
                got = dict.fromkeys(starts, bits)
            else:
                values = list(map(bits.__getitem__, map(_GROUP, found, repeat(1))))
                got = dict(zip(starts, values))
                if len(got) < len(starts):
                    # Two roots of this pass on one line: both count.
                    got = {}
                    for start, value in zip(starts, values):
                        got[start] = got.get(start, 0) | value
            if cand:
                for start in got.keys() & cand.keys():
                    got[start] |= cand[start]
                cand.update(got)
            else:
                cand = got
        return cand

    def resolve(self, roots: int) -> Resolved:
        """(rule mask sure to apply, prefilters still to check) for a line with *roots*."""
        try:
            return self.resolved[roots]
        except KeyError:
            pass
        mask = 0
        longer: list[tuple[bytes, int]] = []
        for i in range(len(self.roots)):
            if roots >> i & 1:
                mask |= self._exact[i]
                longer += self._longer[i]
        out = self.resolved[roots] = (mask, tuple(longer))
        return out

    def mask_of(self, line: bytes, roots: int) -> int:
        """The rule mask of *line*, checking every prefilter behind *roots* (for lines that were cleaned)."""
        mask = 0
        for i in range(len(self.roots)):
            if roots >> i & 1:
                for lit, m in self._behind[i]:
                    if line.find(lit) >= 0:
                        mask |= m
        return mask


def _anchored_pass(roots: list[bytes], bit: dict[bytes, int]) -> tuple[Search, Bits]:
    parts = []
    for root in roots:
        i = anchor_of(root)
        parts.append((root[:i], root[i + len(ANCHOR):]))
    # Roots whose tails could match at the same place all count (one alternative wins there).
    bits: dict[bytes, int] = {}
    for _, tail in parts:
        bits[tail] = sum(bit[r] for (_, t), r in zip(parts, roots) if t.startswith(tail) or tail.startswith(t))
    return _pass(ANCHOR, parts, bits)


def _pass(shared: bytes, parts: list[tuple[bytes, bytes]], bits: dict[bytes, int]) -> tuple[Search, Bits]:
    """One regex: *shared*, then (without consuming it) any tail, each after its look-behind text."""
    nxt = b"".join(b"\\x%02x" % c for c in sorted({tail[0] for _, tail in parts}))
    alts = b"|".join((b"(?<=" + re.escape(before + shared) + b")" if before else b"") + re.escape(tail)
                     for before, tail in sorted(parts, key=lambda p: p[1]))
    regex = re.compile(re.escape(shared) + b"(?=[" + nxt + b"])(?=(" + alts + b"))")
    return regex.finditer, bits


def _common_prefix(items: list[bytes]) -> bytes:
    first, last = min(items), max(items)
    n = 0
    while n < len(first) and first[n] == last[n]:
        n += 1
    return first[:n]


def _overlaps_itself(text: bytes) -> bool:
    # Only the shared part is consumed: a root starting inside it would be skipped.
    return any(text[j:] == text[:len(text) - j] for j in range(1, len(text)))
