"""A small HTTP/1.1 server for GET /metrics and GET /healthz; it knows nothing of the worker.

`scrape()` renders the exposition and `health()` says whether the process is fit, so the same
server serves whatever the caller wires in (`runtime.serve_metrics` wires a worker's).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial

import anyio
from anyio.abc import SocketAttribute, SocketStream, TaskStatus

from planbus.errors import ConfigurationError

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST_BYTES = 8192

Scrape = Callable[[], Awaitable[bytes]]
Health = Callable[[], Awaitable[tuple[bool, str]]]


async def serve(
    host: str,
    port: int,
    scrape: Scrape,
    health: Health,
    *,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Answer GET /metrics and GET /healthz on host:port until cancelled; reports the port."""
    try:
        listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot serve metrics on {host}:{port} ({exc.strerror or exc}): "
            "choose another --metrics-port"
        ) from None
    bound = int(listener.extra(SocketAttribute.local_port))
    log.info("metrics on http://%s:%d/metrics, health on /healthz", host, bound)
    task_status.started(bound)
    async with listener:
        await listener.serve(partial(_handle, scrape, health))


async def _handle(scrape: Scrape, health: Health, stream: SocketStream) -> None:
    async with stream:
        try:
            with anyio.fail_after(5):
                path = await _read_path(stream)
            if path == "/metrics":
                await _respond(stream, 200, await scrape(), CONTENT_TYPE)
            elif path == "/healthz":
                ok, reason = await health()
                await _respond(stream, 200 if ok else 503, f"{reason}\n".encode())
            elif path is None:
                await _respond(stream, 400, b"bad request\n")
            else:
                await _respond(stream, 404, b"try /metrics or /healthz\n")
        except (TimeoutError, anyio.BrokenResourceError, anyio.EndOfStream, OSError):
            pass  # a client that went away or never finished its request deserves nothing more


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
