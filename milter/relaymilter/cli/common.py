"""NAME
    relaymilter.cli.common - small pieces the command-line entry points share

DESCRIPTION
    Foreground tools (relaymilter-popwatch, relaymilter-mirror) log to stderr
    in one shape, `TIME PROG: LEVEL: message`, which systemd's journal keeps
    as is. Only the "relaymilter" logger tree is configured, so a library
    embedding these modules keeps its own logging.
"""

from __future__ import annotations

import logging
import sys


def stderr_logging(prog: str, debug: bool) -> None:
    """Send the relaymilter loggers to stderr at INFO (DEBUG with --debug)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s " + prog + ": %(levelname)s: %(message)s"))
    root = logging.getLogger("relaymilter")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    root.propagate = False
