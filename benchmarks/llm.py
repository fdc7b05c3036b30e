"""The benchmark's OpenAI-compatible server: one fixed valid plan, set delays, arrival times.

It runs as a process of its own (`python -m benchmarks.llm`), so its CPU time never shares a GIL
with the worker or with the benchmark driver. It is leaner per call than `tests/llm_server.py`
(the answer is built once, the request body is not decoded, nothing is written to a file),
which matters when W2 asks for more than 800 calls a second on two shared cores.

Each call is recorded as `(arrival time, lead key)`: the arrival is `time.time()` once the whole
request has been read; the lead key is the number in "Bench Prospect <key>", the prospect name
that the benchmark gives every lead, which the planner puts in its user message.

Control (JSON over the same port):
    POST /bench/config  {"delay": s, "first_delay": s | null}   also clears the record
    GET  /bench/calls   {"calls": [[arrived, key], ...]}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from typing import Any

from planbus.llm.plan import Lead, LeadId
from planbus.llm.planner import template_steps

MARKER = re.compile(rb"Bench Prospect (\d+)")
PROSPECT_NAME = "Bench Prospect {key}"


def _completion() -> bytes:
    content = json.dumps({"steps": template_steps(Lead(id=LeadId(0), telegram_id=0))})
    return json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": "bench",
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": content},
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
    ).encode()


def _http(body: bytes, status: str = "200 OK") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class BenchLLM:
    """The server's state: the delays in force and every call since the last config."""

    def __init__(self) -> None:
        self.delay = 0.0
        self.first_delay: float | None = None
        self.calls: list[tuple[float, int | None]] = []
        self.seen: set[int | None] = set()
        self.answer = _http(_completion())

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                body = await reader.readexactly(length) if length else b""
                arrived = time.time()
                path = head.split(b" ", 2)[1]
                if path.startswith(b"/bench/"):
                    writer.write(self._control(path, body))
                    continue
                match = MARKER.search(body)
                key = int(match.group(1)) if match else None
                self.calls.append((arrived, key))
                delay = self.delay
                if self.first_delay is not None and key not in self.seen:
                    self.seen.add(key)
                    delay = self.first_delay
                if delay:
                    await asyncio.sleep(delay)
                writer.write(self.answer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def _control(self, path: bytes, body: bytes) -> bytes:
        if path == b"/bench/config":
            config: dict[str, Any] = json.loads(body or b"{}")
            self.delay = float(config.get("delay", 0.0))
            first = config.get("first_delay")
            self.first_delay = None if first is None else float(first)
            self.calls = []
            self.seen = set()
            return _http(b"{}")
        if path == b"/bench/calls":
            return _http(json.dumps({"calls": self.calls}).encode())
        return _http(b'{"error": "unknown"}', "404 Not Found")


async def serve(port: int) -> None:
    state = BenchLLM()
    server = await asyncio.start_server(state.connection, "127.0.0.1", port, backlog=1024)
    print(f"bench LLM listening on port {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the benchmark's OpenAI-compatible server.")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    try:
        asyncio.run(serve(args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
