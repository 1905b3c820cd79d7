"""NAME
    relaymilter.worker - one libmilter worker process, forked by the supervisor

DESCRIPTION
    A worker serves the listening socket the supervisor opened before it
    forked (adapter.serve); N workers accept on the same socket, so the
    kernel spreads connections over them and each has its own interpreter
    and GIL. Decision lines carry the worker's own PID, as Postfix's
    smtpd[pid] lines do.

    The supervisor talks to a worker over a pipe, one direction: each message
    is a new configuration the supervisor has already loaded and checked
    (a 4-byte length, then the pickled Config), so every worker swaps in the
    very same rules. A thread of the worker reads the pipe:

      a message         swap the new Config in for new connections
      end of file       the supervisor is gone: stop serving, then exit

    The kernel's parent-death signal (prctl PR_SET_PDEATHSIG) sends SIGTERM
    as a second guard, so a killed supervisor never leaves workers serving
    alone.

DIAGNOSTICS
    Any exception while applying a reload is logged in one line and the
    running rules are kept; the thread goes on reading, so later reloads
    still work. A worker that has not stopped STOP_WAIT seconds after the
    supervisor went away exits at once.
"""

from __future__ import annotations

import ctypes
import logging
import os
import pickle
import signal
import struct
import threading
import time
from typing import Callable, Optional

from relaymilter.config import Config
from relaymilter.decisionlog import DecisionLog
from relaymilter.runtime import Runtime, RuntimeHolder

log = logging.getLogger("relaymilter")

STOP_WAIT = 30.0        # seconds a worker may take to stop once its supervisor is gone
_HEADER = struct.Struct("!I")
_PR_SET_PDEATHSIG = 1


def frame(config: Config) -> bytes:
    """A reload message for a worker's pipe."""
    data = pickle.dumps(config, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


def _read_exactly(fd: int, size: int) -> Optional[bytes]:
    chunks = []
    while size:
        chunk = os.read(fd, size)
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int) -> Optional[bytes]:
    """The next message's payload, or None at end of file (the supervisor is gone)."""
    head = _read_exactly(fd, _HEADER.size)
    if head is None:
        return None
    return _read_exactly(fd, _HEADER.unpack(head)[0])


def die_with_parent(parent: int) -> None:
    """Ask the kernel for SIGTERM when the supervisor dies; exit now if it already has."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError) as exc:
        log.warning("cannot ask for the parent-death signal (%s); relying on the control pipe", exc)
    if os.getppid() != parent:
        os._exit(1)


def listen(control: int, holder: RuntimeHolder, describe: Callable[[Config], str],
           stop: Callable[[], None]) -> None:
    """The worker's control thread: apply reloads until the supervisor goes away."""
    while True:
        try:
            payload = read_frame(control)
        except OSError as exc:
            log.error("control pipe unreadable (%s): stopping", exc)
            payload = None
        if payload is None:
            log.info("supervisor gone: stopping")
            stop()
            time.sleep(STOP_WAIT)
            os._exit(1)
        try:
            config = pickle.loads(payload)
            holder.swap(config)
            log.info("reloaded %s", describe(config))
        except Exception as exc:  # noqa: BLE001 - a failed reload keeps the old rules and never ends this thread
            log.error("reload failed in this worker, keeping the running configuration: %s: %s",
                      type(exc).__name__, exc)


def run(config: Config, control: int, decisions: DecisionLog, describe: Callable[[Config], str]) -> int:
    """Serve in this (forked) process until stopped; the return value is the exit code."""
    from relaymilter import adapter  # imports pymilter

    holder = RuntimeHolder(Runtime(config), decisions)
    metrics = None
    if config.metrics.listen is not None:
        from relaymilter.metrics.milter import start_worker

        metrics = start_worker(holder)      # counts into the supervisor's metrics directory
    thread = threading.Thread(target=listen, args=(control, holder, describe, adapter.stop),
                              name="control", daemon=True)
    thread.start()
    log.info("worker serving; %s", describe(config))
    try:
        adapter.serve(holder)
    except adapter.MilterError as exc:
        log.error("worker cannot serve: %s", exc)
        return 1
    finally:
        decisions.close()
        if metrics is not None:
            metrics.stop()
    return 0
