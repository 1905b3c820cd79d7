"""NAME
    relaymilter.harness.sockspec - milter socket specifications

DESCRIPTION
    The spellings sendmail's InputMailFilters S= equate and pymilter's
    setconn() accept, so one string works in sendmail.mc, in relaymilter's
    config and on the harness command line:

        inet:PORT@HOST     IPv4 (HOST a dotted quad or a name; default 127.0.0.1)
        inet6:PORT@HOST    IPv6 (HOST may be bracketed: [::1]; default ::1)
        unix:/path         a Unix-domain socket (also local:/path, or a bare /path)

    The harness connects; it never listens, so no wildcard address applies.

DIAGNOSTICS
    SocketSpecError (a ValueError) for an unknown scheme, a missing or
    out-of-range port, or an empty path.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Tuple, Union

from relaymilter.harness.errors import SocketSpecError

Address = Union[str, Tuple[str, int]]


@dataclass(frozen=True)
class SocketSpec:
    """A parsed socket specification: family, connect address, original text."""

    family: int
    address: Address
    text: str


def parse_socket_spec(text: str) -> SocketSpec:
    """Parse ``inet:PORT@HOST``, ``inet6:PORT@HOST``, ``unix:/path`` or ``local:/path``."""
    spec = text.strip()
    if spec.startswith("/"):
        return SocketSpec(socket.AF_UNIX, spec, text)
    scheme, sep, rest = spec.partition(":")
    scheme = scheme.lower()
    if not sep:
        raise SocketSpecError("bad socket %r: want inet:PORT@HOST, inet6:PORT@HOST or unix:/path" % text)
    if scheme in ("unix", "local"):
        if not rest:
            raise SocketSpecError("bad socket %r: empty path" % text)
        return SocketSpec(socket.AF_UNIX, rest, text)
    if scheme in ("inet", "inet6"):
        port_text, _, host = rest.partition("@")
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise SocketSpecError("bad socket %r: port must be a number 1-65535" % text)
        if scheme == "inet6":
            host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
            return SocketSpec(socket.AF_INET6, (host or "::1", int(port_text)), text)
        return SocketSpec(socket.AF_INET, (host or "127.0.0.1", int(port_text)), text)
    raise SocketSpecError("bad socket %r: unknown type %r (inet, inet6, unix, local)" % (text, scheme))
