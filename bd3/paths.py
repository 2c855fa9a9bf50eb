"""Checks on the folders bd3 writes into, made before anything is written."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from bd3.errors import Bd3Error, cannot_write


def holds_working_dir(path: Path) -> bool:
    """Whether ``path`` is the current folder or one of its ancestors."""
    here, target = Path.cwd().resolve(), Path(path).resolve()
    return target == here or target in here.parents


def existing_ancestor(path: Path) -> Path:
    """``path`` itself if it exists, else its nearest existing ancestor."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_room(path: Path, need_bytes: int, advice: str) -> None:
    """Refuse to start work that will write ``need_bytes`` into ``path`` (a folder, made
    later if it does not exist yet) when it cannot be written or lacks the space. The
    folder, or the ancestor it would be made in, is probed with a temporary file, removed
    at once."""
    where = existing_ancestor(path)
    if where.is_dir():
        try:
            with tempfile.TemporaryFile(dir=where):
                pass
        except OSError as e:
            raise cannot_write(path, e, advice) from None
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return  # a path the system cannot measure is left to the writes themselves
    if free < need_bytes:
        raise Bd3Error(
            f"{where} has {free / 2**20:.0f} MiB free, and one checkpoint needs about {need_bytes / 2**20:.0f} MiB; "
            f"free some space there or {advice}."
        )
