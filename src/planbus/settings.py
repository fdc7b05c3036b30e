"""Configuration: environment variables, overridden by command-line flags."""

from __future__ import annotations

import argparse
import difflib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NoReturn, get_args

from pydantic import AliasChoices, Field, SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

from planbus import logs
from planbus.errors import ConfigurationError

log = logging.getLogger("planbus.settings")

PlannerName = Literal["openai", "template", "auto"]
ENV_PREFIX = "PLANBUS_"
# PLANBUS_* variables that are not settings but are read by someone else on purpose.
OTHER_VARIABLES = frozenset(
    {"PLANBUS_TEST_DATABASE_URL", "PLANBUS_CACHE_DIR", "PLANBUS_LLAMA_THREADS"}  # tests, benchmarks
)
# Settings that never get a flag: a secret on a command line shows in `ps` and shell history.
NO_FLAG = frozenset({"openai_api_key", "dashboard_token"})
# Settings of `python -m planbus dashboard`, whose flags are its own (--host, --port).
DASHBOARD_ONLY = frozenset({"dashboard_host", "dashboard_port"})
# A lease this many times shorter than the sweep buys no faster recovery: the sweep decides it.
LEASE_SWEEP_RATIO = 4


class Settings(BaseSettings):
    """Everything the worker reads at start-up; built once and passed down."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, populate_by_name=True, extra="forbid", frozen=True
    )

    database_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("database_url", "PLANBUS_DATABASE_URL", "DATABASE_URL"),
        description="PostgreSQL to use, a URL or conninfo string (default: the embedded server)",
    )
    # Work connections (claims, heartbeats, effects) through a pooler such as PgBouncer in
    # transaction mode; LISTEN always stays on database_url, which needs a session connection.
    work_database_url: str | None = Field(
        default=None,
        description="work connections through a transaction pooler; LISTEN stays on the "
        "database URL (default: the database URL)",
    )
    concurrency: int = Field(
        default=32, ge=1, le=10_000, description="requests processed at once by one process"
    )
    lease_seconds: float = Field(
        default=8.0,
        gt=0.5,
        le=3600,
        description="how long a claim lives without a heartbeat; the heartbeat runs every lease/4",
    )
    sweep_seconds: float = Field(
        default=5.0,
        gt=0,
        le=3600,
        description="period of the fallback sweep (expired claims, unannounced rows)",
    )
    max_attempts: int = Field(
        default=3, ge=1, le=100, description="claims before a request is failed"
    )
    planner: PlannerName = Field(
        default="auto",
        description="who writes plans: auto means openai when OPENAI_API_KEY is set, else template",
    )
    model: str = Field(default="gpt-4o-mini", min_length=1, description="model sent to the LLM")
    llm_timeout_seconds: float = Field(
        default=60.0, gt=0, le=3600, description="timeout of one LLM call"
    )
    retry_base_seconds: float = Field(
        default=2.0,
        ge=0,
        le=3600,
        description="first retry delay; doubles per attempt, with jitter",
    )
    retry_max_seconds: float = Field(
        default=300.0,
        ge=0,
        le=86_400,
        description="cap of the retry delay (and of an honoured Retry-After)",
    )
    shutdown_grace_seconds: float = Field(
        default=20.0,
        ge=0,
        le=3600,
        description="on SIGTERM/SIGHUP/SIGINT, how long in-flight requests may finish",
    )
    pool_size: int = Field(
        default=8, ge=1, le=100, description="most pooled work connections per process"
    )
    # None: the embedded module finds the default (the checkout's .planbus/postgres, else a
    # per-user folder), the same from every current directory.
    data_dir: Path | None = Field(
        default=None,
        description="data folder of the embedded server (default: .planbus/postgres in the "
        "checkout, else $XDG_DATA_HOME/planbus/postgres)",
    )
    # /metrics and /healthz; 0 means off. Loopback by default: docs/deploy.md says when to bind
    # wider.
    metrics_port: int = Field(
        default=0, ge=0, le=65535, description="serve /metrics and /healthz on this port; 0: off"
    )
    metrics_host: str = Field(
        default="127.0.0.1",
        description="address the metrics port binds to (0.0.0.0 for a scraper on another host)",
    )
    # `python -m planbus dashboard` (docs/operations.md): loopback unless a token is set.
    dashboard_host: str = Field(
        default="127.0.0.1",
        description="address the dashboard binds to; any other than loopback needs "
        "PLANBUS_DASHBOARD_TOKEN",
    )
    dashboard_port: int = Field(
        default=8787, ge=0, le=65535, description="port of the dashboard; 0: any free port"
    )
    dashboard_token: SecretStr | None = Field(
        default=None,
        description="the token every page and action of the dashboard then needs",
    )
    # provider limits (docs/llm.md): 10 minutes of patience outlasts any per-minute window and a
    # provider's usual brown-out; the ceiling is off unless the operator knows the account's.
    throttle_patience_seconds: float = Field(
        default=600.0,
        ge=0,
        le=86_400,
        description="how long a request may be throttled (HTTP 429/503) without a break "
        "before it fails",
    )
    llm_requests_per_minute: float | None = Field(
        default=None,
        gt=0,
        le=1_000_000,
        description="ceiling on LLM calls per minute, shared by every worker of the database",
    )
    # progress: while a plan streams, its finished steps are copied to `progress` at most this
    # often per request, and not within this long of the model's first token.
    progress_interval_seconds: float = Field(
        default=0.25,
        ge=0,
        le=60,
        description="while a plan streams, the least time between two writes of a request's "
        "progress (steps finished within it share a write)",
    )
    openai_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("openai_api_key", "OPENAI_API_KEY")
    )

    @property
    def heartbeat_seconds(self) -> float:
        """Heartbeat period: four beats per lease, so one late beat never loses a claim."""
        return self.lease_seconds / 4

    @property
    def resolved_planner(self) -> Literal["openai", "template"]:
        """`auto` means openai when an API key is configured, else the offline template."""
        if self.planner == "auto":
            return "openai" if self.openai_api_key else "template"
        return self.planner


# Every setting but the secrets and the dashboard's has a flag on `python -m planbus.listen`.
FLAGS: tuple[str, ...] = tuple(
    name for name in Settings.model_fields if name not in NO_FLAG | DASHBOARD_ONLY
)


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line and exit 2, as every bad value does."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (--help lists every flag)\n")


def flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def variables(name: str) -> list[str]:
    """The environment variables a setting is read from, first one wins."""
    alias = Settings.model_fields[name].validation_alias
    if isinstance(alias, AliasChoices):
        return [str(choice) for choice in alias.choices if str(choice).isupper()]
    return [f"{ENV_PREFIX}{name.upper()}"]


def flag_help(name: str, field: FieldInfo) -> str:
    """The description, the default, the variables and the choices of one setting."""
    parts = [field.description or name.replace("_", " ")]
    if field.default is not None:
        parts.append(f"default: {field.default}")
    parts.append("env: " + " or ".join(variables(name)))
    choices = get_args(field.annotation) if name == "planner" else ()
    if choices:
        parts.append("choices: " + ", ".join(choices))
    return f"{parts[0]} ({'; '.join(parts[1:])})"


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; an absent flag leaves the variable (or the default) in charge."""
    for name in FLAGS:
        field = Settings.model_fields[name]
        kind: type = int if field.annotation is int else float if field.annotation is float else str
        parser.add_argument(
            flag(name),
            dest=name,
            type=kind,
            default=None,
            metavar=name.rsplit("_", 1)[-1].upper(),
            help=flag_help(name, field),
        )


