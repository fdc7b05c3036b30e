"""The benchmark's OpenAI-compatible server: one fixed valid plan, set delays, arrival times.

It runs as a process of its own (`python -m benchmarks.llm`), so its CPU time never shares a GIL
with the worker or with the benchmark driver. It is leaner per call than `tests/llm_server.py`
(the answer is built once, the request body is not decoded, nothing is written to a file),
which matters when W2 asks for more than 800 calls a second on two shared cores.

Each call is recorded as `(arrival time, lead key)`: the arrival is `time.time()` once the whole
request has been read; the lead key is the number in "Bench Prospect <key>", the prospect name
that the benchmark gives every lead, which the planner puts in its user message.

With `stream_rate` set, a call that asks for `"stream": true` gets an eight-step plan as
server-sent events, one 4-character token at a time at that many tokens per second, and the
server records when each step's text was fully sent and when the answer ended (the "time to
first step" workload compares those with when the Mini App could read each step).

Control (JSON over the same port):
    POST /bench/config  {"delay": s, "first_delay": s | null, "stream_rate": tokens/s | null}
                        also clears the record
    GET  /bench/calls   {"calls": [[arrived, key], ...]}
    GET  /bench/steps   {"steps": {key: [step 1 sent, ..., step N sent, answer ended]}}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from typing import Any

from planbus.plan import Lead, LeadId
from planbus.planner import template_steps

MARKER = re.compile(rb"Bench Prospect (\d+)")
PROSPECT_NAME = "Bench Prospect {key}"
STREAM_ASKED = re.compile(rb'"stream":\s*true')
TOKEN_CHARACTERS = 4  # about one token of English or JSON


def streamed_steps() -> list[dict[str, Any]]:
    """Eight valid steps: the template's six, then two more follow-ups."""
    steps = template_steps(Lead(id=LeadId(0), telegram_id=0))
    for delay in (15, 21):
        steps.append(
            {
                **steps[-2],
                "step_id": len(steps) + 1,
                "timing": f"Day {delay}",
                "delay_days": delay,
            }
        )
    return steps


def _sse(payload: dict[str, Any]) -> bytes:
    """One server-sent event as one HTTP chunk."""
    event = b"data: " + json.dumps(payload).encode() + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(event), event)


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
        self.stream_rate: float | None = None
        self.step_times: dict[int | None, list[float]] = {}
        self.stream_content = json.dumps({"steps": streamed_steps()})
        # Where each step's closing brace is in the streamed text (`}, {"step_id": n + 1`).
        self.step_ends = [
            self.stream_content.index(f'"step_id": {step_id + 1}') - 4
            for step_id in range(1, len(streamed_steps()))
        ] + [len(self.stream_content) - 3]

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
                if self.stream_rate and STREAM_ASKED.search(body):
                    await self._stream(writer, key, self.stream_rate)
                    continue
                writer.write(self.answer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _stream(self, writer: asyncio.StreamWriter, key: int | None, rate: float) -> None:
        """The plan as Chat Completions chunks, `rate` tokens per second, step times recorded."""
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        times = self.step_times[key] = []
        content = self.stream_content
        started = time.monotonic()
        for number, start in enumerate(range(0, len(content), TOKEN_CHARACTERS), start=1):
            # Paced against the start, so sleep overshoots do not add up.
            await asyncio.sleep(max(0.0, started + number / rate - time.monotonic()))
            piece = content[start : start + TOKEN_CHARACTERS]
            writer.write(_sse({"choices": [{"index": 0, "delta": {"content": piece}}]}))
            await writer.drain()
            now = time.time()
            times.extend(now for end in self.step_ends[len(times) :] if end < start + len(piece))
        writer.write(_sse({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
        writer.write(_sse({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}))
        writer.write(b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")
        await writer.drain()
        times.append(time.time())

    def _control(self, path: bytes, body: bytes) -> bytes:
        if path == b"/bench/config":
            config: dict[str, Any] = json.loads(body or b"{}")
            self.delay = float(config.get("delay", 0.0))
            first = config.get("first_delay")
            self.first_delay = None if first is None else float(first)
            rate = config.get("stream_rate")
            self.stream_rate = None if rate is None else float(rate)
            self.calls = []
            self.seen = set()
            self.step_times = {}
            return _http(b"{}")
        if path == b"/bench/calls":
            return _http(json.dumps({"calls": self.calls}).encode())
        if path == b"/bench/steps":
            return _http(json.dumps({"steps": self.step_times}).encode())
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
