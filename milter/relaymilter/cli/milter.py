"""NAME
    relaymilter - the relay-control milter for sendmail and Postfix

SYNOPSIS
    relaymilter [-c FILE] [--socket SPEC] [--workers N|auto] [--log stderr|syslog] [--debug]
    relaymilter [-c FILE] --check-config

DESCRIPTION
    Runs in the foreground. With no arguments it serves the bundled default
    rules on inet:8894@127.0.0.1 (see relaymilter.config.find_config for
    which file is read), with one worker process per CPU it may use.
    SIGHUP re-reads the configuration and the domain files for new
    connections, without dropping any; a broken new file keeps the old rules
    running in every worker and says why. SIGTERM (or SIGINT) stops cleanly.
    relaymilter.supervisor says how the processes work together.

DIAGNOSTICS
    Exit 2 with `relaymilter: error: FILE:LINE: message` for a bad
    configuration, or a socket without a host (inet:PORT would listen on
    every interface); exit 1 if the socket cannot be opened (the message
    names the cause, e.g. EADDRINUSE or EACCES).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import logging.handlers
import os
import sys
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from relaymilter import __version__
from relaymilter.config import Config, load_config, parse_workers, socket_problem
from relaymilter.errors import ConfigError

if TYPE_CHECKING:
    from relaymilter.decisionlog import DecisionLog

PROG = "relaymilter"

log = logging.getLogger("relaymilter")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Refuse relaying the way sendmail's check_rcpt does, "
                                "with relayers.db as the POP-before-SMTP map.")
    p.add_argument("-c", "--config", metavar="FILE", help="configuration file (default: bundled rules)")
    p.add_argument("--socket", metavar="SPEC", help="inet:PORT@HOST, inet6:PORT@HOST or unix:/path")
    p.add_argument("--workers", metavar="N|auto", help="worker processes (default: the config's workers, auto)")
    p.add_argument("--check-config", action="store_true", help="validate the configuration and exit")
    p.add_argument("--log", choices=("stderr", "syslog"), help="where decisions are logged")
    p.add_argument("--debug", action="store_true", help="log at debug level")
    p.add_argument("--version", action="version", version="%s %s" % (PROG, __version__))
    return p


def setup_logging(config: Config, target: Optional[str], debug: bool) -> None:
    root = logging.getLogger("relaymilter")
    root.handlers.clear()
    where = target or config.log
    if where == "syslog":
        handler: logging.Handler = logging.handlers.SysLogHandler(
            address="/dev/log", facility=logging.handlers.SysLogHandler.LOG_MAIL)
        handler.setFormatter(logging.Formatter("relaymilter[%(process)d]: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s relaymilter[%(process)d]: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else getattr(logging, config.log_level.upper()))
    root.propagate = False


def decision_log(config: Config, opts: argparse.Namespace) -> "DecisionLog":
    """Where the one-line-per-decision log goes (see relaymilter.decisionlog)."""
    from relaymilter.decisionlog import DecisionLog, stream_sink, syslog_sink

    if not logging.getLogger("relaymilter").isEnabledFor(logging.INFO):
        return DecisionLog(None)
    if (opts.log or config.log) == "syslog":
        try:
            return DecisionLog(syslog_sink())
        except OSError as exc:
            log.error("cannot reach syslog at /dev/log (%s); decisions go to stderr", exc)
    return DecisionLog(stream_sink(sys.stderr.fileno()))


def describe(config: Config) -> str:
    r = config.relayers
    limits = config.limits.table() if config.limits is not None else {}
    extra = ", limits %s" % " ".join("%s=%d" % kv for kv in sorted(limits.items())) if limits else ""
    if limits and config.limits is not None and config.limits.suspend_minutes:
        extra += " suspend=%dmin" % config.limits.suspend_minutes
    lr = config.local_recipients
    if lr.enabled:
        named = (["passwd"] if lr.passwd else []) + ["%d %s" % (len(paths), kind) for kind, paths in
                                                     (("aliases", lr.aliases), ("lists", lr.lists), ("maps", lr.maps))
                                                     if paths]
        extra += ", local recipients from %s" % ", ".join(named)
    if config.modes.warn:
        extra += ", warn only: %s" % " ".join(sorted(config.modes.warn))
    return "%s: %d local names, %d relay domains, %d trusted networks, relayers %s%s, spammers %s%s" % (
        config.source, len(config.local_domains), len(config.relay_domains), len(config.trusted_networks),
        r.location, " (window %d min)" % r.window if r.window else "", os.path.expanduser(config.spammers.path),
        extra)


def serve_worker(opts: argparse.Namespace) -> Callable[[Config, int], int]:
    """What a forked worker runs: the decision log is made there (its writer is a thread)."""

    def serve(config: Config, control: int) -> int:
        from relaymilter import worker

        worker.die_with_parent(os.getppid())
        return worker.run(config, control, decision_log(config, opts), describe)

    return serve


def worker_count(config: Config, opts: argparse.Namespace) -> int:
    from relaymilter.supervisor import cpu_count

    n = parse_workers(opts.workers) if opts.workers is not None else config.workers
    return n if n is not None else cpu_count()


def main(argv: Optional[Sequence[str]] = None) -> int:
    opts = build_parser().parse_args(argv)
    try:
        config = load_config(opts.config)
    except ConfigError as exc:
        sys.stderr.write("%s: error: %s\n" % (PROG, exc))
        return 2
    socket_spec = opts.socket or config.socket
    problem = socket_problem(socket_spec)
    if problem:
        sys.stderr.write("%s: error: %s: %s\n" % (PROG, "--socket" if opts.socket else "socket", problem))
        return 2
    try:
        workers = worker_count(config, opts)
    except ValueError as exc:
        sys.stderr.write("%s: error: --workers %s\n" % (PROG, exc))
        return 2
    if opts.check_config:
        sys.stdout.write("%s: configuration OK: %s\n" % (PROG, describe(config)))
        return 0
    # pymilter is loaded before the fork: missing, it is one line from the
    # command (relaymilter.cli.entry), not a child that dies unexplained.
    importlib.import_module("relaymilter.adapter")
    setup_logging(config, opts.log, opts.debug)
    from relaymilter.supervisor import Supervisor

    return Supervisor(config, socket_spec, workers, lambda: load_config(opts.config), serve_worker(opts),
                      describe).run()


if __name__ == "__main__":
    sys.exit(main())
