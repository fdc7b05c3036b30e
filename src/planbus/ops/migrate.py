"""Running the alembic migrations from code (the embedded default and the tests)."""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config
from alembic.script import ScriptDirectory
from alembic.util import CommandError

from alembic import command
from planbus.errors import ConfigurationError, one_line

# The session advisory lock alembic/env.py holds while it migrates a database ("planbus" in
# ASCII), so two `alembic upgrade head` at once run one after the other.
MIGRATION_LOCK = 0x706C616E627573


def script_location() -> Path:
    """The migrations: inside the package in a wheel, at the repository root in a checkout."""
    package = Path(__file__).resolve().parents[1]  # src/planbus, or planbus in a wheel
    for candidate in (package / "alembic", package.parents[1] / "alembic"):
        if (candidate / "env.py").is_file():
            return candidate
    raise ConfigurationError("planbus migrations not found; reinstall planbus")


def alembic_config(dsn: str) -> Config:
    """An alembic config that migrates `dsn`, independent of the working directory."""
    config = Config()
    config.set_main_option("script_location", str(script_location()))
    config.set_main_option("path_separator", "os")
    config.attributes["dsn"] = dsn
    return config


def upgrade(dsn: str, target: str = "head", current: str | None = None) -> None:
    """`alembic upgrade <target>` against `dsn`, which stands at `current`; a target that is
    unknown or behind `current` raises ConfigurationError (downgrades are never implicit)."""
    if current is not None and target in revisions_between(None, current)[:-1]:
        raise ConfigurationError(
            f"the database is at {current}, past {target}; to go back, run "
            f"`alembic downgrade {target}` from the repository checkout"
        )
    try:
        command.upgrade(alembic_config(dsn), target)
    except CommandError as exc:
        raise ConfigurationError(f"cannot migrate to {target!r}: {one_line(exc)}") from None


def revisions_between(older: str | None, newer: str) -> list[str]:
    """The revisions an upgrade from `older` (None: an empty schema) to `newer` applies, in
    the order it applies them."""
    script = ScriptDirectory(str(script_location()))
    steps = script.iterate_revisions(newer, older or "base")
    return [revision.revision for revision in reversed(list(steps))]


def downgrade(dsn: str, target: str = "base") -> None:
    """`alembic downgrade <target>` against `dsn`."""
    command.downgrade(alembic_config(dsn), target)


def head_revision() -> str | None:
    """The newest revision this code ships."""
    return ScriptDirectory(str(script_location())).get_current_head()
