"""NAME
    relaymilter - the relay-control milter for sendmail and Postfix

SYNOPSIS
    relaymilter [-c FILE] [--socket SPEC] [--log stderr|syslog] [--debug]
    relaymilter [-c FILE] --check-config

DESCRIPTION
    Runs in the foreground. With no arguments it serves the bundled default
    rules on inet:8894@127.0.0.1 (see relaymilter.config.find_config for
    which file is read). SIGHUP re-reads the configuration and the domain
    files for new connections, without dropping any; a broken new file keeps
    the old rules running and says why. SIGTERM (or SIGINT) stops cleanly.

    Why two processes: libmilter runs its own signal thread that sigwait()s
    SIGHUP, SIGTERM and SIGINT and *stops* the milter on SIGHUP. So a small
    supervisor owns the signals: it forwards SIGTERM/SIGINT to the libmilter
    child, and turns SIGHUP into a "reload" message on a pipe the child reads
    in a thread of its own. If the child dies, the supervisor exits non-zero
    (systemd's Restart=on-failure brings it back).

DIAGNOSTICS
    Exit 2 with `relaymilter: error: FILE:LINE: message` for a bad
    configuration; exit 1 if the milter could not start or died.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import logging.handlers
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Optional, Sequence

from relaymilter import __version__
from relaymilter.config import SOCKET_RE, Config, load_config
from relaymilter.errors import ConfigError

if TYPE_CHECKING:
    from relaymilter.decisionlog import DecisionLog

PROG = "relaymilter"
STOP_WAIT = 30.0   # seconds the supervisor waits for the milter after SIGTERM

log = logging.getLogger("relaymilter")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Refuse relaying the way sendmail's check_rcpt does, "
                                "with relayers.db as the POP-before-SMTP map.")
    p.add_argument("-c", "--config", metavar="FILE", help="configuration file (default: bundled rules)")
    p.add_argument("--socket", metavar="SPEC", help="inet:PORT@HOST, inet6:PORT@HOST or unix:/path")
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
    return "%s: %d local names, %d relay domains, %d trusted networks, relayers %s%s, spammers %s" % (
        config.source, len(config.local_domains), len(config.relay_domains), len(config.trusted_networks),
        r.location, " (window %d min)" % r.window if r.window else "", os.path.expanduser(config.spammers.path))


def _child(config: Config, opts: argparse.Namespace, socket_spec: str, control: int) -> int:
    """The libmilter process: serve until stopped; reload on a message from the supervisor."""
    from relaymilter import adapter  # imports pymilter; only the child needs it

    holder = adapter.RuntimeHolder(adapter.Runtime(config), decision_log(config, opts))

    def reload() -> None:
        try:
            new = load_config(opts.config)
        except ConfigError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            return
        if (opts.socket or new.socket) != socket_spec:
            log.warning("reload: the socket cannot change while running (still %s); restart to move it", socket_spec)
        holder.swap(new)
        log.info("reloaded %s", describe(new))

    def listen() -> None:
        while True:
            try:
                data = os.read(control, 64)
            except OSError:
                data = b""
            if not data:          # the supervisor is gone: stop serving
                adapter.stop()
                return
            for _ in range(data.count(b"R")):
                reload()

    threading.Thread(target=listen, name="reload", daemon=True).start()
    log.info("starting on %s; %s", socket_spec, describe(config))
    try:
        adapter.run(holder, socket_spec)
    except Exception as exc:  # noqa: BLE001 - pymilter raises milter.error (not importable here) on start failure
        log.error("cannot serve on %s: %s", socket_spec, exc)
        return 1
    log.info("stopped")
    holder.decisions.close()
    return 0


def supervise(config: Config, opts: argparse.Namespace, socket_spec: str) -> int:
    """Fork the libmilter child and translate signals for it (see the module header)."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(wfd)
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        code = 1
        try:
            code = _child(config, opts, socket_spec, rfd)
        finally:
            logging.shutdown()
            os._exit(code)
    os.close(rfd)
    stopping = {"at": 0.0}

    def on_hup(signum: int, frame: object) -> None:
        try:
            os.write(wfd, b"R")
        except OSError:
            pass

    def on_term(signum: int, frame: object) -> None:
        if not stopping["at"]:
            stopping["at"] = time.monotonic()
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGHUP, on_hup)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return 1
        if done:
            break
        if stopping["at"] and time.monotonic() - stopping["at"] > STOP_WAIT:
            log.error("milter did not stop within %gs; killing it", STOP_WAIT)
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    os.close(wfd)
    code = os.waitstatus_to_exitcode(status)
    if stopping["at"]:
        return 0 if code in (0, -signal.SIGTERM, -signal.SIGKILL) else 1
    log.error("milter process exited unexpectedly (status %d)", code)
    return 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    opts = build_parser().parse_args(argv)
    try:
        config = load_config(opts.config)
    except ConfigError as exc:
        sys.stderr.write("%s: error: %s\n" % (PROG, exc))
        return 2
    socket_spec = opts.socket or config.socket
    if not SOCKET_RE.match(socket_spec):
        sys.stderr.write("%s: error: --socket: want inet:PORT@HOST, inet6:PORT@HOST or unix:/path, got %r\n"
                         % (PROG, socket_spec))
        return 2
    if opts.check_config:
        sys.stdout.write("%s: configuration OK: %s\n" % (PROG, describe(config)))
        return 0
    # pymilter is loaded before the fork: missing, it is one line from the
    # command (relaymilter.cli.entry), not a child that dies unexplained.
    importlib.import_module("relaymilter.adapter")
    setup_logging(config, opts.log, opts.debug)
    return supervise(config, opts, socket_spec)


if __name__ == "__main__":
    sys.exit(main())
