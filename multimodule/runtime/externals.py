"""External tasks as the daemon sees them: started, adopted, stopped and asked for their state
through a backend (:mod:`multimodule.supervise`), every backend call off the event loop.

``systemctl start`` waits for the unit's ``READY=1`` and ``systemctl show`` may take seconds on a
busy machine (its timeout is a minute, the daemon's watchdog 30 s): each call runs in a worker
thread, so the loop, the other tasks and ``mmctl`` never wait for systemd.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

from multimodule.errors import BackendError, MultiModuleError
from multimodule.oob import Channels
from multimodule.state import lock_holder
from multimodule.supervise.base import LaunchSpec, TaskBackend, TaskProcess, choose_backend_name
from multimodule.supervise.detached import DetachedBackend
from multimodule.supervise.systemd import SystemdBackend
from multimodule.config import TaskLimits
from multimodule.supervise.units import render_dropin

SOURCE = "MultiModule"


def make_backend(forced: str, *, state_dir: Path, transit_dir: Path,
                 config_file: Path | None, task_path: list[Path], prefixes: list[str],
                 channels: Channels, loop: asyncio.AbstractEventLoop) -> TaskBackend:
    """The backend for external tasks: systemd units when the daemon is a systemd service
    (or ``forced == "systemd"``), else detached processes launched with the daemon's own
    paths. Raises :class:`UsageError` for an unknown ``forced`` name."""
    if choose_backend_name(forced) == "systemd":
        return SystemdBackend()

    def on_event(task: str, text: str) -> None:
        channels.emit("log", SOURCE, f"external task {task}: {text}", task=task)

    spec = LaunchSpec(
        argv_prefix=(sys.executable, "-m", "multimodule.cli.daemon"),
        state_dir=state_dir.resolve(),
        config_file=config_file.resolve() if config_file else None,
        transit_dir=transit_dir.resolve(),
        task_path=tuple(p.resolve() for p in task_path),
        prefixes=tuple(prefixes))
    return DetachedBackend(spec, loop=loop, on_event=on_event)


class ExternalTasks:
    """The external tasks of one daemon: ``processes`` (task name -> what the backend last
    said, ``None`` while it is being started), backend calls in worker threads.

    ``state_dir``: where external tasks hold their locks (``task-NAME.lock``).
    ``on_failed(name, why)``: a start that failed (reported and recorded by the caller).
    """

    def __init__(self, backend: TaskBackend, *, state_dir: Path, channels: Channels,
                 on_failed: Callable[[str, str], None]):
        self.backend = backend
        self.state_dir = state_dir
        self.channels = channels
        self.on_failed = on_failed
        self.processes: dict[str, TaskProcess | None] = {}
        self.starting: dict[str, asyncio.Task] = {}
        #: Tasks found running in their own process when the daemon started (see
        #: :meth:`scan`), not yet adopted.
        self.outside: set[str] = set()

    def __contains__(self, name: object) -> bool:
        return name in self.processes

    @property
    def name(self) -> str:
        """The backend's name (``systemd`` or ``detached``)."""
        return self.backend.name

    async def scan(self, names: list[str]) -> None:
        """Ask the backend (in a worker thread, once, at the daemon's start) which tasks run
        in their own process already: of ``names`` and of the tasks whose processes left a
        lock in the state directory (every task that ever ran external did)."""
        locks = {path.name[len("task-"):-len(".lock")]
                 for path in self.state_dir.glob("task-*.lock")}
        said = await self.statuses_of(sorted({*names, *locks}))
        self.outside = {name for name, process in said.items()
                        if not isinstance(process, str) and process.running}

    def runs_outside(self, name: str) -> bool:
        """Whether task ``name`` runs in its own process and is not adopted yet: found so when
        the daemon started (moved out before, see :meth:`scan`), or holding its lock now (a
        process a killed daemon had just started, which took its lock after the scan)."""
        if name in self.processes:
            return False
        if name in self.outside:
            return True
        try:
            holder = lock_holder(self.state_dir / f"task-{name}.lock")
        except OSError:
            return False
        return holder is not None and holder != os.getpid()

    async def _call(self, function: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, function, *args)

    def start(self, name: str, limits: TaskLimits) -> asyncio.Task:
        """Start (or adopt) task ``name`` in a worker thread; until it is up,
        ``processes[name]`` is ``None`` and sends to it go to its System V queue. The asyncio
        task returned gives why it failed, or ``None``."""
        self.processes[name] = None
        task = asyncio.get_running_loop().create_task(self._start(name, limits),
                                                      name=f"start:{name}")
        self.starting[name] = task
        return task

    async def _start(self, name: str, limits: TaskLimits) -> str | None:
        try:
            process = await self._call(self.backend.start, name, render_dropin(name, limits),
                                       limits)
        except (MultiModuleError, OSError) as exc:
            if name in self.processes and self.processes[name] is None:
                del self.processes[name]
            problem = f"task {name} not started: {exc}"
            self.on_failed(name, problem)
            return problem
        finally:
            self.starting.pop(name, None)
        if name in self.processes:
            self.processes[name] = process
            self.channels.emit("log", SOURCE, f"external task {name} runs as {process.where} "
                                              f"(pid {process.main_pid}, {self.backend.name})",
                               task=name)
        return None

    async def stop(self, name: str) -> None:
        """Stop task ``name``'s unit or process (it saves its state), then forget it.
        Raises the backend's error (it is then still known)."""
        await self._call(self.backend.stop, name)
        self.processes.pop(name, None)
        self.outside.discard(name)

    def _statuses(self, names: list[str]) -> dict[str, TaskProcess | str]:
        out: dict[str, TaskProcess | str] = {}
        for name in names:
            try:
                out[name] = self.backend.status(name)
            except BackendError as exc:
                out[name] = str(exc)
        return out

    async def statuses(self, names: list[str] | None = None) -> dict[str, TaskProcess | str]:
        """What the backend says of each external task up and running (of ``names``, or
        all), now: task name -> :class:`TaskProcess`, or the error text if it could not
        say (a worker thread)."""
        names = [n for n in (names if names is not None else self.processes)
                 if self.processes.get(n) is not None]
        return await self.statuses_of(names)

    async def statuses_of(self, names: list[str]) -> dict[str, TaskProcess | str]:
        """Like :meth:`statuses`, for any task names (a worker thread)."""
        return await self._call(self._statuses, names) if names else {}

    async def status_table(self) -> dict[str, dict[str, Any]]:
        """For ``mmctl status``: task -> ``{"backend", "state", "pid", "restarts", "where"}``
        as the backend says now (``{"backend", "error"}`` if it could not say)."""
        return self.table(await self.statuses())

    def table(self, said: Mapping[str, TaskProcess | str | None] | None = None
              ) -> dict[str, dict[str, Any]]:
        """:meth:`status_table` from what the backend said (``said``; by default what it
        last said, :attr:`processes`), without asking it."""
        said = self.processes if said is None else said
        table: dict[str, dict[str, Any]] = {}
        for name in sorted(self.processes):
            process = said.get(name)
            if process is None:  # still being started
                table[name] = {"backend": self.name, "state": "activating", "pid": None,
                               "restarts": 0, "where": ""}
            elif isinstance(process, str):
                table[name] = {"backend": self.name, "error": process}
            else:
                table[name] = {"backend": self.name, "state": process.state.value,
                               "pid": process.main_pid, "restarts": process.restarts,
                               "where": process.where}
        return table

    async def settle(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the starts in progress."""
        if self.starting:
            await asyncio.wait(list(self.starting.values()), timeout=timeout)

    async def stop_all(self, timeout: float) -> None:
        """Stop every external task at once (``mmctl stop --externals``), waiting up to
        ``timeout`` seconds (stops still running then go on in the backend: systemd finishes
        a unit's stop job by itself)."""
        async def stop_one(name: str) -> None:
            try:
                await self.stop(name)
                self.channels.emit("log", SOURCE, f"external task {name} stopped")
            except BackendError as exc:
                self.channels.emit("error", SOURCE, f"cannot stop external task {name}: {exc}")

        if self.processes:
            stops = [asyncio.ensure_future(stop_one(name)) for name in list(self.processes)]
            _, pending = await asyncio.wait(stops, timeout=timeout)
            if pending:
                self.channels.emit("error", SOURCE, f"{len(pending)} external tasks still "
                                                    "stopping when the daemon exits")

    def close(self) -> None:
        """Release the backend's own resources (the detached backend's exit watchers)."""
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()

