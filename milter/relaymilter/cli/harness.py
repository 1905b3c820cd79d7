"""NAME
    relaymilter-test - ask a running milter what it would answer, without an MTA

SYNOPSIS
    relaymilter-test --socket SPEC --client IP [--helo NAME] [--auth USER]
                     --from ADDR --rcpt ADDR [--rcpt ADDR ...] [--message FILE]
                     [--timeout SECONDS]
    relaymilter-test [--socket SPEC] [--timeout SECONDS] SCENARIO.yaml [...]
    relaymilter-test [-c FILE] --lookup ADDR [--lookup ADDR ...]

DESCRIPTION
    Session mode plays one SMTP session through the milter protocol and
    prints one line per step with the milter's full answer:

        CONNECT 127.0.0.5: continue
        MAIL <alice@example.com>: continue
        RCPT <bob@remote.example>: 550 5.7.1 Relaying denied

    The client address is only claimed in the CONNECT step; nothing is sent
    to it. Scenario mode runs YAML files of named sessions with expected
    answers (see relaymilter.harness.scenario) and prints a pass/fail report;
    the socket on the command line wins over the file's.

    Lookup mode answers "is this recipient known, and by which source?"
    from the configuration (-c FILE, else the file relaymilter would read)
    and the local_recipients sources themselves, through the same steps the
    milter takes, without a milter running:

        <alice+tag@example.com>: resolves to alice+tag@example.com: known (list /etc/relaymilter/local-users); rule=local_domain source=list
        <nobody@example.com>: resolves to nobody@example.com: 550 5.1.1 User unknown; rule=unknown_recipient

EXIT STATUS
    0  session mode: the milter answered (whatever it answered);
       scenario mode: every expectation met; lookup mode: every address accepted
    1  the milter could not be reached or broke the protocol; a scenario failed;
       lookup mode: an address would be refused or tempfailed
    2  bad usage, an invalid scenario file or configuration (FILE:LINE: message)
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Sequence, Tuple

from relaymilter import __version__
from relaymilter.harness.errors import ScenarioError, SocketSpecError
from relaymilter.harness.runner import SessionSpec, run_session
from relaymilter.harness.scenario import format_outcome, load_scenarios, run_file
from relaymilter.harness.sockspec import parse_socket_spec
from relaymilter.ipaddr import parse_ip

PROG = "relaymilter-test"
# Session-mode options (argparse dest -> flag), refused together with scenario files.
_SESSION_OPTIONS = {"client": "--client", "client_name": "--client-name", "helo": "--helo", "auth": "--auth",
                    "mail_from": "--from", "rcpts": "--rcpt", "message": "--message"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Ask a running milter what it would answer for an SMTP session, without an MTA.",
        epilog="SPEC is inet:PORT@HOST, inet6:PORT@HOST, unix:/path or local:/path. "
               "Exit 0: the milter answered (all scenarios passed); 1: unreachable, "
               "protocol error or failed scenario; 2: bad usage.")
    p.add_argument("scenarios", nargs="*", metavar="SCENARIO.yaml",
                   help="run these scenario files instead of a single session")
    p.add_argument("--socket", metavar="SPEC", help="the milter's socket")
    p.add_argument("--client", metavar="IP", help="client address claimed in CONNECT")
    p.add_argument("--client-name", metavar="NAME", help="client host name (default [IP])")
    p.add_argument("--helo", metavar="NAME", help="HELO/EHLO name (no HELO step when omitted)")
    p.add_argument("--auth", metavar="USER", help="authenticated user, sent as {auth_authen} with MAIL")
    p.add_argument("--from", dest="mail_from", metavar="ADDR", help="envelope sender")
    p.add_argument("--rcpt", dest="rcpts", action="append", metavar="ADDR", help="recipient (repeatable)")
    p.add_argument("--message", metavar="FILE",
                   help="send this message's headers and body after the recipients ('-' for stdin)")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="seconds to wait for each answer")
    p.add_argument("-c", "--config", metavar="FILE",
                   help="lookup mode: the configuration (default: the one relaymilter would read)")
    p.add_argument("--lookup", action="append", metavar="ADDR",
                   help="lookup mode: say whether this recipient is known, by which source (repeatable)")
    p.add_argument("--version", action="version", version="%(prog)s " + __version__)
    return p


def parse_message(raw: bytes) -> Tuple[List[Tuple[str, str]], bytes]:
    """Split an RFC 5322 message into (headers, body); folded lines keep their line break."""
    text = raw.replace(b"\r\n", b"\n")
    head, sep, body = text.partition(b"\n\n")
    if not sep and not head.split(b"\n", 1)[0].count(b":"):
        return [], text  # no header block at all: everything is body
    headers: List[Tuple[str, str]] = []
    for line in head.decode("utf-8", errors="replace").split("\n"):
        if line[:1] in (" ", "\t") and headers:
            name, value = headers[-1]
            headers[-1] = (name, value + "\n" + line)
        elif ":" in line:
            name, _, value = line.partition(":")
            headers.append((name.strip(), value.strip()))
        elif line:
            raise ValueError("not a header line: %r" % line[:60])
    return headers, body


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.timeout is not None and args.timeout <= 0:
        parser.error("--timeout must be positive")
    if args.socket is not None:
        try:
            parse_socket_spec(args.socket)
        except SocketSpecError as err:
            parser.error(str(err))
    if args.lookup:
        given = [flag for dest, flag in _SESSION_OPTIONS.items() if getattr(args, dest) is not None]
        given += ["--socket"] if args.socket else []
        given += ["SCENARIO.yaml"] if args.scenarios else []
        if given:
            parser.error("--lookup cannot be combined with %s" % ", ".join(given))
        return _run_lookups(args)
    if args.config is not None:
        parser.error("-c/--config is for --lookup")
    if args.scenarios:
        given = [flag for dest, flag in _SESSION_OPTIONS.items() if getattr(args, dest) is not None]
        if given:
            parser.error("scenario files cannot be combined with %s" % ", ".join(given))
        return _run_scenarios(args)
    return _run_one(parser, args)


def _error(message: str) -> None:
    sys.stderr.write("%s: error: %s\n" % (PROG, message))


def _run_one(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    missing = [flag for flag, value in (("--socket", args.socket), ("--client", args.client),
                                        ("--from", args.mail_from), ("--rcpt", args.rcpts)) if not value]
    if missing:
        parser.error("missing %s (or give SCENARIO.yaml files)" % ", ".join(missing))
    try:
        parse_ip(args.client)
    except ValueError as err:
        parser.error("--client: %s" % err)
    headers, body = None, None
    if args.message is not None:
        try:
            if args.message == "-":
                raw = sys.stdin.buffer.read()
            else:
                with open(args.message, "rb") as fh:
                    raw = fh.read()
            headers, body = parse_message(raw)
        except OSError as err:
            parser.error("--message: cannot read %s: %s" % (args.message, err.strerror or err))
        except ValueError as err:
            parser.error("--message: %s" % err)
    spec = SessionSpec(client=args.client, client_name=args.client_name, helo=args.helo, auth=args.auth,
                       mail_from=args.mail_from, rcpts=tuple(args.rcpts), headers=headers, body=body)
    result = run_session(args.socket, spec, timeout=args.timeout or 10.0)
    for step in result:
        # A multi-line SMTP reply keeps its lines, indented under the step.
        print(("%s: %s" % (step.label, step.describe())).replace("\n", "\n    "))
        if step.reply is not None:
            for mod in step.reply.modifications:
                print("  %s" % mod)
    if result.error is not None:
        _error(str(result.error))
        return 1
    return 0


def _run_lookups(args: argparse.Namespace) -> int:
    from relaymilter.config import load_config
    from relaymilter.errors import ConfigError
    from relaymilter.recipientlookup import explain, open_sources, rcpt_policy

    try:
        config = load_config(args.config)
    except ConfigError as err:
        _error(str(err))
        return 2
    sources, policy = open_sources(config), rcpt_policy(config)
    ok = True
    for address in args.lookup:
        answer = explain(config, sources, address, policy)
        print("%s: %s" % (answer.address, answer.text))
        ok = ok and answer.ok
    return 0 if ok else 1


def _run_scenarios(args: argparse.Namespace) -> int:
    try:
        loaded = [load_scenarios(path) for path in args.scenarios]
        for sf in loaded:
            if not (args.socket or sf.socket):
                raise ScenarioError("%s: no socket: give --socket or put 'socket:' in the file" % sf.path)
    except ScenarioError as err:
        _error(str(err))
        return 2
    passed = failed = 0
    for sf in loaded:
        for outcome in run_file(sf, args.socket, args.timeout):
            for line in format_outcome(outcome):
                print(line)
            if outcome.passed:
                passed += 1
            else:
                failed += 1
    print("%s: %d sessions: %d pass, %d fail" % (PROG, passed + failed, passed, failed))
    return 0 if failed == 0 else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
