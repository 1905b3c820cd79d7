"""NAME
    relaymilter-popwatch - record POP/IMAP logins from the mail log in relayers.db

SYNOPSIS
    relaymilter-popwatch [-c FILE] [--grace=SECONDS] [--logfile=FILE ...]
        [--source=auto|journal|files] [--dbfile=FILE|URL] [--[no]write] [--[no]flock] [--[no]debug]
        [--readback|--reprocess] [--pattern=NAME ...] [--pattern-file=FILE]
        [--max-session=SECONDS]
    relaymilter-popwatch --test LOGFILE | --list | --dumpconfig | --version

DESCRIPTION
    The log watcher of POP-before-SMTP, with the classic pop-before-smtp
    flags: it follows the mail log (across rotation), and every successful
    POP3/IMAP login puts the client's address into relayers.db, where the
    milter (or sendmail/Postfix directly) finds it. The address expires
    ``grace`` seconds after the last login (or logout), on a timer.

    Runs in the foreground, logging to stderr (systemd-friendly). SIGHUP
    reloads the configuration and patterns and reopens the logs; SIGTERM
    and SIGINT write what is pending and exit 0.

    --source      where logins are read: the log files, the systemd journal
                  (only lines whose sender popwatch.journal_senders accepts:
                  they cannot be forged), or auto (the journal when journald
                  runs). Default popwatch.source; --logfile alone means files.
    --nowrite     never touches the map; logs what it would record/expire.
    --noflock     accepted for compatibility only: the map is always locked
                  (flock), as sendmail and Postfix expect.
    --readback    (also --reprocess) at start, re-read the last grace seconds
                  (grace + max_session with logout patterns) of the log by the
                  lines' own timestamps: a restart loses no one.
    --test FILE   read FILE once and print each login it would record (time,
                  address, pattern) and a summary; writes nothing.
    --list        print the patterns in use; --dumpconfig the effective
                  settings.

DIAGNOSTICS
    A bad configuration or pattern file: one ``relaymilter-popwatch: error:
    FILE:LINE: ...`` line, exit 2; bad usage exit 2. A store that cannot be
    opened, or the journal source without journalctl or without read access
    to the journal: exit 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Optional, Sequence, TextIO

from relaymilter import __version__
from relaymilter.cli.common import stderr_logging
from relaymilter.config import load_config
from relaymilter.decisionlog import printable
from relaymilter.errors import ConfigError, StoreUnavailable
from relaymilter.metrics import MetricsError
from relaymilter.popwatch.matcher import Matcher
from relaymilter.popwatch.journal import JournalError
from relaymilter.popwatch.patterns import PatternSet, default_pattern_file, load_patterns
from relaymilter.popwatch.readback import read_file
from relaymilter.popwatch.recorder import DEFAULT_MAX_SESSION, Tracker
from relaymilter.popwatch.service import Settings, Watcher
from relaymilter.popwatchconfig import SOURCES, journal_running

PROG = "relaymilter-popwatch"
USER_MAX = 256          # characters of a user name shown (escaped: a log line cannot forge output lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Record POP/IMAP logins from the mail log in relayers.db "
                                       "(POP-before-SMTP).")
    p.add_argument("-c", "--config", metavar="FILE", help="relaymilter YAML configuration")
    p.add_argument("--grace", type=int, metavar="SECONDS", help="keep an address this long after the last login")
    p.add_argument("--max-session", type=int, metavar="SECONDS", dest="max_session",
                   help="longest a session without a logout line keeps its address "
                        "(default: popwatch.max_session, %d)" % DEFAULT_MAX_SESSION)
    p.add_argument("--logfile", "--watchlog", action="append", metavar="FILE", dest="logfiles",
                   help="log file to follow (repeatable; replaces popwatch.logfiles)")
    p.add_argument("--source", choices=SOURCES, help="read logins from the log files, the systemd journal "
                   "(senders checked: cannot be forged), or auto: the journal when journald runs "
                   "(default: popwatch.source; --logfile alone means files)")
    p.add_argument("--dbfile", metavar="FILE|URL", help="relayers map: a path or a redis:// URL")
    p.add_argument("--pattern", action="append", metavar="NAME", dest="patterns",
                   help="use this pattern (repeatable, or comma-separated; default: all)")
    p.add_argument("--pattern-file", metavar="FILE", dest="pattern_file", help="pattern file instead of the bundled one")
    p.add_argument("--write", dest="write", action="store_true", default=None, help="write the map (default)")
    p.add_argument("--nowrite", "--no-write", dest="write", action="store_false", help="never touch the map")
    p.add_argument("--flock", dest="flock", action="store_true", default=None, help="lock the map (always done)")
    p.add_argument("--noflock", "--no-flock", dest="flock", action="store_false",
                   help="accepted for compatibility; the map is always locked")
    p.add_argument("--debug", dest="debug", action="store_true", default=False, help="log debug details")
    p.add_argument("--nodebug", "--no-debug", dest="debug", action="store_false")
    p.add_argument("--readback", "--reprocess", dest="readback", action="store_true", default=None,
                   help="at start, re-read the last grace (+ max_session) seconds of the logs")
    p.add_argument("--noreadback", dest="readback", action="store_false")
    p.add_argument("--test", metavar="LOGFILE", help="print what LOGFILE would record, write nothing")
    p.add_argument("--list", action="store_true", help="print the patterns in use and exit")
    p.add_argument("--dumpconfig", action="store_true", help="print the effective settings and exit")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    return p


def resolve(opts: argparse.Namespace) -> tuple[Settings, PatternSet]:
    """Configuration file + command line -> effective settings and the selected patterns."""
    cfg = load_config(opts.config)
    pw = cfg.popwatch
    names: Optional[list[str]] = None
    if opts.patterns:
        names = [n for item in opts.patterns for n in item.split(",") if n.strip()]
    elif pw.patterns is not None:
        names = list(pw.patterns)
    pattern_file = opts.pattern_file or pw.pattern_file or default_pattern_file()
    patterns = load_patterns(pattern_file, names)
    grace = pw.grace if opts.grace is None else opts.grace
    if grace < 1:
        raise ConfigError("--grace must be at least 1 second")
    max_session = pw.max_session if opts.max_session is None else opts.max_session
    if max_session < 1:
        raise ConfigError("--max-session must be at least 1 second")
    skip = pw.skip_networks if pw.skip_networks is not None else cfg.trusted_networks
    source = opts.source or ("files" if opts.logfiles else pw.source)
    if source == "auto":
        source = "journal" if journal_running() else "files"
    settings = Settings(
        logfiles=tuple(opts.logfiles) if opts.logfiles else tuple(pw.logfiles),
        dbfile=opts.dbfile or cfg.relayers.location,
        grace=grace,
        max_session=max_session,
        skip_networks=tuple(skip),
        readback=pw.readback if opts.readback is None else opts.readback,
        write=pw.write if opts.write is None else opts.write,
        pattern_file=patterns.source,
        patterns=patterns.names,
        config=cfg.source,
        limits=cfg.limits,
        limits_warn="limits" in cfg.modes.warn,
        metrics_listen=cfg.metrics.popwatch_listen,
        source=source,
        journal_senders=pw.journal_senders,
        journal_cursor=pw.journal_cursor,
    )
    return settings, patterns


def dump_settings(s: Settings, out: TextIO) -> None:
    yes = {True: "yes", False: "no"}
    rows = [
        ("config", s.config),
        ("source", s.source),
        ("logfiles", ", ".join(s.logfiles)),
        ("journal_senders", "; or ".join(x.describe() for x in s.journal_senders)),
        ("journal_cursor", s.journal_cursor or "(none)"),
        ("dbfile", s.dbfile),
        ("grace", "%d" % s.grace),
        ("max_session", "%d" % s.max_session),
        ("patterns", ", ".join(s.patterns)),
        ("pattern_file", s.pattern_file),
        ("skip_networks", ", ".join(str(n) for n in s.skip_networks) or "(none)"),
        ("readback", yes[s.readback]),
        ("write", yes[s.write]),
        ("flock", "yes (always)"),
        ("metrics", "%s:%d" % s.metrics_listen if s.metrics_listen else "off"),
        ("version", __version__),
    ]
    for key, value in rows:
        out.write("%-14s %s\n" % (key + ":", value))


def list_patterns(patterns: PatternSet, out: TextIO) -> None:
    out.write("# patterns from %s\n" % patterns.source)
    for p in patterns.patterns:
        out.write("%s: %s\n" % (p.name, p.server))
        for r in p.rules:
            pre = " | ".join(x.decode("utf-8", "replace") for x in r.prefilters) or "(none)"
            out.write("    %-8s %s\n    %-8s prefilter: %s\n" % (r.kind, r.text, "", pre))


def run_test(path: str, s: Settings, patterns: PatternSet, out: TextIO) -> int:
    """Read *path* once; print the logins it holds and a summary. Writes nothing."""
    matcher = Matcher(patterns)
    tracker = Tracker(None, s.grace, s.max_session, s.skip_networks, write=False)
    lines = 0
    now = time.time()
    for block in read_file(path):
        lines += block.count(b"\n")
        for ev in matcher.scan(block, now):
            ip = tracker.handle(ev, now, backlog=True) if ev.ts is not None else tracker.handle(ev, now)
            if ev.kind == "login" and ip is not None:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ev.ts)) if ev.ts is not None else "-"
                user = "  user=%s" % printable(ev.user, USER_MAX) if ev.user else ""
                out.write("%s  %-39s  %s%s\n" % (when, ip, ev.pattern, user))
    st = tracker.stats + matcher.stats
    out.write("# %d lines read, %d logins (%d addresses), %d logouts, %d invalid addresses, %d in skipped networks,"
              " %d binary lines skipped, %d lines not UTF-8\n" % (
                  lines, st["logins"], tracker.addresses, st["logouts"], st["invalid_ip"], st["skipped_local"],
                  st["binary"], st["nonutf8"]))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    out, err = sys.stdout, sys.stderr
    try:
        opts = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if opts.version:
        out.write("%s %s\n" % (PROG, __version__))
        return 0
    try:
        settings, patterns = resolve(opts)
        if opts.list:
            list_patterns(patterns, out)
            return 0
        if opts.dumpconfig:
            dump_settings(settings, out)
            return 0
        if opts.test:
            logging.getLogger("relaymilter").setLevel(logging.ERROR)
            return run_test(opts.test, settings, patterns, out)
        stderr_logging(PROG, opts.debug)
        log = logging.getLogger("relaymilter.popwatch")
        if opts.flock is False:
            log.info("--noflock ignored: the relayers map is always locked (sendmail and Postfix rely on it)")
        first = [True]

        def load() -> tuple[Settings, PatternSet]:
            # The first load is the one just done; a SIGHUP reads the files again.
            if first[0]:
                first[0] = False
                return settings, patterns
            return resolve(opts)

        watcher = Watcher(load)
        if settings.metrics_listen is None:
            return watcher.run()
        from relaymilter.metrics.popwatch import serve_watcher

        endpoint = serve_watcher(watcher, settings.metrics_listen)
        log.info("metrics on %s", endpoint.url)
        try:
            return watcher.run()
        finally:
            endpoint.stop()
    except MetricsError as exc:
        err.write("%s: error: %s\n" % (PROG, exc))
        return 1
    except ConfigError as exc:
        err.write("%s: error: %s\n" % (PROG, exc))
        return 2
    except FileNotFoundError as exc:
        err.write("%s: error: %s: %s\n" % (PROG, exc.filename, exc.strerror))
        return 1
    except (StoreUnavailable, JournalError) as exc:
        err.write("%s: error: %s\n" % (PROG, exc))
        return 1
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
