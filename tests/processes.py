"""Real worker processes for fault tests and the soak: start, read the log, signal, reap, measure.

`python -m planbus.listen` runs as a child process against a test database (and, for the
openai planner, the FakeLLM). Its log goes to a file, so reading it never blocks the child.
Every wait has a deadline and polls state (the log, the process, /proc); nothing sleeps a
fixed time to let something happen.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import anyio
from anyio.abc import Process

READY_LINE = "listening on channel plan_requests"

# Quick retries, so a test that injects LLM errors does not wait out production backoff.
TEST_ENV = {
    "PLANBUS_RETRY_BASE_SECONDS": "0.05",
    "PLANBUS_RETRY_MAX_SECONDS": "0.2",
    "PLANBUS_SHUTDOWN_GRACE_SECONDS": "5",
    "PLANBUS_POOL_SIZE": "4",
}


class WorkerProcess:
    """One `python -m planbus.listen` child process and its log file."""

    def __init__(
        self,
        database_url: str,
        log_path: Path,
        *,
        llm_base_url: str | None = None,
        flags: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        module: str = "planbus.listen",
    ) -> None:
        self.database_url = database_url
        self.module = module  # what `python -m` runs: the worker, or a script that wraps it
        self.log_path = log_path
        self.llm_base_url = llm_base_url
        self.flags = list(flags)
        self.extra_env = dict(env or {})
        self.process: Process | None = None
        self.returncode: int | None = None
        self.started_at = 0.0  # monotonic, when the process was spawned
        self.ready_at = 0.0  # monotonic, when its ready line was seen
        self._log_file: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None, "worker not started"
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def environment(self) -> dict[str, str]:
        """The parent's environment without any planbus/openai/OpenTelemetry settings, plus the
        test's."""
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("PLANBUS_", "OPENAI_", "OTEL_")) and key != "DATABASE_URL"
        }
        env.update(TEST_ENV)
        env["PLANBUS_DATABASE_URL"] = self.database_url
        if self.llm_base_url is None:
            env["PLANBUS_PLANNER"] = "template"
        else:
            env["PLANBUS_PLANNER"] = "openai"
            env["OPENAI_BASE_URL"] = self.llm_base_url
            env["OPENAI_API_KEY"] = "test-key"
        env.update(self.extra_env)
        return env

    async def start(self, within: float = 30.0) -> WorkerProcess:
        """Spawn the worker and return once it logged that it listens (or fail at the deadline)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = self.log_path.open("ab")
        self.started_at = time.monotonic()
        self.process = await anyio.open_process(
            [sys.executable, "-m", self.module, *self.flags],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=self._log_file,
            env=self.environment(),
        )
        await self.wait_for_log(READY_LINE, within=within)
        self.ready_at = time.monotonic()
        return self

    def log(self) -> str:
        """Everything the worker has logged so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    async def wait_for_log(
        self, text: str | re.Pattern[str], within: float = 15.0, *, count: int = 1
    ) -> str:
        """Wait until `text` (a string or a pattern) appears in the log `count` times; fail
        early if the worker exits."""
        with anyio.move_on_after(within):
            while True:
                log = self.log()
                found = len(text.findall(log)) if isinstance(text, re.Pattern) else log.count(text)
                if found >= count:
                    return log
                if self.process is not None and self.process.returncode is not None:
                    raise AssertionError(
                        f"worker {self.pid} exited ({self.process.returncode}) before logging "
                        f"{text!r}; log tail:\n{_tail(log)}"
                    )
                await anyio.sleep(0.02)
        raise AssertionError(
            f"worker did not log {text!r} within {within}s; log tail:\n{_tail(self.log())}"
        )

    def send(self, signum: int) -> None:
        """Deliver a signal (SIGKILL, SIGSTOP, SIGCONT, SIGTERM, ...) to the worker."""
        assert self.process is not None, "worker not started"
        self.process.send_signal(signal.Signals(signum))

    async def wait(self, within: float = 30.0) -> int:
        """Reap the worker and return its exit code, or fail at the deadline."""
        assert self.process is not None, "worker not started"
        with anyio.move_on_after(within):
            self.returncode = await self.process.wait()
            self._close_log()
            return self.returncode
        raise AssertionError(f"worker {self.pid} still running after {within}s")

    async def kill(self) -> None:
        """SIGKILL and reap: the worker dies mid-whatever, as in a crash or OOM kill."""
        if self.process is None or self.returncode is not None:
            return
        if self.process.returncode is None:
            # SIGKILL ends a stopped process too, so no SIGCONT is needed first.
            with contextlib.suppress(ProcessLookupError):  # it exited just now
                self.send(signal.SIGKILL)
        await self.wait()

    async def terminate(self, within: float = 30.0) -> tuple[int, float]:
        """SIGTERM and reap; the exit code and the seconds it took to exit."""
        sent = time.monotonic()
        self.send(signal.SIGTERM)
        code = await self.wait(within)
        return code, time.monotonic() - sent

    def memory_kb(self) -> dict[str, int]:
        """VmRSS (now) and VmHWM (peak resident set) of the live worker, from /proc, in kB."""
        figures: dict[str, int] = {}
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    figures[key] = int(value.split()[0])
        return figures

    async def aclose(self) -> None:
        """Whatever state it is in, make sure the worker is gone and reaped."""
        try:
            await self.kill()
        finally:
            self._close_log()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


class Fleet:
    """Worker processes started by one test or script; `aclose()` reaps every one of them."""

    def __init__(self, database_url: str, log_dir: Path, llm_base_url: str | None = None) -> None:
        self.database_url = database_url
        self.log_dir = log_dir
        self.llm_base_url = llm_base_url
        self.workers: list[WorkerProcess] = []

    async def start(
        self,
        *flags: str,
        env: Mapping[str, str] | None = None,
        planner: str | None = None,
        within: float = 30.0,
    ) -> WorkerProcess:
        """Start one more worker; `planner="template"` ignores the fleet's LLM."""
        llm = None if planner == "template" else self.llm_base_url
        worker = WorkerProcess(
            self.database_url,
            self.log_dir / f"worker-{len(self.workers) + 1}.log",
            llm_base_url=llm,
            flags=flags,
            env=env,
        )
        self.workers.append(worker)
        return await worker.start(within)

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            for worker in self.workers:
                await worker.aclose()

    async def __aenter__(self) -> Fleet:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.splitlines()[-lines:])
