"""relaymilter: keep a mail server from being an open relay, the POP-before-SMTP way.

The package is laid out in layers (see README.rst): ``policy`` holds the pure
decisions, ``store`` the relayers.db / spammers.db maps, ``adapter`` the only
pymilter-facing code, ``popwatch`` the log watcher, ``harness`` a milter-protocol
client, and ``cli`` the thin command-line entry points.
"""

__version__ = "1.1.0"
