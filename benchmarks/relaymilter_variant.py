#!/usr/bin/env python3
"""relaymilter with some of its caches switched off, for benchmarks/milter_ceiling.py --caches.

    python3 benchmarks/relaymilter_variant.py --off rcpt,answers -- [relaymilter arguments]

Each name switches one cache off before relaymilter's own main() runs (the
workers it forks inherit that):

  rcpt      Runtime.destination's memo: what a recipient text resolves to
  answers   relayers.db answers kept per file version (store.mapreader.MapReader)

(relaymilter/runtime.py's header lists the caches and what each was measured
to be worth; two more, a memo of senders' spammers keys and one of parsed
client addresses, were measured this way and removed.)

Nothing else differs from the installed relaymilter. Benchmarks only.
"""

from __future__ import annotations

import sys

from relaymilter import runtime
from relaymilter.cli.milter import main
from relaymilter.policy.rcpt import destination
from relaymilter.store import mapreader

CACHES = ("rcpt", "answers")


def switch_off(names: set[str]) -> None:
    if "rcpt" in names:
        runtime.Runtime.destination = lambda self, rcpt: destination(self.policy, rcpt)  # type: ignore[method-assign]
    if "answers" in names:
        mapreader.CACHE_MAX = 0     # every answer starts a fresh table: nothing is ever answered from it


if __name__ == "__main__":
    args = sys.argv[1:]
    off: set[str] = set()
    if args[:1] == ["--off"]:
        off = set(filter(None, args[1].split(",")))
        args = args[2:]
    if args[:1] == ["--"]:
        args = args[1:]
    unknown = off - set(CACHES)
    if unknown:
        sys.exit("relaymilter_variant: error: unknown cache %s (known: %s)" % (", ".join(sorted(unknown)),
                                                                              ", ".join(CACHES)))
    switch_off(off)
    sys.exit(main(args))
