"""NAME
    vnewspammers - rebuild spammers.db from the spammers list

SYNOPSIS
    vnewspammers [-c CONFIG] [-f SOURCE] [-o DB]

DESCRIPTION
    The classic virtual-server command: read ~/etc/spammers (one `user@host`
    or `host` per line, `#` comments) and rebuild ~/etc/spammers.db, which
    the milter reads to refuse mail from those envelope senders. The new map
    is written beside the old one and renamed over it, so the milter (and
    sendmail, when a K line names the map) sees the old list or the new one,
    never part of one. Paths come from -f/-o, else from the configuration's
    `spammers: {source, path}`, else the defaults above.

    On success one line: "vnewspammers: wrote N entries to PATH", exit 0.

DIAGNOSTICS
    One line "vnewspammers: error: ..." on stderr. A bad line is named as
    SOURCE:LINE: reason. Exit 1 when the rebuild failed (bad line, missing or
    unreadable source, unwritable target, bad configuration), 2 for bad
    usage. In every failure the old spammers.db stays byte-for-byte as it
    was.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn, Optional, Sequence

from relaymilter import __version__
from relaymilter.config import load_config
from relaymilter.mapsconfig import SpammersConfig
from relaymilter.errors import RelaymilterError
from relaymilter.store.spammers import rebuild

PROG = "vnewspammers"

EPILOG = """\
The source holds one entry per line: a whole sender address (user@host)
or a domain (host), which also lists every subdomain of it. Blank lines
are ignored; '#' at the start of a line or after a space starts a comment.
Matching is case-insensitive. An empty source is allowed and gives an
empty map (nobody is refused); a missing source is an error. A bad line
is reported as SOURCE:LINE: reason and nothing is replaced.

The map is a Berkeley DB hash file like `makemap hash` writes (value
REJECT), readable by sendmail (Kspammers hash /path/spammers) and by
Postfix (check_sender_access hash:/path/spammers). DB.lock beside it
keeps two runs from racing.
"""


class UsageError(Exception):
    """Bad usage: one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Rebuild spammers.db (the blocked senders map) from the spammers list.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-c", "--config", metavar="CONFIG", help="configuration file (for the default paths)")
    p.add_argument("-f", "--source", metavar="SOURCE", help="the list to read (default: ~/etc/spammers)")
    p.add_argument("-o", "--output", metavar="DB", help="the map to write (default: ~/etc/spammers.db)")
    p.add_argument("--version", action="version", version="%s %s" % (PROG, __version__))
    return p


def resolve_paths(opts: argparse.Namespace) -> tuple[str, str]:
    """(source, db) from the options, the configuration, or the classic defaults."""
    source, target = opts.source, opts.output
    if source is None or target is None or opts.config is not None:
        conf = load_config(opts.config).spammers
    else:
        conf = SpammersConfig()
    source = os.path.expanduser(source if source is not None else conf.source)
    target = os.path.expanduser(target if target is not None else conf.path)
    return source, target


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        opts = build_parser().parse_args(argv)
    except UsageError as exc:
        print("%s: error: %s (see %s --help)" % (PROG, exc, PROG), file=sys.stderr)
        return 2
    except SystemExit as exc:           # --help and --version print, then argparse exits
        return exc.code if isinstance(exc.code, int) else 0
    try:
        source, target = resolve_paths(opts)
        if _same_file(source, target):
            print("%s: error: the source and the map are the same file: %s" % (PROG, source), file=sys.stderr)
            return 2
        count = rebuild(source, target)
    except RelaymilterError as exc:
        print("%s: error: %s" % (PROG, exc), file=sys.stderr)
        return 1
    print("%s: wrote %d entries to %s" % (PROG, count, target))
    return 0


if __name__ == "__main__":
    sys.exit(main())
