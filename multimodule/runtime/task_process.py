"""The process of one external task (``multimodule -m NAME``): a unit instance
``multimodule-task@NAME.service`` or a detached process.

It hosts that one task as the daemon hosts its internal ones (its state, its queue, its
schedules), follows its own section of the config file, applies the ``nice`` and
``environment`` of its ``limits`` itself, and every ``monitor_interval_s`` writes its counters
to ``STATE_DIR/task-NAME.figures.json`` for the daemon's monitor. A name that no task answers
to, or a task that cannot start, makes it exit 1 (so that its unit fails visibly).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import orjson

from multimodule.config import DaemonOptions
from multimodule.errors import ConfigError, MultiModuleError
from multimodule.oob import Channels
from multimodule.runtime.host import SOURCE, HostProcess
from multimodule.runtime.runner import TaskRunner
from multimodule.state import figures_path, write_atomic
from multimodule.config import parse_limits
from multimodule.transit import Transit


class FiguresReporter:
    """Writes ``runner``'s counters to ``path`` every ``interval_s`` seconds (``{"pid",
    "started_at", "time", "counters"}``, atomically) for the daemon to read."""

    def __init__(self, runner: TaskRunner, path: Any, interval_s: float, channels: Channels):
        self.runner = runner
        self.path = path
        self.interval_s = interval_s
        self.channels = channels
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start writing (on the loop)."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="figures")

    async def _run(self) -> None:
        while True:
            self.write()
            await asyncio.sleep(self.interval_s)

    def write(self) -> None:
        """Write the counters now."""
        report = {"pid": os.getpid(), "started_at": self.runner.started_at,
                  "time": time.time(), "counters": self.runner.figures()}
        try:
            write_atomic(self.path, orjson.dumps(report, default=str))
        except OSError as exc:
            self.channels.emit("error", SOURCE, f"cannot write {self.path}: {exc}")

    def stop(self) -> None:
        """Stop writing and remove the file (the daemon then knows no counters)."""
        if self._task is not None:
            self._task.cancel()
        self.path.unlink(missing_ok=True)


class TaskProcessHost(HostProcess):
    """Hosts external task ``options.module``; see the module docstring."""

    locks_tasks = False  # its task's lock is its state lock (see lock_names)

    def __init__(self, options: DaemonOptions, *, transit: Transit | None = None,
                 channels: Channels | None = None):
        super().__init__(options, transit=transit, channels=channels)
        self.name = options.module
        self.reporter: FiguresReporter | None = None

    def lock_names(self) -> tuple[str, str]:
        return f"task-{self.name}", f".task-{self.name}"

    def relevant(self, tables: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {k: v for k, v in tables.items() if k == self.name}

    def check_startup_config(self) -> None:
        self.configs.check(self.relevant(self.configs.file), self.registry.class_of,
                           str(self.configs.path))

    async def start_tasks(self) -> None:
        name = self.name
        cls = self.registry.find(name)
        if cls is None:
            raise MultiModuleError(f"task {name} cannot run here; exiting")
        if not cls.is_stateful:
            # Its queue is served by the daemon's copy: a second reader would take half of it.
            raise MultiModuleError(f"task {name} is stateless: only the daemon runs it (only "
                                   "a stateful task runs in its own process); exiting")
        table = self.configs.effective(name)
        source = self.configs.source(name)
        limits = parse_limits(name, table.get("limits"), source)
        os.environ.update(limits.environment)
        if limits.nice is not None:
            try:
                os.setpriority(os.PRIO_PROCESS, 0, limits.nice)
            except OSError as exc:
                self.channels.emit("error", SOURCE, f"cannot set nice {limits.nice} for task "
                                                    f"{name}: {exc}", task=name)
        config, settings = self.configs.validate(name, cls, table, source)
        runner = self.registry.start(name, cls, config, settings)
        if runner is None:
            raise MultiModuleError(f"task {name} cannot run here; exiting")
        self.reporter = FiguresReporter(runner, figures_path(self.store.path, name),
                                        self.options.monitor_interval_s, self.channels)

    def after_ready(self) -> None:
        self.reporter.start()

    def apply_file(self, before: dict[str, dict[str, Any]]) -> None:
        runner = self.registry.get(self.name)
        table = self.configs.effective(self.name)
        if runner is None or table == before.get(self.name, {}):
            return
        try:
            config, settings = self.configs.validate(self.name, runner.cls, table,
                                                     self.configs.source(self.name))
        except ConfigError as exc:
            self.channels.emit("error", SOURCE, f"config for {self.name} refused: {exc}")
            return
        runner.apply_config(config, settings)  # where it runs is the daemon's business
        self.channels.emit("log", SOURCE, f"config reloaded: {self.name} changed",
                           task=self.name)

    async def after_tasks(self, deadline: float) -> None:
        if self.reporter is not None:
            self.reporter.stop()

    def status_line(self) -> str:
        return f"task {self.name}: {self.message_rate():.0f} messages/s"
