"""Configuration: environment variables, overridden by command-line flags."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from planbus.errors import ConfigurationError

PlannerName = Literal["openai", "template", "auto"]


class Settings(BaseSettings):
    """Everything the worker reads at start-up; built once and passed down."""

    model_config = SettingsConfigDict(
        env_prefix="PLANBUS_", populate_by_name=True, extra="forbid", frozen=True
    )

    database_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("database_url", "PLANBUS_DATABASE_URL", "DATABASE_URL"),
    )
    # Work connections (claims, heartbeats, effects) through a pooler such as PgBouncer in
    # transaction mode; LISTEN always stays on database_url, which needs a session connection.
    work_database_url: str | None = None
    concurrency: int = Field(default=32, ge=1, le=10_000)
    lease_seconds: float = Field(default=8.0, gt=0.5, le=3600)
    sweep_seconds: float = Field(default=5.0, gt=0, le=3600)
    max_attempts: int = Field(default=3, ge=1, le=100)
    planner: PlannerName = "auto"
    model: str = Field(default="gpt-4o-mini", min_length=1)
    llm_timeout_seconds: float = Field(default=60.0, gt=0, le=3600)

    # Knobs beyond the contract; each is documented in the README.
    retry_base_seconds: float = Field(default=2.0, ge=0, le=3600)
    retry_max_seconds: float = Field(default=300.0, ge=0, le=86_400)
    shutdown_grace_seconds: float = Field(default=20.0, ge=0, le=3600)
    pool_size: int = Field(default=8, ge=1, le=100)
    data_dir: Path = Path(".planbus/postgres")
    # /metrics and /healthz; 0 means off. All interfaces by default, so Prometheus can scrape.
    metrics_port: int = Field(default=0, ge=0, le=65535)
    metrics_host: str = "0.0.0.0"
    # provider limits (docs/llm.md): how long a request may stay throttled before it fails
    # (10 minutes outlasts any per-minute window and a provider's usual brown-out), and an
    # optional ceiling on calls per minute shared by every worker of the database.
    throttle_patience_seconds: float = Field(default=600.0, ge=0, le=86_400)
    llm_requests_per_minute: float | None = Field(default=None, gt=0, le=1_000_000)
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


FLAGS: dict[str, type] = {
    "database_url": str,
    "concurrency": int,
    "lease_seconds": float,
    "sweep_seconds": float,
    "max_attempts": int,
    "planner": str,
    "model": str,
    "llm_timeout_seconds": float,
    "metrics_port": int,  # beyond the contract: the operator's metrics and health endpoint
}


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Add one flag per contract variable; an absent flag leaves the variable in charge."""
    for name, kind in FLAGS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=None)


def load_settings(overrides: dict[str, Any] | None = None) -> Settings:
    """Build settings from the environment plus explicit overrides, or raise one clear error."""
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        problems = "; ".join(f"{_setting_name(err['loc'])}: {err['msg']}" for err in exc.errors())
        raise ConfigurationError(f"invalid configuration: {problems}") from None


def settings_from_args(
    argv: Sequence[str] | None, prog: str
) -> tuple[Settings, argparse.Namespace]:
    """Parse the worker's flags and build settings from them."""
    parser = argparse.ArgumentParser(prog=prog, description="Run the planbus worker.")
    add_flags(parser)
    parser.add_argument("--log-format", choices=["text", "json"], default="text")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    return load_settings({name: getattr(args, name) for name in FLAGS}), args


def _setting_name(loc: tuple[int | str, ...]) -> str:
    field = str(loc[0]) if loc else "settings"
    if field in Settings.model_fields and field not in ("database_url", "openai_api_key"):
        return f"PLANBUS_{field.upper()} (--{field.replace('_', '-')})"
    return field
