"""NAME
    relaymilter.metrics - Prometheus metrics of the milter and the log watcher

DESCRIPTION
    Off unless the configuration says where to listen (``metrics: {listen:
    HOST:PORT}`` for the milter, ``popwatch_listen`` for relaymilter-popwatch).
    The exposition is prometheus_client's own (text format on any path,
    ``/metrics`` by convention); what is counted lives in
    relaymilter.metrics.milter and relaymilter.metrics.popwatch.

    serve() runs the HTTP endpoint in threads of the calling process: one
    thread accepts, one thread per scrape, at most MAX_SCRAPES (8) at once
    and each silent for SCRAPE_TIMEOUT (5 s) at most; a connection past
    those is closed. Nothing here is imported unless
    metrics are configured, so a milter without them never loads
    prometheus_client.

DIAGNOSTICS
    MetricsError when the address cannot be bound (in use, not local, no
    permission): the caller refuses to start with that one line.
"""

from __future__ import annotations

import socket
import threading
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from relaymilter.errors import RelaymilterError


class MetricsError(RelaymilterError):
    """The metrics endpoint cannot be served."""


# Any local user can connect to a loopback endpoint. Idle or slow connections must not pile up
# threads and descriptors in the process that serves them (the milter's supervisor: out of
# descriptors, it could not even reload its configuration): each connection gets SCRAPE_TIMEOUT
# seconds of socket silence at most, and past MAX_SCRAPES at once a new one is closed unanswered.
MAX_SCRAPES = 8
SCRAPE_TIMEOUT = 5.0


class _Quiet(WSGIRequestHandler):
    timeout = SCRAPE_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:    # noqa: A002 - the base class's name
        pass            # a scrape every few seconds is not worth a log line


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(MAX_SCRAPES)
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)      # MAX_SCRAPES busy already: refuse, hold nothing
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass            # a client gone or silent past the timeout: no traceback in the log


class Endpoint:
    """A running metrics endpoint: its bound address, and how to stop it."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        host, port = server.server_address[:2]
        self.host, self.port = str(host), int(port)

    @property
    def url(self) -> str:
        host = "[%s]" % self.host if ":" in self.host else self.host
        return "http://%s:%d/metrics" % (host, self.port)

    def close_inherited(self) -> None:
        """In a forked child: drop the copy of the listening socket (the parent keeps serving)."""
        self._server.socket.close()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def serve(registry: Any, listen: tuple[str, int]) -> Endpoint:
    """Serve *registry* (a prometheus_client CollectorRegistry) on *listen* = (host, port) in a thread."""
    from prometheus_client import make_wsgi_app

    host, port = listen
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICSERV)[0][0]
    except socket.gaierror as exc:
        raise MetricsError("metrics: cannot resolve %s: %s" % (host, exc.strerror)) from None

    class Server(_Server):
        address_family = family

    try:
        server = Server((host, port), _Quiet)
    except OSError as exc:
        raise MetricsError("metrics: cannot listen on %s:%d: %s" % (host, port, exc.strerror or exc)) from None
    server.set_app(make_wsgi_app(registry))
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()
    return Endpoint(server, thread)
