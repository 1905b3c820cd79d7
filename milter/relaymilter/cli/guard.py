"""NAME
    relaymilter-guard - the admin's view of the relaying limits: who is near, over, suspended

SYNOPSIS
    relaymilter-guard [-f FILE|URL] [-c CONFIG] [--now TICKS] command [arg] [...]

DESCRIPTION
    Commands, in the style of vsmtprelay:

        list [percent]            identities at or above percent (default 80)
                                  of a limit in the last hour, then the
                                  suspended ones
        suspended                 the suspended identities only
        lift identity [...]       end suspensions; the identities' counts
                                  start afresh
        suspend identity [min]    suspend by hand (default suspend_minutes,
                                  else 60): as the milter does when a limit
                                  is passed

    Output is one line per item, fields separated by one space, comments for
    people on lines starting with # (as vsmtprelay's), so that
    ``awk '$2 == "suspended" {print $1}'`` and the like work:

        # identity family count limit
        alice recipients 101 100 over
        bob messages 41 50 near
        # suspended until (UTC): Thu Dec  3 05:00:00 2026
        carol suspended 1764738000 addresses_per_hour

    Identities are printed with white space and control characters escaped
    (\\x20), so each is one field. The stores are the ones beside the relayers
    map: -f FILE (or a Redis URL), else the configuration's relayers, as for
    vsmtprelay.

DIAGNOSTICS
    Bad usage prints the usage text and exits 2; a bad percent or minutes
    value one line, exit 2. lift of an identity that is not suspended says
    so on stderr and exits 1 (its counts are reset all the same). A store
    that cannot be read or written exits 1 with one line saying why.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from typing import Optional, Sequence, TextIO

from relaymilter import __version__
from relaymilter.ipaddr import shorten
from relaymilter.policy.limits import Limits
from relaymilter.store.guard import open_guard_store
# The classic parser, its two errors and its main() are vsmtprelay's: the same flags, the same exits.
from relaymilter.cli.vsmtprelay import BadArgument, build_parser, classic_main, command_args

PROG = "relaymilter-guard"
USAGE = """\
relaymilter-guard {version} usage (optional items in []):
    % relaymilter-guard command [arg] [...]
    % relaymilter-guard -f file command [arg] [...]     (another relayers.db, or a redis:// URL)
where "command [arg] [...]" can be one of the following:

    "list [percent]"              identities at or over percent (default 80) of
                                  a limit in the last hour, and the suspended
    "suspended"                   the suspended identities only
    "lift identity [...]"         end suspensions (and start those counts afresh)
    "suspend identity [minutes]"  suspend by hand (default: suspend_minutes, else 60)

An identity is an SMTP AUTH user, a POP/IMAP user, or a client address.
Counts are over the last hour; times are seconds since the UNIX epoch.
"""

ARITY = {"list": (0, 1), "suspended": (0, 0), "lift": (1, None), "suspend": (1, 2)}
FAMILY_LIMIT = {"recipients": "recipients_per_hour", "messages": "messages_per_hour",
                "addresses": "addresses_per_hour"}


def field(text: str) -> str:
    """*text* as one shell field: white space, backslash and control characters escaped."""
    return re.sub(r"[\s\\\x00-\x1f\x7f]", lambda m: "\\x%02x" % ord(m.group()), text) or "\\x00"


def _number(text: str, what: str, top: int) -> int:
    if not re.fullmatch(r"[0-9]{1,12}", text) or int(text) > top:
        raise BadArgument("invalid %s value: %r (want a whole number, 0..%d)" % (what, shorten(text), top))
    return int(text)


def _stamp(ticks: int) -> str:
    try:
        return time.asctime(time.gmtime(ticks))
    except (OverflowError, ValueError, OSError):
        return "(out of range)"


def run(opts: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    command, args = command_args(opts, ARITY)
    now = _number(opts.now, "--now", 253402300799) if opts.now is not None else int(time.time())
    percent = _number(args[0], "percent", 10000) if command == "list" and args else 80
    minutes = _number(args[1], "minutes", 10**7) if command == "suspend" and len(args) > 1 else None
    if command in ("lift", "suspend") and not all(a.strip() for a in args[:1 if command == "suspend" else None]):
        raise BadArgument("an identity must not be empty")

    from relaymilter.config import load_config

    cfg = load_config(opts.config)         # for the limits, even with -f
    limits: Optional[Limits] = cfg.limits
    location = opts.file or cfg.relayers.location
    store = open_guard_store(location, create=False)
    try:
        if command == "list":
            show_usage(store.usage(now), limits, percent, out)
            show_suspended(store.suspensions(now), out)
        elif command == "suspended":
            show_suspended(store.suspensions(now), out)
        elif command == "lift":
            missing = [identity for identity in args if not store.lift(identity)]
            for identity in missing:
                err.write("%s: %s: not suspended\n" % (PROG, field(identity)))
            return 1 if missing else 0
        else:
            minutes = minutes if minutes is not None else (limits.suspend_minutes if limits else None) or 60
            removed = store.suspend(args[0], now + 60 * minutes, "admin", now)
            out.write("# suspended until (UTC): %s; removed from the relayers map: %s\n"
                      % (_stamp(now + 60 * minutes), " ".join(removed) or "none"))
            out.write("%s suspended %d admin\n" % (field(args[0]), now + 60 * minutes))
    finally:
        store.close()
    return 0


def show_usage(usage: Sequence, limits: Optional[Limits], percent: int, out: TextIO) -> None:
    table = limits.table() if limits is not None else {}
    rows = []
    for u in usage:
        limit = table.get(u.family)
        if limit is None:
            if percent:
                continue        # no limit to be near: shown only with "list 0"
            state = "-"
        elif u.count > limit:
            state = "over"
        elif u.count * 100 >= limit * percent:
            state = "at" if u.count == limit else "near"
        else:
            continue
        rows.append((u.identity, u.family, u.count, "-" if limit is None else str(limit), state))
    out.write("# identity family count limit state (last hour)\n")
    for row in sorted(rows, key=lambda r: (r[0], r[1])):
        out.write("%s %s %d %s %s\n" % (field(row[0]), *row[1:]))


def show_suspended(held: Sequence, out: TextIO) -> None:
    for s in held:
        out.write("# suspended until (UTC): %s\n" % _stamp(s.until))
        out.write("%s suspended %d %s\n" % (field(s.identity), s.until, field(s.reason)))


def main(argv: Optional[Sequence[str]] = None) -> int:
    return classic_main(PROG, USAGE.format(version=__version__), build_parser(), run, argv)

if __name__ == "__main__":
    sys.exit(main())
