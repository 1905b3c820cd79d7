"""NAME
    relaymilter.store.redislines - the milter's own Redis connections, and answers read later

DESCRIPTION
    The milter's relayers lookups (store.redis) and counting calls
    (store.guardredis) go out on connections of their own, made by the
    store's pool but used outside redis-py's command path (pool lock, retry
    wrappers: several times the loopback round trip), one thread per
    connection at a time. Lines.call() sends a command and waits for its answer. Lines.post()
    sends one and does not wait: the answer is read, and thrown away, before
    the next command on the same connection (or never, if the connection is
    dropped first). A count posted this way costs one send instead of a round
    trip: no wait on the server, no thread switch while it answers. The
    server runs a connection's commands in the order they came, so a count
    posted is in place before anything the milter says afterwards can reach
    anyone.

    A connection the server closed while idle (restart, failover) is
    reconnected before use; one that fails while answers are still owed is
    dropped with them (the counts were sent: whether the server ran them
    before it went away cannot be known).

DIAGNOSTICS
    call() raises what redis-py raises (RedisError, OSError); post() raises
    OSError / ConnectionError when the command cannot be sent. An error
    answer to a posted command is not raised (the decision it belonged to is
    long made): it is logged, at most once a minute with the number since,
    and counted in Lines.refused.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Optional

from redis import exceptions as rexc
from redis.connection import Connection

log = logging.getLogger("relaymilter.limits")

COMPLAIN_EVERY = 60.0       # seconds between two log lines about refused posted commands


if hasattr(Connection, "is_connected"):
    def is_connected(conn: Any) -> bool:
        """Whether a redis-py connection holds an open socket."""
        return bool(conn.is_connected)
else:  # redis-py before 5 (Debian 12 packages 4.3.4) has the socket but not the property
    def is_connected(conn: Any) -> bool:
        """Whether a redis-py connection holds an open socket."""
        return conn._sock is not None


class _Line:
    """One connection, and how many answers to posted commands it still owes."""

    __slots__ = ("conn", "owed")

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.owed = 0


class Lines:
    """Connections of *pool*'s kind, kept by this process (a forked child makes its own)."""

    def __init__(self, pool: Any, display: str) -> None:
        self._pool = pool
        self.display = display
        self._idle: list[_Line] = []
        self._pid = os.getpid()
        self.refused = 0                # error answers to posted commands
        self._told = 0                  # refused as of the last log line
        self._next_complaint = 0.0

    def _take(self) -> _Line:
        if self._pid != os.getpid():
            self._idle, self._pid = [], os.getpid()
        try:
            line = self._idle.pop()
        except IndexError:
            line = _Line(self._pool.make_connection())
        try:
            return self._ready(line)
        except BaseException:
            # Kept, unconnected, for the next use: one made afresh after each failure would count
            # against the pool's max_connections for good (a server down for a while, then none).
            line.owed = 0
            line.conn.disconnect()
            self._idle.append(line)
            raise

    def _ready(self, line: _Line) -> _Line:
        """*line* connected, its owed answers read."""
        conn = line.conn
        if not is_connected(conn):
            line.owed = 0
            conn.connect()
            return line
        if line.owed:
            self._settle(line)
        # An idle connection with something to read is one the server closed (restart, failover);
        # redis-py says so by raising.
        try:
            closed = conn.can_read()
        except (rexc.ConnectionError, rexc.TimeoutError, OSError):
            closed = True
        if closed:
            conn.disconnect()
            conn.connect()
        return line

    def _settle(self, line: _Line) -> None:
        """Read the answers *line* owes; a connection that fails meanwhile is made afresh."""
        try:
            while line.owed:
                line.owed -= 1
                try:
                    line.conn.read_response()
                except rexc.ResponseError as exc:
                    self._complain(exc)
        except (rexc.ConnectionError, rexc.TimeoutError, OSError):
            line.owed = 0
            line.conn.disconnect()
            line.conn.connect()

    def _complain(self, exc: BaseException) -> None:
        self.refused += 1
        now = time.monotonic()
        if now >= self._next_complaint:
            self._next_complaint = now + COMPLAIN_EVERY
            log.warning("%s: a count sent without waiting was refused (%d since the last such line): %s",
                        self.display, self.refused - self._told, exc)
            self._told = self.refused

    def call(self, *args: Any, packed: Optional[bytes] = None) -> Any:
        """One command, answered. *packed*: the command already in RESP form (then *args* is not used)."""
        line = self._take()
        conn = line.conn
        try:
            if packed is None:
                conn.send_command(*args)
            else:
                conn.send_packed_command([packed], check_health=False)
            return conn.read_response()
        except BaseException:
            line.owed = 0
            conn.disconnect()
            raise
        finally:
            self._idle.append(line)

    def post(self, packed: bytes) -> None:
        """One command in RESP form, sent; its answer is read (and dropped) before the connection's next."""
        line = self._take()
        try:
            line.conn.send_packed_command([packed], check_health=False)
            line.owed += 1
        except BaseException:
            line.owed = 0
            line.conn.disconnect()
            raise
        finally:
            self._idle.append(line)

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for line in idle:
            line.conn.disconnect()
