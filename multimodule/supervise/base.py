"""One interface for running external tasks, two backends (systemd units, detached processes).

An external task is a process running ``multimodule -m NAME``. Under systemd it is the
instance ``multimodule-task@NAME.service`` (:mod:`multimodule.supervise.systemd`); without
systemd it is a detached process in its own session (:mod:`multimodule.supervise.detached`).
Either way it outlives the daemon, and a daemon that starts while it runs adopts it instead of
starting another. :func:`choose_backend` picks the backend; it can be forced.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from multimodule.errors import UsageError


class ActiveState(enum.Enum):
    """systemd's ``ActiveState`` of a unit (systemd.unit(5)), used by both backends."""

    ACTIVE = "active"
    RELOADING = "reloading"
    INACTIVE = "inactive"
    FAILED = "failed"
    ACTIVATING = "activating"
    DEACTIVATING = "deactivating"


@dataclass(frozen=True)
class TaskProcess:
    """What a backend knows of one external task: ``state``, ``main_pid`` (``None`` when not
    running), ``restarts`` (restarts done by the backend), ``where`` (unit name or pid file)."""

    task: str
    state: ActiveState
    main_pid: int | None
    restarts: int
    where: str

    @property
    def running(self) -> bool:
        return self.state in (ActiveState.ACTIVE, ActiveState.ACTIVATING,
                              ActiveState.RELOADING)


@dataclass(frozen=True)
class LaunchSpec:
    """How to start ``multimodule -m NAME``: the daemon's own options, passed on.

    ``argv_prefix``: the command up to the options (e.g. ``[python, -m,
    multimodule.cli.daemon]``); ``config_file``, ``state_dir``, ``transit_dir``,
    ``task_path``, ``prefixes``: as the daemon has them (the other options reach the task
    through ``STATE_DIR/daemon-options.json``, as they do a systemd unit).
    """

    argv_prefix: tuple[str, ...]
    state_dir: Path
    config_file: Path | None = None
    transit_dir: Path | None = None
    task_path: tuple[Path, ...] = ()
    prefixes: tuple[str, ...] = ("",)

    def argv(self, task: str) -> list[str]:
        """The full command line for task ``task``."""
        argv = [*self.argv_prefix, "-m", task, "-s", str(self.state_dir)]
        if self.config_file is not None:
            argv += ["-c", str(self.config_file)]
        if self.transit_dir is not None:
            argv += ["-T", str(self.transit_dir)]
        for path in self.task_path:
            argv += ["--task-path", str(path)]
        argv += ["-p", ",".join(self.prefixes)]
        return argv


class TaskBackend(Protocol):
    """What the daemon needs to run external tasks. Every method raises a
    :class:`~multimodule.errors.BackendError` when the backend fails."""

    name: str

    def start(self, task: str, limits_dropin: str | None = None,
              limits=None) -> TaskProcess:
        """Start ``task`` unless it runs already (then adopt it); return its state.
        ``limits_dropin``: the systemd drop-in text, ``limits``: the same as
        :class:`~multimodule.config.TaskLimits` (both ignored by the detached
        backend; the task's process applies ``nice`` and ``environment`` itself)."""

    def stop(self, task: str, timeout: float = 30.0) -> None:
        """Stop ``task`` (SIGTERM: it saves its state) and wait up to ``timeout`` seconds."""

    def status(self, task: str) -> TaskProcess:
        """The current state of ``task``."""


def under_systemd(environ: dict[str, str] | None = None) -> bool:
    """Whether this process runs as a systemd service on a system booted with systemd
    (``$INVOCATION_ID`` set and ``/run/systemd/system`` present, as sd_booted(3) checks)."""
    env = os.environ if environ is None else environ
    return bool(env.get("INVOCATION_ID")) and Path("/run/systemd/system").is_dir()


def choose_backend_name(forced: str | None = None,
                        environ: dict[str, str] | None = None) -> str:
    """``"systemd"`` under systemd, else ``"detached"``; ``forced`` (``"systemd"``,
    ``"detached"`` or ``"auto"``) overrides. Raises :class:`UsageError` for an unknown name."""
    if forced in (None, "", "auto"):
        return "systemd" if under_systemd(environ) else "detached"
    if forced not in ("systemd", "detached"):
        raise UsageError(f"unknown task backend {forced!r} (auto, systemd, detached)")
    return forced
