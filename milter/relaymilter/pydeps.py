"""NAME
    relaymilter.pydeps - the Python modules relaymilter takes from other projects, and what to install when one is missing

DESCRIPTION
    relaymilter imports pymilter (Milter, milter), PyYAML (yaml), Berkeley DB
    (berkeleydb, or the same module as Debian 12 packages it, bsddb3),
    redis-py (redis; only Redis stores and relaymilter-mirror import it),
    dnspython (dns; DNS blocklists) and prometheus_client (metrics).
    Those in install_requires (setup.cfg) are dependencies of the pip install
    and of the Debian package alike, so a missing one means an install that skipped dependencies
    (pip --no-deps, dpkg --force-depends, a copied tree) or a module removed
    later. The commands then stop with one line that names the module, what
    needs it and the command that installs it, never a traceback:
    relaymilter.cli.entry catches the ModuleNotFoundError and asks
    missing() for that line.

    A new import from another project gets a row in MODULES (the test
    tests/integration/test_missing_modules.py hides each row's module in
    turn and runs every command; tests/unit/test_debian_control.py checks
    the row against setup.cfg and the Debian packaging).

DIAGNOSTICS
    missing() answers None for a module not in MODULES: that is a bug, and
    the traceback is kept so it gets reported.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

import relaymilter


@dataclass(frozen=True)
class Module:
    pip: str          # the distribution pip installs
    debian: str       # the Debian 12 package
    needed_by: str    # what needs it, for the message


_BDB = Module("berkeleydb", "python3-bsddb3", "relayers.db and spammers.db")
_PYMILTER = Module("pymilter", "python3-milter", "the milter")

MODULES: dict[str, Module] = {
    "Milter": _PYMILTER,
    "milter": _PYMILTER,
    "yaml": Module("PyYAML", "python3-yaml", "the configuration and rule files"),
    "berkeleydb": _BDB,
    "bsddb3": _BDB,
    "redis": Module("redis", "python3-redis", "Redis stores (redis:// URLs) and relaymilter-mirror"),
    "dns": Module("dnspython", "python3-dnspython", "DNS blocklists (dnsbl)"),
    "prometheus_client": Module("prometheus_client", "python3-prometheus-client", "metrics"),
}

DEBIAN_SITE = "/usr/lib/python3/dist-packages/"


def missing(exc: ModuleNotFoundError) -> Optional[str]:
    """The one-line explanation of *exc*, or None when the module is not one relaymilter takes from elsewhere.

    The line names what to install where this relaymilter is installed: the
    Debian package's apt-get, or pip for the interpreter running it.
    """
    top = (exc.name or "").partition(".")[0]
    module = MODULES.get(top)
    if module is None:
        return None
    if relaymilter.__file__.startswith(DEBIAN_SITE):
        return "%s need the package %s, which is not installed: apt-get install %s" % (
            module.needed_by, module.debian, module.debian)
    return "%s need the Python package %s, which is not installed here: %s -m pip install %s" % (
        module.needed_by, module.pip, sys.executable, module.pip)
