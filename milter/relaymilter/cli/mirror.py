"""NAME
    relaymilter-mirror - keep a local relayers.db equal to the shared Redis map

SYNOPSIS
    relaymilter-mirror --from URL --to FILE [--interval SECONDS] [--once]
        [--no-notify] [--debug]

DESCRIPTION
    In a mail farm the relayers map lives in Redis. A host whose sendmail
    (K relayers hash ...) or Postfix (check_client_access hash:...) reads
    relayers.db directly, without the milter, needs a file: this command
    keeps one. Each round reads the whole map from Redis (SCAN + MGET) and
    makes the file equal to it in one locked write that touches only what
    changed (added, updated, removed), in place, makemap style, so sendmail
    and Postfix keep reading it as they always have.

    A round runs every --interval seconds (default 5). When the Redis server
    publishes keyspace notifications (notify-keyspace-events containing K
    and A, or K with g, $ and x), the mirror also subscribes to the map's
    keys and runs a round as soon as one changes or expires, so the file
    follows within milliseconds; the interval remains as a safety net. To
    enable them: ``CONFIG SET notify-keyspace-events Kg$x`` (or in
    redis.conf).

    --once runs one round and exits. SIGTERM and SIGINT stop the loop after
    the current round; SIGHUP runs a round at once.

DIAGNOSTICS
    While Redis cannot be read the file is left exactly as it is (never
    emptied on a guess), the error is logged once, and the mirror tries again
    every interval; recovery is logged. A key under the prefix that is not an
    address is skipped with a warning. --once exits 1 when Redis or the file
    cannot be used; bad usage or a bad URL exits 2 with one
    ``relaymilter-mirror: error: ...`` line.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Optional, Sequence

from redis import exceptions as rexc

from relaymilter import __version__
from relaymilter.cli.common import stderr_logging
from relaymilter.errors import ConfigError, StoreUnavailable
from relaymilter.ipaddr import normalize_ip
from relaymilter.store import is_store_url
from relaymilter.store.redis import RedisRelayStore
from relaymilter.store.relayers import BDBRelayStore, open_relay_store

PROG = "relaymilter-mirror"
DEFAULT_INTERVAL = 5.0
SETTLE = 0.02          # after a notification, gather the rest of a burst for this long
log = logging.getLogger("relaymilter.mirror")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Keep a local relayers.db equal to the relayers map in Redis, "
                                       "for sendmail or Postfix reading the file.")
    p.add_argument("--from", dest="source", metavar="URL", required=True,
                   help="the Redis map: redis://, rediss://, unix:// or redis+sentinel:// URL")
    p.add_argument("--to", dest="target", metavar="FILE", required=True, help="the relayers.db to keep")
    p.add_argument("--interval", type=float, default=DEFAULT_INTERVAL, metavar="SECONDS",
                   help="seconds between full rounds (default %g)" % DEFAULT_INTERVAL)
    p.add_argument("--once", action="store_true", help="one round, then exit")
    p.add_argument("--no-notify", dest="notify", action="store_false",
                   help="never subscribe to keyspace notifications; poll only")
    p.add_argument("--debug", action="store_true", help="log every round")
    p.add_argument("--version", action="version", version="%s %s" % (PROG, __version__))
    return p


class ChangeFeed:
    """Keyspace notifications for the map's keys, when the server publishes them."""

    def __init__(self, store: RedisRelayStore) -> None:
        self.store = store
        self.pubsub: Any = None
        self.enabled: Optional[bool] = None     # None: the server would not say (CONFIG disabled)

    @staticmethod
    def _publishes(flags: str) -> bool:
        return "K" in flags and ("A" in flags or all(c in flags for c in "g$x"))

    def open(self) -> None:
        """Subscribe (again); on any error stay closed and let the interval do the work."""
        self.close()
        try:
            reply = self.store.client.config_get("notify-keyspace-events")
            raw = next(iter(reply.values()), "") if reply else ""
            flags = raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw or "")
            enabled: Optional[bool] = self._publishes(flags)
        except rexc.ResponseError:
            enabled = None                       # CONFIG renamed or refused (managed Redis): subscribe and see
        except rexc.RedisError:
            return                               # unreachable: the next good round tries again
        if enabled != self.enabled and enabled is not True:
            log.info("keyspace notifications %s on %s", "off (polling only)" if enabled is False
                     else "unknown (CONFIG refused)", self.store.display)
        self.enabled = enabled
        if enabled is False:
            return
        pubsub = self.store.client.pubsub()
        try:
            pubsub.psubscribe(self.store.notification_channel())
            # Only once the server confirms is every later change sure to be published to us.
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                msg = pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
                if msg is not None and msg["type"] == "psubscribe":
                    self.pubsub = pubsub
                    log.info("subscribed to keyspace notifications %s on %s",
                             self.store.notification_channel(), self.store.display)
                    return
            log.debug("no confirmation of the keyspace subscription: polling only")
        except (rexc.RedisError, OSError) as exc:
            log.debug("cannot subscribe to keyspace notifications: %s", exc)
        pubsub.close()

    def close(self) -> None:
        if self.pubsub is not None:
            try:
                self.pubsub.close()
            except rexc.RedisError:
                pass
            self.pubsub = None

    @staticmethod
    def _change(msg: Optional[dict]) -> bool:
        return msg is not None and msg.get("type") == "pmessage"

    def wait(self, timeout: float) -> bool:
        """Block up to *timeout* s for a change; True when one came (its burst drained)."""
        if self.pubsub is None:
            return False
        try:
            if not self._change(self.pubsub.get_message(timeout=timeout)):
                return False
            end = time.monotonic() + SETTLE
            while time.monotonic() < end:
                self.pubsub.get_message(timeout=max(0.0, end - time.monotonic()))
            return True
        except (rexc.RedisError, OSError) as exc:
            log.debug("keyspace subscription lost: %s", exc)
            self.close()
            return False


