"""NAME
    relaymilter.metrics - Prometheus metrics of the milter and the log watcher

DESCRIPTION
    Off unless the configuration says where to listen (``metrics: {listen:
    HOST:PORT}`` for the milter, ``popwatch_listen`` for relaymilter-popwatch).
    The exposition is prometheus_client's own (text format on any path,
    ``/metrics`` by convention); what is counted lives in
    relaymilter.metrics.milter and relaymilter.metrics.popwatch.

    serve() runs the HTTP endpoint in threads of the calling process: one
    thread accepts, one thread per scrape. Nothing here is imported unless
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


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:    # noqa: A002 - the base class's name
        pass            # a scrape every few seconds is not worth a log line


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


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
