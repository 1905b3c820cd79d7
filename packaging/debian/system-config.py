"""NAME
    system-config.py - the packaged /etc/relaymilter/relaymilter.yaml, made from the annotated sample

SYNOPSIS
    python3 packaging/debian/system-config.py SAMPLE OUTPUT

DESCRIPTION
    The Debian package installs rules/relaymilter.sample.yaml (every key with
    its default and a comment) as its configuration, with the per-user paths
    of a classic virtual-server install (~/etc/relayers.db, ~/etc/spammers)
    replaced by system ones, logging sent to syslog (facility mail, like
    sendmail and Postfix; journald picks it up under systemd), and the log
    watcher reading the journal where journald runs (source: auto). Each change
    keeps the sample's default in a trailing comment, so an administrator
    sees what was changed and why.

    Making it from the sample, rather than keeping a second copy, means a key
    added to the sample reaches the package with its documentation.

DIAGNOSTICS
    Exit 1 with one line naming the sample line it expected, when the sample
    no longer has a line this script changes (the sample changed: update the
    table below); the output is then not written.
"""

from __future__ import annotations

import re
import sys
from typing import Optional, Sequence

HEADER = """\
# /etc/relaymilter/relaymilter.yaml: relaymilter's configuration, as packaged.
#
# Read by relaymilter, relaymilter-popwatch, vsmtprelay and vnewspammers
# (their -c FILE defaults to this file when it exists). It is the annotated
# sample (/usr/share/relaymilter/rules/relaymilter.sample.yaml) with system
# paths: the maps live in /var/lib/relaymilter (owned by the user
# relaymilter, which runs the services), the spammers list in
# /etc/relaymilter/spammers, and decisions are logged to syslog (mail).
#
# Before an MTA hands relay decisions to the milter, set local_domains (or,
# on a sendmail host, local_domains_file: /etc/mail/local-host-names) and
# relay_domains: mail to a domain the milter does not know is local is a
# relay attempt. Then check and apply a change with
#     relaymilter --check-config && systemctl reload relaymilter
# The full reference is relaymilter.yaml(5).
#
"""

# (sample line, packaged line): each sample line must occur exactly once.
CHANGES = (
    ("log: stderr", "log: syslog"),
    ("  path: ~/etc/relayers.db", "  path: /var/lib/relaymilter/relayers.db"),
    ("  source: ~/etc/spammers", "  source: /etc/relaymilter/spammers"),
    ("  path: ~/etc/spammers.db", "  path: /var/lib/relaymilter/spammers.db"),
    # Logins from the journal where journald runs: there they cannot be forged.
    ("  source: files", "  source: auto"),
    ("  journal_cursor: ~/etc/relaymilter-popwatch.cursor", "  journal_cursor: /var/lib/relaymilter/popwatch.cursor"),
)


class SampleChanged(Exception):
    """The sample no longer has a line this script rewrites."""


def adapt(sample: str) -> str:
    """Return the packaged configuration made from the sample's text."""
    lines = sample.splitlines()
    for old, new in CHANGES:
        found = [i for i, line in enumerate(lines) if line.rstrip() == old]
        if len(found) != 1:
            raise SampleChanged("expected the line %r exactly once in the sample, found it %d times" % (old, len(found)))
        key_default = old.strip().split(":", 1)[1].strip()
        lines[found[0]] = "%s   # packaged; the sample's default is %s" % (new, key_default)
    body = "\n".join(lines) + "\n"
    # Drop the sample's own first line ("# relaymilter: annotated sample ...").
    body = re.sub(r"\A# relaymilter: annotated sample configuration\.\n#\n", "", body)
    return HEADER + body


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        sys.stderr.write("system-config.py: error: usage: system-config.py SAMPLE OUTPUT\n")
        return 2
    with open(args[0], encoding="utf-8") as fh:
        sample = fh.read()
    try:
        text = adapt(sample)
    except SampleChanged as exc:
        sys.stderr.write("system-config.py: error: %s: %s\n" % (args[0], exc))
        return 1
    with open(args[1], "w", encoding="utf-8") as fh:
        fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
