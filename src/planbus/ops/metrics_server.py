"""A small HTTP/1.1 server for GET /metrics and GET /healthz; it knows nothing of the worker.

`scrape()` renders the exposition and `health()` says whether the process is fit, so the same
server serves whatever the caller wires in (`runtime.serve_metrics` wires a worker's).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial

import anyio
from anyio.abc import SocketAttribute, SocketListener, SocketStream, TaskGroup, TaskStatus
from anyio.streams.stapled import MultiListener

from planbus.errors import ConfigurationError

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST_BYTES = 8192
# Bounds, so that no client can take the worker's file descriptors or its time: at most this
# many connections at once, each given this long to send its request and this long in all.
MAX_CONNECTIONS = 32
READ_TIMEOUT_SECONDS = 2.0
ANSWER_TIMEOUT_SECONDS = 10.0
# After a failed accept (EMFILE and the like), wait this long before the next one.
ACCEPT_PAUSE_SECONDS = 0.1

Scrape = Callable[[], Awaitable[bytes]]
Health = Callable[[], Awaitable[tuple[bool, str]]]


async def listen(host: str, port: int) -> MultiListener[SocketStream]:
    """host:port, bound; a port in use (or a host it cannot bind) is a configuration error.

    The entry point binds before it starts anything, so that a taken port changes nothing.
    """
    try:
        return await anyio.create_tcp_listener(local_host=host, local_port=port)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot serve metrics on {host}:{port} ({exc.strerror or exc}): "
            "choose another --metrics-port"
        ) from None


async def serve(
    host: str,
    port: int,
    scrape: Scrape,
    health: Health,
    *,
    bound: MultiListener[SocketStream] | None = None,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Answer GET /metrics and GET /healthz on host:port (or on the listener `bound` there
    already) until cancelled; reports the port."""
    listener = bound or await listen(host, port)
    port = int(listener.extra(SocketAttribute.local_port))
    log.info("metrics on http://%s:%d/metrics, health on /healthz", host, port)
    task_status.started(port)
    connections = Connections(partial(_answer, scrape, health))
    async with listener, anyio.create_task_group() as tg:
        for each in listener.listeners:  # one per address family the host resolved to
            assert isinstance(each, SocketListener)
            tg.start_soon(connections.accept_forever, each, tg)


class Connections:
    """The open connections, oldest first, at most MAX_CONNECTIONS of them.

    When full, a new client takes the place of the oldest one still sending its request: idle
    connections, however many, cannot keep a scrape out. A failed accept (out of file
    descriptors, say) is logged and survived: it also drops the oldest idle connection.
    """

    def __init__(self, answer: Callable[[SocketStream, str | None], Awaitable[None]]) -> None:
        self.answer = answer
        self.open = 0
        self.reading: dict[int, anyio.CancelScope] = {}  # insertion order: oldest first
        self.dropped: set[int] = set()  # dropped by drop_oldest_idle, their tasks not yet over
        self._freed = anyio.Event()
        self._accept_failed = False

    async def accept_forever(self, listener: SocketListener, tg: TaskGroup) -> None:
        while True:
            while self.open >= MAX_CONNECTIONS and not self.drop_oldest_idle():
                await self._freed.wait()  # every connection is being answered: a moment
                self._freed = anyio.Event()
            try:
                stream = await listener.accept()
            except OSError as exc:
                if not self._accept_failed:
                    log.warning("metrics: cannot accept a connection (%s); retrying", exc)
                self._accept_failed = True
                self.drop_oldest_idle()
                await anyio.sleep(ACCEPT_PAUSE_SECONDS)
                continue
            if self._accept_failed:
                log.info("metrics: accepting connections again")
            self._accept_failed = False
            self.open += 1
            tg.start_soon(self._serve_one, stream)

    def drop_oldest_idle(self) -> bool:
        """Close the oldest connection still sending its request; False if there is none."""
        for key, scope in self.reading.items():
            del self.reading[key]
            scope.cancel()
            self.open -= 1  # its place is free now, though its task ends a moment later
            self.dropped.add(key)
            return True
        return False

    async def _serve_one(self, stream: SocketStream) -> None:
        key = id(stream)
        try:
            async with stream:
                with anyio.CancelScope() as reading:
                    self.reading[key] = reading
                    with anyio.fail_after(READ_TIMEOUT_SECONDS):
                        path = await _read_path(stream)
                self.reading.pop(key, None)
                if not reading.cancel_called:  # not dropped for a newer client
                    with anyio.fail_after(ANSWER_TIMEOUT_SECONDS):
                        await self.answer(stream, path)
        except (TimeoutError, anyio.BrokenResourceError, anyio.EndOfStream, OSError):
            pass  # a client that went away or never finished its request deserves nothing more
        finally:
            self.reading.pop(key, None)
            if key in self.dropped:
                self.dropped.discard(key)
            else:
                self.open -= 1
            self._freed.set()


async def _answer(scrape: Scrape, health: Health, stream: SocketStream, path: str | None) -> None:
    if path == "/metrics":
        await _respond(stream, 200, await scrape(), CONTENT_TYPE)
    elif path == "/healthz":
        ok, reason = await health()
        await _respond(stream, 200 if ok else 503, f"{reason}\n".encode())
    elif path is None:
        await _respond(stream, 400, b"bad request\n")
    else:
        await _respond(stream, 404, b"try /metrics or /healthz\n")


async def _read_path(stream: SocketStream) -> str | None:
    data = b""
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        data += await stream.receive()
        if len(data) > MAX_REQUEST_BYTES:
            return None
    parts = data.split(b"\r\n", 1)[0].split()
    if len(parts) < 2 or parts[0] != b"GET":
        return None
    return parts[1].decode("latin-1").split("?", 1)[0]


REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 503: "Service Unavailable"}


async def _respond(
    stream: SocketStream, status: int, body: bytes, content_type: str = "text/plain"
) -> None:
    head = (
        f"HTTP/1.1 {status} {REASONS[status]}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    await stream.send(head.encode("latin-1") + body)
