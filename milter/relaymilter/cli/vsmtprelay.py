"""NAME
    vsmtprelay - maintain relayers.db, the POP-before-SMTP relay map

SYNOPSIS
    vsmtprelay [-f FILE|URL] [-c CONFIG] [--now TICKS] command [arg] [...]

DESCRIPTION
    The classic virtual-server command, same words, same meanings, same
    output: add, delete, expire, list, dump. "Old" means timestamp <= now;
    "older than n minutes" means timestamp <= now - 60*n. list and dump print
    two lines per entry, ordered by address, in a form `makemap hash` reads
    back (the comment line is ignored by makemap):

        # timestamp (UTC): Tue Sep 22 22:15:27 1998
        10.11.12.13 906502527

    The map is -f FILE (or a redis:// URL), else the configuration's
    relayers path, else ~/etc/relayers.db.

DIAGNOSTICS
    Bad usage prints the usage text and exits 2. A malformed address or ticks
    value is refused with one line naming it, exit 2, before the map is
    opened: the file stays byte-for-byte unchanged. delete reports each absent
    address on stderr, goes on with the others, and exits 1. A map that
    cannot be read or written exits 1 with one line saying why.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from typing import Callable, NoReturn, Optional, Sequence, TextIO

from relaymilter import __version__
from relaymilter.errors import ConfigError, StoreUnavailable
from relaymilter.ipaddr import normalize_ip, shorten
from relaymilter.store.relayers import open_relay_store

PROG = "vsmtprelay"
MAX_TICKS = 253402300799  # 9999-12-31 23:59:59 UTC: the last time asctime() can print

USAGE = """\
vsmtprelay {version} usage (optional items in []):
    % vsmtprelay command [arg] [...]
    % vsmtprelay -f file command [arg] [...]     (another relayers.db, or a redis:// URL)
where "command [arg] [...]" can be one of the following:

    "add ip [ticks]"   insert address with current timestamp (or ticks)
    "delete ip [...]"  remove specified address(es)
    "expire [n]"       expire all old (or older than n minutes) entries
    "list [n]"         list all old (or older than n minutes) entries
    "dump"             list every entry, including the future timestamped

IP addresses are expressed as ASCII "dotted quads", e.g. "10.11.12.13".
IPv6 addresses are accepted too, e.g. "2001:db8::1" (stored in RFC 5952 form;
an IPv4-mapped address such as "::ffff:10.11.12.13" is stored as the quad).
All timestamps are stored as ASCII strings representing a count of seconds
elapsed since 0 hours, 0 minutes, 0 seconds, January 1, 1970, Coordinated
Universal Time (the common UNIX epoch).
"""

ARITY = {"add": (1, 2), "delete": (1, None), "expire": (0, 1), "list": (0, 1), "dump": (0, 0)}


class UsageError(Exception):
    """Bad usage: print the usage text, exit 2."""


class BadArgument(Exception):
    """A malformed address, ticks or minutes value: one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, add_help=False, usage=argparse.SUPPRESS)
    p.add_argument("-f", dest="file", metavar="FILE")
    p.add_argument("-c", "--config", dest="config", metavar="CONFIG")
    p.add_argument("--now", dest="now", metavar="TICKS", help="act as if the time were TICKS")
    p.add_argument("-h", "--help", action="store_true")
    p.add_argument("--version", action="store_true")
    p.add_argument("command", nargs="?")
    p.add_argument("args", nargs=argparse.REMAINDER)
    return p


def parse_ticks_arg(text: str, what: str = "ticks") -> int:
    if not re.fullmatch(r"[0-9]{1,12}", text) or int(text) > MAX_TICKS:
        raise BadArgument("invalid %s value: %r (want seconds since the epoch, 0..%d)" % (what, shorten(text), MAX_TICKS))
    return int(text)


def parse_minutes(text: str) -> int:
    if not re.fullmatch(r"[0-9]{1,9}", text):
        raise BadArgument("invalid minutes value: %r (want a whole number of minutes)" % shorten(text))
    return int(text)


def parse_address(text: str) -> str:
    try:
        return normalize_ip(text)
    except ValueError as exc:
        raise BadArgument(str(exc)) from None


def format_entries(entries: Sequence[tuple[str, int]], out: TextIO) -> None:
    for address, ticks in entries:
        try:
            stamp = time.asctime(time.gmtime(ticks))
        except (OverflowError, ValueError, OSError):
            stamp = "(out of range)"
        out.write("# timestamp (UTC): %s\n%s %d\n" % (stamp, address, ticks))


def command_args(opts: argparse.Namespace, arity: dict[str, tuple[int, Optional[int]]]) -> tuple[str, list[str]]:
    """The command and its arguments, their number checked against *arity*
    (command -> (fewest, most or None)); UsageError otherwise."""
    command, args = opts.command, list(opts.args)
    if command not in arity:
        raise UsageError("unknown command %r" % command if command else "no command given")
    low, high = arity[command]
    if len(args) < low or (high is not None and len(args) > high):
        raise UsageError("wrong number of arguments for %r" % command)
    return command, args


def run(opts: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    command, args = command_args(opts, ARITY)
    now = parse_ticks_arg(opts.now, "--now") if opts.now is not None else int(time.time())

    # Validate every argument before the map is opened: a typo never touches the file.
    if command == "add":
        entries = {parse_address(args[0]): parse_ticks_arg(args[1]) if len(args) > 1 else now}
    elif command == "delete":
        addresses = [parse_address(a) for a in args]
    elif command in ("expire", "list"):
        cutoff = now - 60 * parse_minutes(args[0]) if args else now

    location = opts.file
    if not location:
        from relaymilter.config import load_config

        location = load_config(opts.config).relayers.location
    store = open_relay_store(location)
    try:
        if command == "add":
            store.add(entries)
        elif command == "delete":
            missing = store.delete(addresses)
            for address in missing:
                err.write("%s: %s: not found\n" % (PROG, address))
            return 1 if missing else 0
        elif command == "expire":
            store.expire(cutoff)
        elif command == "list":
            format_entries([e for e in store.entries() if e[1] <= cutoff], out)
        else:
            format_entries(store.entries(), out)
    finally:
        store.close()
    return 0


def classic_main(prog: str, usage: str, parser: argparse.ArgumentParser,
                 run: Callable[[argparse.Namespace, TextIO, TextIO], int], argv: Optional[Sequence[str]]) -> int:
    """main() of a classic-style command (vsmtprelay, relaymilter-guard): *parser* (build_parser()'s),
    then *run*; -h prints *usage* (exit 0), bad usage prints it (exit 2), errors are one line."""
    out, err = sys.stdout, sys.stderr
    try:
        opts = parser.parse_args(argv)
        if opts.help:
            out.write(usage)
            return 0
        if opts.version:
            out.write("%s %s\n" % (prog, __version__))
            return 0
        if opts.command is None:
            raise UsageError("")
        return run(opts, out, err)
    except UsageError as exc:
        if str(exc):
            err.write("%s: error: %s\n" % (prog, exc))
        err.write(usage)
        return 2
    except (BadArgument, ConfigError) as exc:
        err.write("%s: error: %s\n" % (prog, exc))
        return 2
    except StoreUnavailable as exc:
        err.write("%s: error: %s\n" % (prog, exc))
        return 1
    except BrokenPipeError:
        return 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    return classic_main(PROG, USAGE.format(version=__version__), build_parser(), run, argv)

if __name__ == "__main__":
    sys.exit(main())
