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

Like a real provider, and only when asked (`Limits`; everything is off by default): an
account-wide rate limit (token bucket, HTTP 429 with OpenAI's body and honest headers), a slot
limit (at most K calls in flight, HTTP 503 beyond), an exhausted quota (429
`insufficient_quota`), a server that refuses `stream` with a JSON-schema `response_format`, a
server that answers N calls at once and queues the rest (`Limits.serve_at_once`; each call's
`queued` seconds are recorded).
A request with `"stream": true` is answered with `chat.completion.chunk` events, paced at
`Reply.tokens_per_second`; see tests/llm_stream.py. Refusals never use up a scripted reply.
`llm.stats()` counts accepted and refused calls.

From a shell (fault tests, benchmarks); `GET /stats` and `GET /calls` answer JSON, `POST
/reset` clears the record and refills the bucket::

    python -m tests.llm_server --port 0 --delay 0.5 --calls-file calls.jsonl
    python -m tests.llm_server --requests-per-second 20 --burst 20
    python -m tests.llm_server --slots 4 --delay 0.2
    python -m tests.llm_server --serve-at-once 2 --tokens-per-second 200
    python -m tests.llm_server --tokens-per-second 50 --steps-file plan.json
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

from planbus.llm.plan import Lead
from planbus.llm.planner import template_steps
from tests.llm_limits import Limits, Refusal, TokenBucket, busy, quota_exhausted
from tests.llm_stream import END, SSE_HEAD, ChunkMaker, event, pieces, step_ends
from tests.llm_wire import completion, http, read_request, usage

__all__ = ["Call", "FakeLLM", "Limits", "Reply"]

STREAM_SCHEMA_REFUSED = (
    "response_format json_schema is not supported with stream=true on this server"
)


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
    # The model's writing pace: one piece of `chunk_chars` characters is one token. A streamed
    # answer sends each piece when written; a whole answer waits until all are. None: at once.
    tokens_per_second: float | None = None
    chunk_chars: int = 4
    cut_after: int | None = None  # streamed: drop the connection after this many pieces
    no_content: bool = False  # streamed: role and finish chunks, no content delta
    # Close the kept-alive connection this long after the answer, without a word (llama.cpp's
    # server does so after every streamed answer): a call sent on it meanwhile is never read.
    close_after: float | None = None


@dataclass
class Call:
    """One request the server received."""

    arrived: float  # time.time() on arrival, after the body was read
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    status: int = 0  # the status answered (0 until answered)
    step_times: list[float] = field(default_factory=list)  # streamed: each step's last piece sent
    finished: float | None = None  # time.time() when the answer was complete
    queued: float = 0.0  # seconds waited in the queue for a place (`Limits.serve_at_once`)

    @property
    def user_message(self) -> str:
        messages = self.body.get("messages", [])
        return "\n".join(str(m.get("content", "")) for m in messages if m.get("role") == "user")

    @property
    def streamed(self) -> bool:
        return bool(self.body.get("stream"))

    def summary(self) -> dict[str, Any]:
        return {
            "arrived": self.arrived,
            "status": self.status,
            "stream": self.streamed,
            "user": self.user_message[:300],
            "step_times": self.step_times,
            "finished": self.finished,
            "queued": self.queued,
        }


COUNTERS = ("accepted", "refused", "rate_limited", "busy", "quota", "rejected", "max_in_flight")


class FakeLLM:
    """The server. Start with `with FakeLLM() as llm:` or `start()`/`stop()`."""

    def __init__(
        self, port: int = 0, default: Reply | None = None, limits: Limits | None = None
    ) -> None:
        self.port = port
        self.default = default or Reply()
        self.limits = limits or Limits()
        self.calls: list[Call] = []
        self.calls_file: Path | None = None
        self.counts = dict.fromkeys(COUNTERS, 0)
        self.in_flight = 0
        self.bucket: TokenBucket | None = None
        self._script: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopping: asyncio.Event | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._places: asyncio.Semaphore | None = None  # `Limits.serve_at_once`
        self.reset()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def script(self, *replies: Reply) -> None:
        """Answer the next calls with these replies, in order, then with the default."""
        with self._lock:
            self._script.extend(replies)

    def stats(self) -> dict[str, int]:
        """Counts since the start (or `reset`): `refused` = `rate_limited` + `busy`."""
        with self._lock:
            return {**self.counts, "in_flight": self.in_flight}

    def reset(self) -> None:
        """Forget the calls and counts; a full bucket and an unspent quota."""
        with self._lock:
            self.calls = []
            self.counts = dict.fromkeys(COUNTERS, 0)
            rate = self.limits.requests_per_second
            self.bucket = None if rate is None else TokenBucket(rate, self.limits.burst)

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
        if self.limits.serve_at_once is not None:
            self._places = asyncio.Semaphore(self.limits.serve_at_once)
        self._server = await asyncio.start_server(
            self._connection, "127.0.0.1", self.port, backlog=1024
        )
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
                request = await read_request(reader)
                if request is None:
                    break
                method, path, headers, body = request
                if method != "POST" or not path.endswith("/chat/completions"):
                    writer.write(self._control(method, path))
                    continue
                call = Call(time.time(), path, headers, body)
                reply = self._admit(call)
                if isinstance(reply, Refusal):
                    writer.write(http(reply.status, reply.body, reply.headers))
                    call.finished = time.time()
                    continue
                try:
                    if not await self._answer_in_turn(call, reply, reader, writer):
                        break
                finally:
                    with self._lock:
                        self.in_flight -= 1
                if reply.close_after is not None:
                    await asyncio.sleep(reply.close_after)
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()

    def _admit(self, call: Call) -> Reply | Refusal:
        """Record the call; refuse it as the provider would, or take its reply."""
        limits = self.limits
        with self._lock:
            self.calls.append(call)
            self._log_call(call)
            refusal, counter = None, ""
            if limits.quota_calls is not None and self.counts["accepted"] >= limits.quota_calls:
                refusal, counter = quota_exhausted(), "quota"
            elif not limits.stream_json_schema and _stream_with_schema(call.body):
                error = {"message": STREAM_SCHEMA_REFUSED, "type": "invalid_request_error"}
                refusal = Refusal(400, {"error": {**error, "param": "response_format"}}, {})
                counter = "rejected"
            elif self.bucket is not None and (refused := self.bucket.take(time.monotonic())):
                refusal, counter = refused, "rate_limited"
            elif limits.slots is not None and self.in_flight >= limits.slots:
                refusal, counter = busy(limits.busy_retry_after), "busy"
            if refusal is not None:
                self.counts[counter] += 1
                self.counts["refused"] += counter in ("rate_limited", "busy")
                call.status = refusal.status
                return refusal
            self.counts["accepted"] += 1
            self.in_flight += 1
            self.counts["max_in_flight"] = max(self.counts["max_in_flight"], self.in_flight)
            return self._script.popleft() if self._script else self.default

    def _log_call(self, call: Call) -> None:
        if self.calls_file is not None:
            with self.calls_file.open("a") as out:
                line = {"arrived": call.arrived, "user": call.user_message[:300]}
                out.write(json.dumps(line) + "\n")

    def _control(self, method: str, path: str) -> bytes:
        """`GET /stats`, `GET /calls`, `POST /reset`: for benchmarks reading another process."""
        if method == "GET" and path.endswith("/stats"):
            return http(200, self.stats(), {})
        if method == "GET" and path.endswith("/calls"):
            with self._lock:
                calls = [call.summary() for call in self.calls]
            return http(200, {"calls": calls}, {})
        if method == "POST" and path.endswith("/reset"):
            self.reset()
            return http(200, {}, {})
        return http(404, {"error": {"message": f"no route {method} {path}"}}, {})

    async def _answer_in_turn(
        self,
        call: Call,
        reply: Reply,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        """Answer at once, or (`serve_at_once`) when a place is free; dropped if the client
        leaves while it waits."""
        if self._places is None:
            return await self._answer(call, reply, writer)
        waited_from = time.time()
        place = asyncio.ensure_future(self._places.acquire())
        gone = asyncio.ensure_future(reader.read(1))  # the client sends nothing more but EOF
        try:
            await asyncio.wait({place, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not place.done():
                place.cancel()
        call.queued = time.time() - waited_from
        if not place.done() or place.cancelled():
            return False  # left while waiting: never served
        try:
            if _client_left(gone):
                return False
            return await self._answer(call, reply, writer)
        finally:
            self._places.release()

    async def _answer(self, call: Call, reply: Reply, writer: asyncio.StreamWriter) -> bool:
        """Send the model's answer; False when the connection is to be closed."""
        if reply.drop:
            return False
        if reply.hang:
            assert self._stopping is not None
            await self._stopping.wait()
            return False
        if reply.delay:
            await asyncio.sleep(reply.delay)
        headers = {**self._limit_headers(), **reply.headers}
        if call.streamed and reply.status == 200 and reply.body is None:
            return await self._stream(call, reply, headers, writer)
        content = _content(reply)
        pace = reply.tokens_per_second
        if reply.status == 200 and reply.body is None and pace:
            # The model writes at its pace even when nobody sees it: when each step was written.
            started, size = time.time(), max(1, reply.chunk_chars)
            call.step_times = [started + -(-end // size) / pace for end in step_ends(content)]
            await asyncio.sleep(len(pieces(content, size)) / pace)
        call.status, call.finished = reply.status, time.time()
        writer.write(_response(reply, call, content, headers))
        await writer.drain()
        return True

    def _limit_headers(self) -> dict[str, str]:
        with self._lock:
            return {} if self.bucket is None else self.bucket.headers(time.monotonic())

    async def _stream(
        self, call: Call, reply: Reply, headers: dict[str, str], writer: asyncio.StreamWriter
    ) -> bool:
        content = "" if reply.no_content else _content(reply)
        # Without a pace the model has written everything at once: one piece, as a fast
        # provider sends a short answer (hundreds of events per call would make the server,
        # not the worker, what a burst of requests measures).
        paced = reply.tokens_per_second or reply.cut_after is not None
        parts = pieces(content, reply.chunk_chars) if paced else [content]
        ends = step_ends(content)
        options = call.body.get("stream_options") or {}
        maker = ChunkMaker(str(call.body.get("model", "fake")), bool(options.get("include_usage")))
        head = SSE_HEAD + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        writer.write(head.encode() + event(maker.chunk({"role": "assistant", "content": ""})))
        call.status = 200
        await writer.drain()
        started, sent = time.monotonic(), 0
        for index, part in enumerate(parts):
            if reply.cut_after is not None and index >= reply.cut_after:
                return False
            if reply.tokens_per_second:
                await _sleep_until(started + (index + 1) / reply.tokens_per_second)
            sent += len(part)
            # Written by the model before it is sent: the client may read it before drain returns.
            while len(call.step_times) < len(ends) and ends[len(call.step_times)] <= sent:
                call.step_times.append(time.time())
            writer.write(event(maker.chunk({"content": part})))
            await writer.drain()
        if reply.cut_after is not None:
            return False
        writer.write(event(maker.chunk({}, "stop")))
        if maker.include_usage:
            writer.write(event(maker.usage_chunk(usage(call.body, content))))
        call.finished = time.time()  # before the write: the client may read it at once
        writer.write(event("[DONE]") + END)
        await writer.drain()
        return True


def _client_left(read: asyncio.Future[bytes]) -> bool:
    if not read.done() or read.cancelled():
        return False
    return read.exception() is not None or read.result() == b""


async def _sleep_until(moment: float) -> None:
    pause = moment - time.monotonic()
    if pause > 0:
        await asyncio.sleep(pause)


def _stream_with_schema(body: dict[str, Any]) -> bool:
    response_format = body.get("response_format") or {}
    return bool(body.get("stream")) and response_format.get("type") == "json_schema"


def _content(reply: Reply) -> str:
    if reply.content is not None:
        return reply.content
    steps = reply.steps or template_steps(Lead(id=0, telegram_id=0))  # type: ignore[arg-type]
    return json.dumps({"steps": steps})


def _response(reply: Reply, call: Call, content: str, headers: dict[str, str]) -> bytes:
    if reply.body is not None or reply.status != 200:
        body = reply.body or {"error": {"message": f"fake error {reply.status}", "type": "fake"}}
        return http(reply.status, body, headers)
    return http(200, completion(call.body, content), headers)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run the fake OpenAI-compatible server.")
    add = parser.add_argument
    add("--port", type=int, default=0)
    add("--delay", type=float, default=0.0, help="seconds before each answer")
    add("--status", type=int, default=200, help="HTTP status of every answer")
    add("--calls-file", type=Path, help="append one JSON line per call")
    add("--steps-file", type=Path, help="a JSON list of plan steps to answer with")
    add("--requests-per-second", type=float, help="account rate limit: 429 beyond it")
    add("--burst", type=int, default=1, help="the rate limit's bucket size")
    add("--slots", type=int, help="calls answered at once: 503 beyond")
    add("--busy-retry-after", type=float, help="retry-after seconds on the 503 (default none)")
    add("--quota-calls", type=int, help="calls before insufficient_quota (0: from the start)")
    add("--no-stream-json-schema", action="store_true", help="400 for stream + json_schema")
    add("--tokens-per-second", type=float, help="the model's writing pace (default instant)")
    add("--chunk-chars", type=int, default=4, help="characters per token (streamed piece)")
    add("--cut-after", type=int, help="drop every stream after this many pieces")
    add("--no-content", action="store_true", help="streams carry no content delta")
    add("--serve-at-once", type=int, help="calls answered at once: the rest wait in a queue")
    return parser.parse_args()


def main() -> None:
    args = _arguments()
    steps = json.loads(args.steps_file.read_text()) if args.steps_file else None
    reply = Reply(
        status=args.status,
        delay=args.delay,
        steps=steps,
        tokens_per_second=args.tokens_per_second,
        chunk_chars=args.chunk_chars,
        cut_after=args.cut_after,
        no_content=args.no_content,
    )
    limits = Limits(
        requests_per_second=args.requests_per_second,
        burst=args.burst,
        slots=args.slots,
        busy_retry_after=args.busy_retry_after,
        quota_calls=args.quota_calls,
        stream_json_schema=not args.no_stream_json_schema,
        serve_at_once=args.serve_at_once,
    )
    server = FakeLLM(args.port, reply, limits)
    server.calls_file = args.calls_file
    server.start()
    print(f"fake LLM listening on {server.base_url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
