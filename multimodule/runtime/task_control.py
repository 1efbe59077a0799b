"""One task stopped, started, or restarted with new code, the others untouched: ``mmctl stop
TASK``, ``mmctl start TASK`` and ``mmctl restart TASK`` (supervisorctl's and systemctl's verbs).

**restart**, internal task: its module is imported afresh from its file (see
:func:`~multimodule.runtime.loader.import_afresh`) and the config in force is checked against
the new class first; then the task is stopped (the message in hand finishes, what is in memory
is delivered, its checkpoint saved) and started with the new class from that checkpoint, in
the same turn of the event loop, so no message finds it gone. A module that no longer imports,
a config the new class refuses, or a new instance whose ``set_config`` raises leaves the old
version running and says why. External task: its process (its unit) is stopped and started
again; being a new process, it imports everything afresh.

**stop**: the task is stopped as ``failsafe`` would stop it, without the mark: messages sent to
it meanwhile wait in its System V queue (a send in the daemon does not load it again), until
``start``. A daemon restart starts it again, as a reboot starts an enabled unit.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

from multimodule.config import parse_limits
from multimodule.errors import ConfigError, MultiModuleError, TaskImportFailed, TaskNotFound
from multimodule.oob import Channels
from multimodule.runtime.configs import TaskConfigs
from multimodule.runtime.externals import ExternalTasks
from multimodule.runtime.loader import import_afresh
from multimodule.runtime.registry import TaskRegistry
from multimodule.task import ROUTER_QNAME

SOURCE = "MultiModule"


class TaskControl:
    """The ``stop``/``start``/``restart`` commands for one task. ``load(name)`` starts a task
    as its config says (here or in its own process); ``stop_task(name)`` stops a running
    one; ``forget(name)`` drops what the monitor holds of a task gone for good; ``held(name)``:
    whether something else holds it now (failsafe, a migration). :attr:`stopped`: tasks
    stopped by hand (not loaded on demand, nor by a config change); :attr:`busy`: tasks being
    stopped, started or restarted here."""

    def __init__(self, *, registry: TaskRegistry, externals: ExternalTasks,
                 configs: TaskConfigs, channels: Channels, load: Callable[[str], bool],
                 stop_task: Callable[[str], Awaitable[None]], forget: Callable[[str], None],
                 held: Callable[[str], bool]):
        self.registry = registry
        self.externals = externals
        self.configs = configs
        self.channels = channels
        self.load = load
        self.stop_task = stop_task
        self.forget = forget
        self.held = held
        self.stopped: set[str] = set()
        self.busy: set[str] = set()

    def _refused(self, name: str, verb: str) -> str | None:
        if name in self.busy or self.held(name):
            return f"task {name} is being moved, stopped or started, or is in failsafe: " \
                   f"cannot {verb} it now"
        return None

    def _runs(self, name: str) -> bool:
        return name in self.registry or name in self.externals

    def stop(self, name: str) -> str | asyncio.Task:
        """Stop task ``name`` and keep it stopped. Returns why not, or the asyncio task
        stopping it (its result: a problem, or ``None``)."""
        if name == ROUTER_QNAME:
            return "the Router is not stopped: nothing could be routed without it"
        problem = self._refused(name, "stop")
        if problem:
            return problem
        if not self._runs(name):
            return f"no task {name!r} is loaded"
        self.stopped.add(name)
        return self._run(name, self._stop(name))

    async def _stop(self, name: str) -> None:
        await self.stop_task(name)
        self.channels.emit("log", SOURCE, f"task {name} stopped by hand (state saved; "
                                          f"messages sent to it wait in its queue until "
                                          f"`mmctl start {name}`)", task=name)

    def unload(self, name: str) -> asyncio.Task:
        """Stop task ``name``, which left the config (here or in its own process)."""
        return self._run(name, self._unload(name))

    async def _unload(self, name: str) -> None:
        try:
            if name in self.externals:
                await self.externals.stop(name)
                self.forget(name)
            else:
                await self.registry.unload(name)
        except (MultiModuleError, OSError) as exc:
            self.channels.emit("error", SOURCE, f"task {name} left the config but cannot be "
                                                f"stopped: {exc}", task=name)
            return
        self.channels.emit("log", SOURCE, f"task {name} left the config: stopped (state "
                                          "saved; messages sent to it wait in its queue)",
                           task=name)

    def start(self, name: str) -> str | None:
        """Start task ``name`` (stopped by hand, or not loaded) as its config says. Returns
        why not (``"no task ..."`` for a name no task class answers to)."""
        problem = self._refused(name, "start")
        if problem:
            return problem
        self.stopped.discard(name)
        if self._runs(name):
            return None
        try:
            self.registry.lookup(name)
        except (TaskNotFound, TaskImportFailed) as exc:
            return str(exc)
        self.registry.failures.pop(name, None)
        self.registry.not_tasks.discard(name)
        if not self.load(name):
            return self.registry.failures.get(name, f"task {name} did not start")
        self.channels.emit("log", SOURCE, f"task {name} started by hand", task=name)
        return None

    def restart(self, name: str) -> str | asyncio.Task:
        """Restart task ``name`` with its code imported afresh (see the module docstring).
        Returns why not, or the asyncio task restarting it (its result: why the new version
        does not run, or ``None``)."""
        problem = self._refused(name, "restart")
        if problem:
            return problem
        if name in self.externals:
            return self._run(name, self._restart_external(name))
        runner = self.registry.get(name)
        if runner is None:
            return f"no task {name!r} is loaded"
        try:
            cls = import_afresh(runner.cls)
            config, settings = self.configs.validate(name, cls, self.configs.effective(name),
                                                     self.configs.source(name))
        except (TaskImportFailed, TaskNotFound, ConfigError) as exc:
            why = f"task {name} not restarted, the running version stays: {exc}"
            self.channels.emit("error", SOURCE, why, task=name,
                               traceback=getattr(exc, "details", None))
            return why
        return self._run(name, self._restart_internal(name, cls, config, settings))

    async def _restart_internal(self, name: str, cls: type, config: dict[str, Any],
                                settings: Any) -> str | None:
        old = self.registry.runners[name]
        before = (old.cls, old.task.config, old.task.settings)
        await self.registry.unload(name)
        if self.registry.start(name, cls, config, settings, strict=True) is not None:
            self.channels.emit("log", SOURCE, f"task {name} restarted with its module "
                                              f"imported afresh ({cls.__module__})", task=name)
            return None
        why = self.registry.failures.pop(name, "it did not start")
        self.registry.start(name, *before)  # from the checkpoint the stop saved
        text = f"task {name}: the new version did not start, the old one runs again: {why}"
        self.channels.emit("error", SOURCE, text, task=name)
        return text

    async def _restart_external(self, name: str) -> str | None:
        limits = parse_limits(name, self.configs.effective(name).get("limits"),
                              self.configs.source(name))
        await self.externals.stop(name)
        problem = await self.externals.start(name, limits)
        if problem is None:
            self.channels.emit("log", SOURCE, f"task {name} restarted (its process)",
                               task=name)
        return problem

    def _run(self, name: str, work: Awaitable[str | None]) -> asyncio.Task:
        async def guarded() -> str | None:
            try:
                return await work
            finally:
                self.busy.discard(name)

        self.busy.add(name)
        return asyncio.get_running_loop().create_task(guarded(), name=f"task-control:{name}")
