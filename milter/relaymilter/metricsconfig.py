"""NAME
    relaymilter.metricsconfig - the ``metrics:`` section of the configuration

DESCRIPTION
    Where the Prometheus endpoints listen (HOST:PORT or [IPV6]:PORT); null
    or absent means no endpoint, and prometheus_client is never imported:

        metrics:
          listen: null              # the milter, e.g. 127.0.0.1:9464
          popwatch_listen: null     # relaymilter-popwatch, e.g. 127.0.0.1:9465

    Parsed here, called by relaymilter.config.load_config; relaymilter.metrics
    serves what the frozen MetricsConfig names.  Kept apart from that
    package so that reading the configuration never loads it.

DIAGNOSTICS
    ConfigError ``FILE:LINE: message`` for an unknown key, an address that
    is not HOST:PORT or [IPV6]:PORT, a port above 65535, and the milter and
    the watcher named on the same address.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from relaymilter.yamlcheck import Mapping

METRICS_KEYS = ("listen", "popwatch_listen")
LISTEN_RE = re.compile(r"^(?:\[([0-9A-Fa-f:.]+)\]|([^\s:\[\]]+)):(\d{1,5})$")


@dataclass(frozen=True)
class MetricsConfig:
    listen: Optional[tuple[str, int]] = None           # (host, port) of the milter's endpoint; None = off
    popwatch_listen: Optional[tuple[str, int]] = None  # the same for relaymilter-popwatch


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPV6]:PORT`` as (host, port); ValueError with the reason."""
    m = LISTEN_RE.match(text.strip())
    if not m or int(m.group(3)) > 65535:
        raise ValueError("want HOST:PORT or [IPV6]:PORT (e.g. 127.0.0.1:9464), got %r" % text)
    return (m.group(1) or m.group(2), int(m.group(3)))


def _listen(m: Mapping, key: str) -> Optional[tuple[str, int]]:
    text = m.str(key, None, nullable=True)
    if text is None:
        return None
    try:
        return parse_listen(text)
    except ValueError as exc:
        raise m.err(key, str(exc)) from None


def parse_metrics(top: Mapping) -> MetricsConfig:
    """The ``metrics:`` section."""
    mx = top.sub("metrics")
    mx.check_keys(METRICS_KEYS, "metrics key")
    metrics = MetricsConfig(listen=_listen(mx, "listen"), popwatch_listen=_listen(mx, "popwatch_listen"))
    if metrics.listen is not None and metrics.listen == metrics.popwatch_listen:
        raise mx.err("popwatch_listen", "the milter and the watcher cannot listen on the same address")
    return metrics
