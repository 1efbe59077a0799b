"""External tasks as systemd units: the backend used under systemd.

Task ``NAME`` is the instance ``multimodule-task@NAME.service`` of the template in ``units/``;
systemd starts, restarts (``Restart=on-failure``) and stops it, and it survives a restart of
the daemon by design (the template is not ``PartOf=`` the daemon). A task's ``limits`` become a
runtime drop-in followed by ``systemctl daemon-reload`` before the start; nothing else is ever
written. State is read with ``systemctl show`` properties (``ActiveState``, ``MainPID``,
``NRestarts``).
"""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path

from multimodule.config import TaskLimits
from multimodule.errors import UnitError
from multimodule.state import write_atomic
from multimodule.supervise.base import ActiveState, TaskProcess
from multimodule.supervise.units import (
    DROPIN_ROOT,
    dropin_path,
    resource_properties,
    unit_name,
)

SYSTEMCTL = "systemctl"


class SystemdBackend:
    """Runs external tasks as instances of ``multimodule-task@.service``.

    ``dropin_root``: where runtime drop-ins go (``/run/systemd/system``). Every failed
    ``systemctl`` raises :class:`UnitError` with its exit status and stderr.
    """

    name = "systemd"

    def __init__(self, dropin_root: Path = DROPIN_ROOT, systemctl: str = SYSTEMCTL):
        self.dropin_root = dropin_root
        self.systemctl = systemctl

    def _run(self, *args: str, timeout: float = 60.0) -> str:
        try:
            result = subprocess.run([self.systemctl, *args], capture_output=True, text=True,
                                    timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise UnitError(f"systemctl {' '.join(args)} failed: {exc}") from exc
        if result.returncode != 0:
            raise UnitError(f"systemctl {' '.join(args)} exited {result.returncode}",
                            result.returncode, result.stderr)
        return result.stdout

    def write_dropin(self, task: str, text: str | None) -> bool:
        """Put (or, with ``None``, remove) the limits drop-in of ``task``; return whether it
        changed (then a ``daemon-reload`` is needed)."""
        path = dropin_path(task, self.dropin_root)
        try:
            old = path.read_text()
        except FileNotFoundError:
            old = None
        except OSError as exc:
            raise UnitError(f"cannot read {path}: {exc}") from exc
        if old == text:
            return False
        try:
            if text is None:
                path.unlink()
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(path, text.encode(), mode=0o644)  # never through a symlink
        except OSError as exc:
            raise UnitError(f"cannot write {path}: {exc}") from exc
        return True

    def status(self, task: str) -> TaskProcess:
        """The unit's ``ActiveState``, ``MainPID`` and ``NRestarts``."""
        unit = unit_name(task)
        out = self._run("show", unit, "-p", "ActiveState", "-p", "MainPID", "-p", "NRestarts")
        props = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        try:
            state = ActiveState(props.get("ActiveState", "inactive"))
        except ValueError:
            state = ActiveState.INACTIVE
        pid = int(props.get("MainPID") or 0) or None
        restarts = int(props.get("NRestarts") or 0)
        return TaskProcess(task, state, pid, restarts, unit)

    def start(self, task: str, limits_dropin: str | None = None,
              limits: TaskLimits | None = None) -> TaskProcess:
        """Write the drop-in if it changed (then ``daemon-reload``) and start the unit;
        a running unit is left as it is (adopted).

        A daemon running as the unprivileged user ``multimodule`` may not write unit files:
        then the resource settings of ``limits`` go through systemd itself
        (``systemctl set-property --runtime``, which the packaged polkit rule allows for
        ``multimodule-task@*`` units only), and ``nice`` and ``environment`` are applied by
        the task's own process.
        """
        try:
            changed = self.write_dropin(task, limits_dropin)
        except UnitError as exc:
            cause = exc.__cause__
            if limits is None or not (isinstance(cause, OSError)
                                      and cause.errno in (errno.EACCES, errno.EPERM,
                                                          errno.EROFS)):
                raise
            changed = False
            properties = resource_properties(limits)
            if properties:
                self._run("set-property", "--runtime", unit_name(task), *properties)
        if changed:
            self._run("daemon-reload")
        self._run("start", unit_name(task))
        return self.status(task)

    def stop(self, task: str, timeout: float = 30.0) -> None:
        """``systemctl stop`` (SIGTERM: the task saves its state); waits for it."""
        self._run("stop", unit_name(task), timeout=timeout + 30.0)
