"""`python -m tests.otel_probe [--without-otel] [flags]`: the worker, telling what it imported.

It runs `python -m planbus.listen` with the given flags, unchanged, and when the process exits
prints one line naming the `opentelemetry` modules it loaded (`otel modules: [...]`).
`--without-otel` first makes every `opentelemetry` import fail, as on an install without the
`otel` extra.
"""

from __future__ import annotations

import atexit
import runpy
import sys


def loaded() -> list[str]:
    return sorted(
        name
        for name, module in sys.modules.items()
        if name.split(".")[0] == "opentelemetry" and module is not None
    )


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["--without-otel"]:
        args = args[1:]
        sys.modules["opentelemetry"] = None  # type: ignore[assignment]
    atexit.register(lambda: print(f"otel modules: {loaded()}", flush=True))
    sys.argv = ["planbus.listen", *args]
    runpy.run_module("planbus.listen", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
