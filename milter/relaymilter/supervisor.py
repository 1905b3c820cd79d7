"""NAME
    relaymilter.supervisor - opens the socket once, forks the libmilter workers and owns the signals

DESCRIPTION
    One Python process decides on one core at most (the GIL), and libmilter's
    threads in it hand that lock back and forth. So relaymilter runs N worker
    processes (``workers: auto``: one per CPU this process may use) that
    accept on one listening socket, opened here before the first fork
    (adapter.open_socket). The supervisor itself serves no mail and runs no
    thread but the metrics endpoint, when metrics are on (it sums the
    workers' counts, relaymilter.metrics.milter); it waits for signals and
    for its children:

      SIGHUP    load the configuration file again; if it loads, send the same
                Config to every worker (relaymilter.worker), which swaps it in
                for new connections; if it does not, log one line and keep the
                running rules everywhere. Any exception counts as "does not
                load": a reload can never stop later reloads.
      SIGTERM,  SIGTERM every worker (libmilter finishes and stops), SIGKILL
      SIGINT    any still there after STOP_WAIT seconds, remove the unix
                socket this process created, exit 0: no process and no
                socket are left behind.
      a worker  dies: logged with how it ended, and replaced. A worker that
                dies within STABLE seconds of its start counts as a crash
                loop: the next start waits BACKOFF_FIRST seconds, doubling up
                to BACKOFF_MAX, and the wait is logged. The other workers go
                on serving, and the socket stays open, all the while.

    With ``cpu_affinity: auto`` worker i (and its replacements) runs on the
    i-th CPU of those the supervisor may use, round robin: a libmilter
    worker's threads then hand the interpreter lock over on one core and
    its caches stay warm. benchmarks/milter_ceiling.py measured it against
    unpinned workers; the default is none (the kernel places them).
    Like the socket and the metrics endpoint, it is read at start.

    Workers hold nothing another worker needs: state that must be shared
    between them goes through the store (relayers.db, Redis), never through
    process memory.

    Why not libmilter's own signal handling: libmilter stops on SIGHUP, so
    the signals stay here and workers get reloads over a pipe.

DIAGNOSTICS
    Exit 1 with one line when the socket cannot be opened (the line names
    the cause: EADDRINUSE, EACCES, ...). Worker deaths and reload failures
    are logged; neither stops the supervisor.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import stat
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Optional

from relaymilter.config import Config
from relaymilter.errors import ConfigError
from relaymilter.metrics import MetricsError

if TYPE_CHECKING:
    from relaymilter.metrics.milter import SupervisorMetrics

log = logging.getLogger("relaymilter")

STOP_WAIT = 30.0        # seconds workers get to stop after SIGTERM before SIGKILL
STABLE = 10.0           # a worker that lived this long was not crash-looping
BACKOFF_FIRST = 0.5     # seconds before restarting a worker that crash-looped once
BACKOFF_MAX = 30.0


def cpu_count() -> int:
    """How many CPUs this process may run on (what ``workers: auto`` means)."""
    return len(allowed_cpus()) or max(1, os.cpu_count() or 1)


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on, in order (empty where the system cannot say)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return []


def pin(cpu: int) -> None:
    """In a new worker: run it, all its threads, on *cpu* alone (best effort: logged if refused)."""
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError as exc:
        log.warning("worker %d: cannot pin to CPU %d: %s", os.getpid(), cpu, exc.strerror or exc)
        return
    log.info("worker %d pinned to CPU %d", os.getpid(), cpu)


@dataclass
class Worker:
    pid: int
    control: int                    # write end of its pipe
    started: float


@dataclass
class Slot:
    """One place for a worker; it keeps the crash-loop count across replacements."""

    worker: Optional[Worker] = None
    failures: int = 0
    due: float = 0.0                # monotonic time the next start may happen
    history: list[int] = field(default_factory=list)    # PIDs that served in this slot


class Supervisor:
    """See the module notes."""

    def __init__(self, config: Config, socket_spec: str, workers: int,
                 load: Callable[[], Config], serve: Callable[[Config, int], int],
                 describe: Callable[[Config], str]) -> None:
        self.config = config
        self.socket_spec = socket_spec
        self.slots = [Slot() for _ in range(workers)]
        self.load = load                # reads the configuration file again (SIGHUP)
        self.serve = serve              # runs in a forked worker: serve(config, control_fd) -> exit code
        self.describe = describe
        self.stopping = 0.0
        self.pending: set[int] = set()  # signals seen, not yet handled
        self.socket_id: Optional[tuple[int, int]] = None    # (dev, ino) of the unix socket we created
        self.metrics: Optional[SupervisorMetrics] = None
        self._wake_r = self._wake_w = -1
        self.cpus = allowed_cpus()      # at start: cpu_affinity pins within this set

    # ------------------------------------------------------------ startup

    def open_socket(self) -> None:
        from relaymilter import adapter  # imports pymilter; only the milter needs it

        adapter.open_socket(self.socket_spec)
        kind, _, path = self.socket_spec.partition(":")
        if kind in ("unix", "local"):
            st = os.stat(path)
            if stat.S_ISSOCK(st.st_mode):
                self.socket_id = (st.st_dev, st.st_ino)

    def run(self) -> int:
        """Open the socket, start the workers, supervise until SIGTERM; the exit code."""
        try:
            self.open_socket()
        except OSError as exc:
            log.error("cannot listen on %s: %s", self.socket_spec, exc.strerror or exc)
            return 1
        try:
            if self.config.metrics.listen is not None:
                self._start_metrics(self.config.metrics.listen)
        except MetricsError as exc:
            log.error("%s", exc)
            self._remove_socket()
            return 1
        except ImportError:
            self._remove_socket()       # prometheus_client missing: one line from the command (cli.entry)
            raise
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        signal.set_wakeup_fd(self._wake_w)
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, self._note)
        log.info("listening on %s with %d worker%s; %s", self.socket_spec, len(self.slots),
                 "" if len(self.slots) == 1 else "s", self.describe(self.config))
        try:
            return self._loop()
        finally:
            self._remove_socket()
            if self.metrics is not None:
                self.metrics.close()

    def _start_metrics(self, listen: tuple[str, int]) -> None:
        # Before the first fork: the workers inherit the multiprocess directory (relaymilter.metrics.milter).
        # The endpoint is the one thread of this process.
        from relaymilter.metrics.milter import SupervisorMetrics

        self.metrics = SupervisorMetrics(listen, lambda: len(self._alive()))

    def _note(self, signum: int, frame: object) -> None:
        self.pending.add(signum)

    # ------------------------------------------------------------ the loop

    def _loop(self) -> int:
        while True:
            now = time.monotonic()
            if not self.stopping:
                self._start_due(now)
            self._reap(now)
            if self.stopping:
                if not self._alive():
                    return 0
                if now - self.stopping > STOP_WAIT:
                    self._kill_all(signal.SIGKILL, "did not stop within %gs" % STOP_WAIT)
            pending, self.pending = self.pending, set()
            if signal.SIGTERM in pending or signal.SIGINT in pending:
                self._stop()
            elif signal.SIGHUP in pending and not self.stopping:
                self._reload()
            if self.pending:
                continue
            self._wait(self._timeout(time.monotonic()))

    def _timeout(self, now: float) -> float:
        if self.stopping:
            return 0.1
        waits = [slot.due - now for slot in self.slots if slot.worker is None]
        return max(0.0, min(waits)) if waits else 5.0

    def _wait(self, timeout: float) -> None:
        try:
            ready, _, _ = select.select([self._wake_r], [], [], timeout)
        except InterruptedError:
            return
        if ready:
            try:
                os.read(self._wake_r, 512)
            except BlockingIOError:
                pass

    def _alive(self) -> list[Worker]:
        return [slot.worker for slot in self.slots if slot.worker is not None]

    # ------------------------------------------------------------ workers

    def _start_due(self, now: float) -> None:
        for index, slot in enumerate(self.slots):
            if slot.worker is None and now >= slot.due:
                slot.worker = self._fork(self._cpu_for(index))
                slot.history.append(slot.worker.pid)

    def _cpu_for(self, index: int) -> Optional[int]:
        """The CPU the worker in slot *index* is pinned to (cpu_affinity: auto), else None."""
        if not self.config.cpu_affinity or not self.cpus:
            return None
        return self.cpus[index % len(self.cpus)]

    def _fork(self, cpu: Optional[int] = None) -> Worker:
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:        # the worker
            code = 1
            try:
                if cpu is not None:
                    pin(cpu)
                os.close(wfd)
                for other in self._alive():
                    os.close(other.control)
                signal.set_wakeup_fd(-1)
                os.close(self._wake_r)
                os.close(self._wake_w)
                if self.metrics is not None:
                    self.metrics.in_child()
                for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                    signal.signal(sig, signal.SIG_DFL)
                code = self.serve(self.config, rfd)
            finally:
                logging.shutdown()
                os._exit(code)
        os.close(rfd)
        os.set_blocking(wfd, False)
        return Worker(pid, wfd, time.monotonic())

    def _reap(self, now: float) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.metrics is not None:
                self.metrics.worker_exited(pid)
            for slot in self.slots:
                if slot.worker is not None and slot.worker.pid == pid:
                    self._ended(slot, slot.worker, status, now)

    def _ended(self, slot: Slot, worker: Worker, status: int, now: float) -> None:
        slot.worker = None
        os.close(worker.control)
        if self.stopping:
            return
        lived = now - worker.started
        slot.failures = slot.failures + 1 if lived < STABLE else 0
        delay = min(BACKOFF_FIRST * 2 ** (slot.failures - 1), BACKOFF_MAX) if slot.failures else 0.0
        slot.due = now + delay
        log.error("worker %d %s after %.1fs; %s", worker.pid, _how(status), lived,
                  "starting another in %.1fs (crash loop: %d quick deaths in a row)" % (delay, slot.failures)
                  if delay else "starting another")

    def _kill_all(self, sig: int, why: str = "") -> None:
        for worker in self._alive():
            if why:
                log.error("worker %d %s; sending %s", worker.pid, why, signal.Signals(sig).name)
            try:
                os.kill(worker.pid, sig)
            except ProcessLookupError:
                pass

    def _stop(self) -> None:
        if not self.stopping:
            self.stopping = time.monotonic()
            log.info("stopping %d workers", len(self._alive()))
            self._kill_all(signal.SIGTERM)

    # ------------------------------------------------------------ reload

    def _reload(self) -> None:
        try:
            # Imported here, inside the try: a reload that cannot even open a module (out of
            # descriptors) fails like any other, and the supervisor goes on.
            from relaymilter.worker import frame

            config = self.load()
            message = frame(config)
        except ConfigError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            self._reloaded(False)
            return
        except Exception as exc:  # noqa: BLE001 - any failure keeps the old rules; later reloads must still work
            log.error("reload failed, keeping the running configuration: %s: %s", type(exc).__name__,
                      str(exc)[:300])
            self._reloaded(False)
            return
        if config.metrics != self.config.metrics:
            log.warning("reload: metrics cannot change while running (still %s); restart to change them",
                        "%s:%d" % self.config.metrics.listen if self.config.metrics.listen else "off")
            config = replace(config, metrics=self.config.metrics)
            message = frame(config)
        if config.cpu_affinity != self.config.cpu_affinity:
            log.warning("reload: cpu_affinity cannot change while running (still %s); restart to change it",
                        "auto" if self.config.cpu_affinity else "none")
            config = replace(config, cpu_affinity=self.config.cpu_affinity)
            message = frame(config)
        if config.socket != self.config.socket and config.socket != self.socket_spec:
            log.warning("reload: the socket cannot change while running (still %s); restart to move it",
                        self.socket_spec)
        self.config = config
        for worker in self._alive():
            try:
                done = os.write(worker.control, message)
            except BlockingIOError:
                done = 0
            except OSError as exc:
                if exc.errno != errno.EPIPE:
                    log.error("worker %d: cannot send the reload: %s", worker.pid, exc)
                continue
            if done != len(message):
                # Its pipe is full: the worker has stopped reading. A new one starts on the new rules.
                log.error("worker %d is not taking reloads; replacing it", worker.pid)
                os.kill(worker.pid, signal.SIGKILL)
        log.info("reloading %d workers: %s", len(self._alive()), self.describe(config))
        self._reloaded(True)

    def _reloaded(self, ok: bool) -> None:
        if self.metrics is not None:
            self.metrics.reloaded(ok)

    # ------------------------------------------------------------ shutdown

    def _remove_socket(self) -> None:
        """Remove the unix socket this process created (not one that replaced it since)."""
        if self.socket_id is None:
            return
        path = self.socket_spec.partition(":")[2]
        try:
            st = os.lstat(path)
            if (st.st_dev, st.st_ino) == self.socket_id:
                os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("cannot remove %s: %s", path, exc)


def _how(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return "was killed by %s" % name
    return "exited with status %d" % os.waitstatus_to_exitcode(status)
