"""Running the alembic migrations from code (the embedded default and the tests)."""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config
from alembic.script import ScriptDirectory

from alembic import command
from planbus.errors import ConfigurationError

# The session advisory lock alembic/env.py holds while it migrates a database ("planbus" in
# ASCII), so two `alembic upgrade head` at once run one after the other.
MIGRATION_LOCK = 0x706C616E627573


def script_location() -> Path:
    """The migrations: inside the package in a wheel, at the repository root in a checkout."""
    package = Path(__file__).resolve().parent
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


def upgrade(dsn: str) -> None:
    """`alembic upgrade head` against `dsn`."""
    command.upgrade(alembic_config(dsn), "head")


def downgrade(dsn: str, target: str = "base") -> None:
    """`alembic downgrade <target>` against `dsn`."""
    command.downgrade(alembic_config(dsn), target)


def head_revision() -> str | None:
    """The newest revision this code ships."""
    return ScriptDirectory(str(script_location())).get_current_head()
