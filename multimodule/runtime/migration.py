"""Moving a stateful task between the daemon and its own process while it runs, keeping its
state and every message, in order (``mmctl migrate``, or ``is_external`` changed).

To its own process: its ``limits`` are checked first (a bad value refuses the move and the task
stays); then the runner stops (the message in hand finishes, what is in memory is delivered,
state saved), and in one step of the loop the name is handed to System V (what reached the
runner's memory meanwhile goes to the task's queue, and later sends queue up behind it) and the
task's process is started; it restores the state and reads the queue. If the start fails, the
task is loaded in the daemon again (it reads the same queue, so nothing is lost or reordered),
the config in force is set back to ``is_external = false``, and the failure is the answer.

Into the daemon: the task's process is stopped (it delivers what it holds and saves), then the
task is loaded here.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from multimodule.errors import ConfigError, MultiModuleError
from multimodule.oob import Channels
from multimodule.runtime.configs import TaskConfigs
from multimodule.runtime.externals import ExternalTasks
from multimodule.runtime.registry import TaskRegistry
from multimodule.config import parse_limits

SOURCE = "MultiModule"


class Migrations:
    """Migrations in progress (``in_progress``: task name -> the asyncio task moving it).

    ``load(name)``: loads ``name`` in the daemon, returning whether it runs. ``forget(name)``:
    the monitor drops the figures of the other side. ``reconcile(name)``: called when a move
    ends, to follow a config that changed meanwhile.
    """

    def __init__(self, *, registry: TaskRegistry, externals: ExternalTasks,
                 configs: TaskConfigs, channels: Channels, load: Callable[[str], bool],
                 forget: Callable[[str], None], reconcile: Callable[[str], Any]):
        self.registry = registry
        self.externals = externals
        self.configs = configs
        self.channels = channels
        self.load = load
        self.forget = forget
        self.reconcile = reconcile
        self.in_progress: dict[str, asyncio.Task] = {}

    def __contains__(self, name: object) -> bool:
        return name in self.in_progress

    def begin(self, name: str, *, to_external: bool) -> asyncio.Task:
        """Start moving ``name``; the asyncio task returned gives why it failed, or ``None``."""
        task = asyncio.get_running_loop().create_task(self._migrate(name, to_external),
                                                      name=f"migrate:{name}")
        self.in_progress[name] = task
        return task

    async def _migrate(self, name: str, to_external: bool) -> str | None:
        where = "its own process" if to_external else "the daemon"
        self.channels.emit("log", SOURCE, f"migrating task {name} to {where}", task=name)
        try:
            if to_external:
                problem = await self._to_external(name)
            else:
                problem = await self._to_internal(name)
        except (MultiModuleError, OSError) as exc:
            problem = f"migration of task {name} to {where} failed: {exc}"
        finally:
            self.in_progress.pop(name, None)
        if problem is None:
            self.channels.emit("log", SOURCE, f"task {name} now runs in {where}", task=name)
        else:
            self.channels.emit("error", SOURCE, problem, task=name)
        self.reconcile(name)  # the config may have changed again while we were busy
        return problem

    def _stay_internal(self, name: str) -> None:
        self.configs.overrides[name] = {**self.configs.effective(name), "is_external": False}

    async def _to_external(self, name: str) -> str | None:
        try:
            limits = parse_limits(name, self.configs.effective(name).get("limits"),
                                  self.configs.source(name))
        except ConfigError as exc:
            self._stay_internal(name)
            return f"task {name} stays in the daemon: {exc}"
        runner = self.registry.runners[name]
        await runner.stop()
        # One step of the loop: from here on sends to it go out over System V, and its lock
        # is free for its own process.
        self.registry.release(name)
        starting = self.externals.start(name, limits)
        problem = await starting
        if problem is None:
            self.forget(name)
            return None
        # Roll back: it runs in the daemon again, from its saved state and its queue.
        self._stay_internal(name)
        if self.load(name):
            return (f"migration of task {name} to its own process failed: {problem}; it "
                    "runs in the daemon again")
        return (f"migration of task {name} to its own process failed: {problem}; and it "
                f"could not be loaded in the daemon again: "
                f"{self.registry.failures.get(name, 'see the error above')}")

    async def _to_internal(self, name: str) -> str | None:
        await self.externals.stop(name)
        self.forget(name)
        if not self.load(name):
            return (f"task {name} could not be loaded in the daemon: "
                    f"{self.registry.failures.get(name, 'see the error above')}")
        return None
