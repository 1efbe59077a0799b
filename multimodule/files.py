"""Filesystem helpers every layer may use (it imports nothing of the package)."""

from __future__ import annotations

import os
from pathlib import Path


def make_private_dirs(path: Path) -> None:
    """Create ``path`` and its missing parents, each 0700 (``mkdir -p`` would make the parents
    with the umask's mode, 0777 under umask 000). A directory made meanwhile by someone else
    is left as it is: the caller checks what it uses. Raises ``OSError``."""
    missing = []
    while not os.path.lexists(path) and path != path.parent:
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass
