"""NAME
    relaymilter.recipientsconfig - the local_recipients section of the configuration

DESCRIPTION
    local_recipients lists the sources that know the users of the local
    domains (see relaymilter.store.recipients):

        local_recipients:
          passwd: true
          aliases: [/etc/aliases]
          lists: [/etc/relaymilter/local-users]
          maps: [/etc/mail/virtusertable.db]
          recipient_delimiter: "+"

    With no source at all (the section absent, or only a delimiter) every
    user of a local domain is accepted, as before the section existed.

    The sources are checked when the configuration is loaded (at start-up,
    by --check-config and at each SIGHUP): each named file must exist and
    be readable; aliases files and lists must parse, maps must be Berkeley
    DB hash files. Later problems tempfail the users no other source knows.

DIAGNOSTICS
    ConfigError ``CONFIG:LINE: local_recipients.KEY: PATH: reason`` for a
    missing, unreadable or wrong-kind file; ``FILE:LINE: reason`` (the
    source's own line) for a syntax error in an aliases file or a list.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Callable

from relaymilter.errors import ConfigError
from relaymilter.store.localfiles import read_aliases, read_list
from relaymilter.yamlcheck import Mapping

LOCAL_RECIPIENTS_KEYS = ("passwd", "aliases", "lists", "maps", "recipient_delimiter")
HASH_MAGIC = (b"\x61\x15\x06\x00", b"\x00\x06\x15\x61")   # Berkeley DB hash, either byte order, at offset 12
BAD_DELIMITER = set('@"\\<>()[],;: \t')


@dataclass(frozen=True)
class LocalRecipientsConfig:
    passwd: bool = False
    aliases: tuple[str, ...] = ()
    lists: tuple[str, ...] = ()
    maps: tuple[str, ...] = ()
    recipient_delimiter: str = ""

    @property
    def enabled(self) -> bool:
        """Whether local users are checked at all (some source is configured)."""
        return bool(self.passwd or self.aliases or self.lists or self.maps)


def _existing(path: str) -> str:
    """The expanded path of a regular, readable file; ValueError with the reason."""
    full = os.path.expanduser(path)
    try:
        st = os.stat(full)
    except OSError as exc:
        raise ValueError("%s: %s" % (path, exc.strerror or exc)) from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError("%s: not a regular file" % path)
    if not os.access(full, os.R_OK):
        raise ValueError("%s: cannot read: permission denied" % path)
    return full


def _text_check(reader: Callable[[str], object]) -> Callable[[str], str]:
    def check(path: str) -> str:
        reader(_existing(path))          # SourceError (a ConfigError) names the source's own line
        return path
    return check


def _map_check(path: str) -> str:
    full = _existing(path)
    try:
        with open(full, "rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        raise ValueError("%s: cannot read: %s" % (path, exc.strerror or exc)) from None
    if head[12:16] not in HASH_MAGIC:
        raise ValueError("%s: not a Berkeley DB hash file (build it with makemap hash or postmap hash:)" % path)
    return path


def load_local_recipients(top: Mapping, key: str = "local_recipients") -> LocalRecipientsConfig:
    """Read and check the section (see the module header)."""
    m = top.sub(key)
    m.check_keys(LOCAL_RECIPIENTS_KEYS, "%s key" % key)
    delimiter = m.value("recipient_delimiter", "")
    if delimiter is None:
        delimiter = ""
    if not isinstance(delimiter, str) or len(delimiter) > 8 or set(delimiter) & BAD_DELIMITER \
            or not delimiter.isprintable():
        raise m.err("recipient_delimiter", 'must be "" or up to 8 punctuation characters such as "+" or "+-"')
    try:
        return LocalRecipientsConfig(
            passwd=m.bool("passwd", False),
            aliases=tuple(m.str_list("aliases", check=_text_check(read_aliases))),
            lists=tuple(m.str_list("lists", check=_text_check(read_list))),
            maps=tuple(m.str_list("maps", check=_map_check)),
            recipient_delimiter=delimiter,
        )
    except ConfigError as exc:
        text = str(exc)
        if not text.startswith(top.source) or ": %s: " % key in text:
            raise
        # str_list names the key alone; say which section it is in.
        for sub in LOCAL_RECIPIENTS_KEYS:
            marker = ": %s: " % sub
            if marker in text:
                raise ConfigError(text.replace(marker, ": %s.%s: " % (key, sub), 1)) from None
        raise