class Mirror:
    """One Redis map -> one relayers.db, a round at a time."""

    def __init__(self, source: RedisRelayStore, target: BDBRelayStore) -> None:
        self.source = source
        self.target = target
        self._last: Optional[tuple[dict[str, int], tuple]] = None
        self._failing = False
        self._bad_keys: set[str] = set()

    def _file_sig(self) -> tuple:
        try:
            st = os.stat(self.target.location)
        except FileNotFoundError:
            return ()
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def round(self) -> tuple[int, int]:
        """Copy Redis to the file; (written, removed). StoreUnavailable leaves the file untouched."""
        snapshot: dict[str, int] = {}
        for address, ticks in self.source.entries():
            try:
                snapshot[normalize_ip(address)] = ticks
            except ValueError:
                if address not in self._bad_keys:
                    log.warning("skipping %s%s: not an address", self.source.prefix, address)
                    self._bad_keys.add(address)
        # Same map as last round and nobody touched the file since: nothing to lock or write.
        if self._last is not None and self._last == (snapshot, self._file_sig()):
            log.debug("round: %d entries, in step", len(snapshot))
            return (0, 0)
        written, removed = self.target.sync(snapshot)
        self._last = (snapshot, self._file_sig())
        if written or removed:
            log.info("%s: %d written, %d removed, %d entries", self.target.location, written, removed, len(snapshot))
        else:
            log.debug("round: %d entries, file checked, in step", len(snapshot))
        return written, removed

    def safe_round(self) -> bool:
        """round(), logging an outage once and its end once; False while failing."""
        try:
            self.round()
        except StoreUnavailable as exc:
            if not self._failing:
                log.error("%s (keeping %s as it is; retrying)", exc, self.target.location)
                self._failing = True
            return False
        if self._failing:
            log.info("%s readable again; %s is in step", self.source.display, self.target.location)
            self._failing = False
        return True


def serve(mirror: Mirror, interval: float, notify: bool, stop: threading.Event, wake: threading.Event) -> None:
    """Run rounds until *stop* is set: every *interval* s, on a change notification, or on *wake*."""
    feed = ChangeFeed(mirror.source) if notify else None
    try:
        while not stop.is_set():
            # Subscribe before reading: a change made during the round is then not missed.
            if feed is not None and feed.pubsub is None:
                feed.open()
            mirror.safe_round()
            deadline = time.monotonic() + interval
            while not stop.is_set() and not wake.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                # Short slices: a signal handler only sets an event, the loop must notice it.
                if feed is not None and feed.pubsub is not None:
                    if feed.wait(min(left, 0.5)):
                        break
                else:
                    stop.wait(min(left, 0.5))
            wake.clear()
    finally:
        if feed is not None:
            feed.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    err = sys.stderr
    try:
        opts = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if not opts.interval > 0:
        err.write("%s: error: --interval must be a positive number of seconds\n" % PROG)
        return 2
    if not is_store_url(opts.source):
        err.write("%s: error: --from must be a redis://, rediss://, unix:// or redis+sentinel:// URL\n" % PROG)
        return 2
    stderr_logging(PROG, opts.debug)
    try:
        source = open_relay_store(opts.source)
    except ConfigError as exc:
        err.write("%s: error: %s\n" % (PROG, exc))
        return 2
    assert isinstance(source, RedisRelayStore)
    target = BDBRelayStore(os.path.expanduser(opts.target))
    mirror = Mirror(source, target)
    try:
        if opts.once:
            try:
                written, removed = mirror.round()
            except StoreUnavailable as exc:
                err.write("%s: error: %s\n" % (PROG, exc))
                return 1
            log.debug("one round: %d written, %d removed", written, removed)
            return 0
        stop, wake = threading.Event(), threading.Event()
        handlers = {signal.SIGTERM: lambda *_: stop.set(), signal.SIGINT: lambda *_: stop.set(),
                    signal.SIGHUP: lambda *_: wake.set()}
        old = {sig: signal.signal(sig, h) for sig, h in handlers.items()}
        log.info("mirroring %s to %s every %gs", source.display, target.location, opts.interval)
        try:
            serve(mirror, opts.interval, opts.notify, stop, wake)
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)
        log.info("stopped")
        return 0
    finally:
        source.close()
        target.close()


if __name__ == "__main__":
    sys.exit(main())
