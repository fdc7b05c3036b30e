"""A real OpenAI-compatible HTTP server on loopback, for tests, fault scenarios and benchmarks.

It speaks just enough of `POST /v1/chat/completions` for the `openai` SDK: it answers with a
valid engagement plan unless told otherwise, and records every call (arrival time, body,
headers). It runs its own asyncio loop in a thread, so sync tests, async tests and other
processes can all use it.

In a test::

    with FakeLLM() as llm:
        llm.script(Reply(status=500), Reply(delay=0.2))   # then the default plan
        ... OPENAI_BASE_URL=llm.base_url ...
        assert len(llm.calls) == 2

From a shell (fault tests, benchmarks)::

    python -m tests.llm_server --port 0 --delay 0.5 --calls-file calls.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from planbus.plan import Lead
from planbus.planner import template_steps


@dataclass
class Reply:
    """One scripted answer. Default: 200 with a valid plan, at once."""

    status: int = 200
    delay: float = 0.0
    content: str | None = None  # the assistant message content; None = a valid plan
    steps: list[dict[str, Any]] | None = None  # the plan's steps instead of the default
    headers: dict[str, str] = field(default_factory=dict)
    body: dict[str, Any] | None = None  # the whole JSON body, for error answers
    hang: bool = False  # never answer (until the server stops)
    drop: bool = False  # close the connection without answering


@dataclass
class Call:
    """One request the server received."""

    arrived: float  # time.time() on arrival, after the body was read
    path: str
    headers: dict[str, str]
    body: dict[str, Any]

    @property
    def user_message(self) -> str:
        messages = self.body.get("messages", [])
        return "\n".join(str(m.get("content", "")) for m in messages if m.get("role") == "user")


class FakeLLM:
    """The server. Start with `with FakeLLM() as llm:` or `start()`/`stop()`."""

    def __init__(self, port: int = 0, default: Reply | None = None) -> None:
        self.port = port
        self.default = default or Reply()
        self.calls: list[Call] = []
        self.calls_file: Path | None = None
        self._script: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopping: asyncio.Event | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def script(self, *replies: Reply) -> None:
        """Answer the next calls with these replies, in order, then with the default."""
        with self._lock:
            self._script.extend(replies)

    def start(self) -> FakeLLM:
        self._thread = threading.Thread(target=self._run, name="fake-llm", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake LLM server did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> FakeLLM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the server ------------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stopping.wait()
        self._server.close()
        # End open connections too, so hanging calls end and the client sees a drop.
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    break
                path, headers, body = request
                call = Call(time.time(), path, headers, body)
                with self._lock:
                    self.calls.append(call)
                    reply = self._script.popleft() if self._script else self.default
                    if self.calls_file is not None:
                        with self.calls_file.open("a") as out:
                            out.write(
                                json.dumps(
                                    {"arrived": call.arrived, "user": call.user_message[:300]}
                                )
                                + "\n"
                            )
                if reply.drop:
                    break
                if reply.hang:
                    assert self._stopping is not None
                    await self._stopping.wait()
                    break
                if reply.delay:
                    await asyncio.sleep(reply.delay)
                writer.write(_response(reply, call))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()


async def _read_request(
    reader: asyncio.StreamReader,
) -> tuple[str, dict[str, str], dict[str, Any]] | None:
    head = await reader.readuntil(b"\r\n\r\n") if not reader.at_eof() else b""
    if not head:
        return None
    lines = head.decode("latin-1").split("\r\n")
    _method, path, _version = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    raw = await reader.readexactly(int(headers.get("content-length", "0")))
    return path, headers, json.loads(raw) if raw else {}


def _response(reply: Reply, call: Call) -> bytes:
    if reply.body is not None or reply.status != 200:
        body = reply.body or {"error": {"message": f"fake error {reply.status}", "type": "fake"}}
    else:
        content = reply.content
        if content is None:
            steps = reply.steps or template_steps(Lead(id=0, telegram_id=0))  # type: ignore[arg-type]
            content = json.dumps({"steps": steps})
        body = {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": call.body.get("model", "fake"),
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": content},
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
    payload = json.dumps(body).encode()
    headers = {
        "content-type": "application/json",
        "content-length": str(len(payload)),
        **reply.headers,
    }
    head = f"HTTP/1.1 {reply.status} {_REASONS.get(reply.status, 'Status')}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return head.encode() + b"\r\n" + payload


_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the fake OpenAI-compatible server.")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--status", type=int, default=200, help="HTTP status of every answer")
    parser.add_argument("--calls-file", type=Path, help="append one JSON line per call")
    args = parser.parse_args()
    server = FakeLLM(args.port, Reply(status=args.status, delay=args.delay))
    server.calls_file = args.calls_file
    server.start()
    print(f"fake LLM listening on {server.base_url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
