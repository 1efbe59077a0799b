"""Shared fixtures: a private transit directory per test, with its System V queues removed after."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from multimodule.transit import Transit

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def transit_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh transit directory; also exported as $MULTIMODULE_TRANSIT_DIR for children."""
    path = tmp_path / "transit"
    monkeypatch.setenv("MULTIMODULE_TRANSIT_DIR", str(path))
    yield path
    # Kernel objects outlive the test: remove every queue the test registered.
    if path.exists():
        Transit(path).remove_all()


@pytest.fixture
def transit(transit_dir: Path) -> Transit:
    """A :class:`Transit` over :func:`transit_dir`."""
    return Transit(transit_dir)


@pytest.fixture
def child_env(transit_dir: Path) -> dict[str, str]:
    """Environment for child processes: same transit dir, this checkout importable."""
    env = dict(os.environ)
    env["MULTIMODULE_TRANSIT_DIR"] = str(transit_dir)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    return env


PYTHON = sys.executable