def load_settings(
    overrides: dict[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Build settings from the environment plus explicit overrides, or raise one clear error.

    The keys of `overrides` are the settings the caller has flags for, given or not: an error
    names a flag only when the command the operator ran has it.
    """
    overrides = overrides or {}
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        settings = Settings(**given)
    except ValidationError as exc:
        problems = "; ".join(
            f"{_setting_name(err['loc'], overrides)}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigurationError(f"invalid configuration: {problems}") from None
    for warning in settings_warnings(settings, os.environ if environ is None else environ):
        log.warning("%s", warning)
    return settings


def settings_warnings(settings: Settings, environ: Mapping[str, str]) -> list[str]:
    """What is accepted but probably not meant: misspelt variables, a lease the sweep outruns."""
    warnings = []
    known = {v for name in Settings.model_fields for v in variables(name)} | OTHER_VARIABLES
    unknown = sorted(k for k in environ if k.startswith(ENV_PREFIX) and k not in known)
    if unknown:
        guesses = [
            f"{name} (did you mean {close[0]}?)" if close else name
            for name in unknown
            for close in [difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.8)]
        ]
        warnings.append("unknown environment variables ignored: " + ", ".join(guesses))
    lease, sweep = settings.lease_seconds, settings.sweep_seconds
    if sweep > LEASE_SWEEP_RATIO * lease:
        warnings.append(
            f"lease {lease:g} s is much shorter than the sweep period {sweep:g} s: a crashed "
            f"worker's requests wait up to lease + sweep = {lease + sweep:g} s before another "
            "worker takes them over; lower PLANBUS_SWEEP_SECONDS for faster recovery"
        )
    return warnings


def settings_from_args(
    argv: Sequence[str] | None, prog: str
) -> tuple[Settings, argparse.Namespace]:
    """Parse the worker's flags, set up logging, and build settings from them."""
    parser = OneLineParser(
        prog=prog,
        description="Run the planbus worker. Every flag overrides its environment variable.",
    )
    add_flags(parser)
    logs.add_flags(parser, default_level="INFO")
    args = parser.parse_args(argv)
    logs.configure(args.log_format, args.log_level)
    return load_settings({name: getattr(args, name) for name in FLAGS}), args


def _setting_name(loc: tuple[int | str, ...], flags: Mapping[str, Any]) -> str:
    """`PLANBUS_POOL_SIZE (--pool-size)`, the flag only when the command has it."""
    field = str(loc[0]) if loc else "settings"
    if field not in Settings.model_fields:
        return field
    names = " or ".join(variables(field))
    return f"{names} ({flag(field)})" if field in flags else names
