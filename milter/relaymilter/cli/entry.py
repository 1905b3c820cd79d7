"""NAME
    relaymilter.cli.entry - the installed commands' entry points

DESCRIPTION
    Each console script (setup.cfg) calls one function here, which imports
    the command's module and runs its main(). Importing it here, rather than
    naming relaymilter.cli.NAME:main in setup.cfg, lets a module from
    another project that is missing at import time be reported the same way
    as one missing later: one `PROG: error: ...` line naming what to install
    (relaymilter.pydeps), exit status 2, never a traceback.

DIAGNOSTICS
    A ModuleNotFoundError for a module relaymilter.pydeps does not know is
    not caught: that is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import sys

from relaymilter import pydeps

# command name -> module with build_parser() and main(argv=None) -> int
COMMANDS = {
    "relaymilter": "relaymilter.cli.milter",
    "vsmtprelay": "relaymilter.cli.vsmtprelay",
    "vnewspammers": "relaymilter.cli.vnewspammers",
    "relaymilter-popwatch": "relaymilter.cli.popwatch",
    "relaymilter-test": "relaymilter.cli.harness",
    "relaymilter-mirror": "relaymilter.cli.mirror",
    "relaymilter-guard": "relaymilter.cli.guard",
}

EXIT_MISSING = 2    # like a bad configuration: systemd does not retry it (RestartPreventExitStatus=2)


def run(prog: str) -> int:
    """Run command *prog*; a missing module from another project is one line and exit 2."""
    try:
        main = importlib.import_module(COMMANDS[prog]).main
        return int(main())
    except ModuleNotFoundError as exc:
        line = pydeps.missing(exc)
        if line is None:
            raise
        sys.stderr.write("%s: error: %s\n" % (prog, line))
        return EXIT_MISSING


def relaymilter() -> int:
    return run("relaymilter")


def vsmtprelay() -> int:
    return run("vsmtprelay")


def vnewspammers() -> int:
    return run("vnewspammers")


def popwatch() -> int:
    return run("relaymilter-popwatch")


def harness() -> int:
    return run("relaymilter-test")


def mirror() -> int:
    return run("relaymilter-mirror")


def guard() -> int:
    return run("relaymilter-guard")
