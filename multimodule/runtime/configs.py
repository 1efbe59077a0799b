"""Task configs: the file's tables, control-message overrides, validation, and a reload as a
pure diff that returns the actions to take.

The config in force for a task is a control-message override (``mmctl config``, ``mmctl
migrate``) if there is one, else its table in the file. A change of the file drops the
overrides of the tasks whose tables changed (the file wins). :func:`plan_reload` compares what
was in force with what is now and, from where each task runs, says what to do; it touches
nothing, so it is tested on its own (the idea of diffing and touching only what changed is
circus's, for its watchers). :class:`ConfigWatcher` follows the file with inotify.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from pydantic import BaseModel

from multimodule.config import (check_config, load_config_file, parse_limits,
                                validate_task_config)
from multimodule.errors import ConfigError
from multimodule.task import ROUTER_QNAME, Task

Table = dict[str, Any]


class TaskConfigs:
    """The config file's tables (``file``) and control-message overrides (``overrides``).

    ``path``: the config file (``None``: none; every task has ``{}``).
    """

    def __init__(self, path: Path | None):
        self.path = path
        self.file: dict[str, Table] = {}
        self.overrides: dict[str, Table] = {}

    def read(self) -> dict[str, Table]:
        """The file's tables now (``{}`` without a file). Raises :class:`ConfigError`."""
        return load_config_file(self.path) if self.path is not None else {}

    def effective(self, name: str) -> Table:
        """The table in force for task ``name``: an override, else the file's, else ``{}``."""
        if name in self.overrides:
            return self.overrides[name]
        return self.file.get(name, {})

    def configured(self) -> dict[str, Table]:
        """Every task with a table in force (in the file or overridden) -> that table."""
        return {name: self.effective(name) for name in {*self.file, *self.overrides}}

    def wants_external(self, name: str) -> bool:
        """Whether the config in force says ``is_external = true``."""
        return self.effective(name).get("is_external") is True

    def source(self, name: str) -> str:
        """Where ``name``'s table comes from, for error texts."""
        if name in self.overrides:
            return "control message"
        return str(self.path or "config")

    @staticmethod
    def validate(name: str, cls: type[Task], table: Table, source: str
                 ) -> tuple[Table, BaseModel | None]:
        """``(config, settings)`` of ``table`` for task class ``cls`` (see
        :func:`validate_task_config`). Raises :class:`ConfigError` naming the field, also
        for ``is_external`` on a stateless task."""
        config, settings = validate_task_config(name, cls.Config, table, source)
        if config.get("is_external") is True and not cls.is_stateful:
            raise ConfigError(f"{source}: {name}.is_external: only a stateful task runs "
                              "external (a stateless one is served by the daemon's copy)")
        return config, settings

    def check_control(self, name: str, cls: type[Task], table: Table) -> None:
        """Refuse (:class:`ConfigError` naming the fields) a control message's ``table`` for
        task ``name`` that sets, otherwise than the config file does, what only the file may
        set: ``limits.environment`` (``PYTHONPATH``, ``LD_PRELOAD`` ... decide what code the
        task's process runs; leaving the file's variables out is allowed) and the task's
        ``file_only_config`` keys. Any member of the transit group may send control
        messages; only the daemon's user may write its config file."""
        on_file = self.file.get(name, {})
        asked = parse_limits(name, table.get("limits"), "control message").environment
        kept = parse_limits(name, on_file.get("limits"), str(self.path)).environment
        changed = [f"limits.environment.{key}" for key, value in sorted(asked.items())
                   if kept.get(key) != value]
        changed += [key for key in sorted(cls.file_only_config)
                    if table.get(key) != on_file.get(key)]
        if changed:
            fields = ", ".join(f"{name}.{field}" for field in changed)
            raise ConfigError(f"control message: {fields} not as in the config file: set "
                              "in the config file only")

    def check(self, tables: Mapping[str, Table], class_of: Callable[[str], type[Task] | None],
              source: str) -> None:
        """Check every table against its task's own model (tasks that cannot be found are
        checked when loaded). Raises :class:`ConfigError` for the first one refused."""
        for name, table in tables.items():
            cls = class_of(name)
            if cls is not None:
                self.validate(name, cls, table, source)

    def replace_file(self, new: dict[str, Table]) -> dict[str, Table]:
        """Put the file's new tables in force; return what was in force before (tasks with a
        table only). Overrides of tasks whose file table changed are dropped."""
        before = self.configured()
        for name in {*self.file, *new}:
            if self.file.get(name) != new.get(name):
                self.overrides.pop(name, None)
        self.file = new
        return before

    def override(self, name: str, table: Any) -> Table:
        """Check ``table`` (reserved keys only; the caller checks the task's model) and put
        it in force for ``name``; return the table in force before. Raises
        :class:`ConfigError`."""
        checked = check_config({name: table}, "control message")[name]
        before = self.effective(name)
        self.overrides[name] = checked
        return before


class Placement(enum.Enum):
    """Where a task is, for :func:`plan_reload`."""

    INTERNAL = "internal"   # a runner in this process
    EXTERNAL = "external"   # its own process (or being started there)
    ABSENT = "absent"       # not loaded (never was, failed, or unloaded)
    HELD = "held"           # in failsafe or moving: left alone, it reads the config later


class Act(enum.Enum):
    """What :func:`plan_reload` asks the host to do for one task."""

    LOAD = "load"                  # start it (internal or external, as its config says)
    UNLOAD = "unload"              # it left the config: stop it (here or its own process)
    APPLY = "apply"                # give the running task its new config
    MIGRATE_OUT = "migrate_out"    # move it to its own process
    MIGRATE_IN = "migrate_in"      # move it into this process
    THRESHOLDS = "thresholds"      # external: only the monitor's thresholds change here


@dataclass(frozen=True)
class Action:
    """One step of a reload: ``act`` for task ``name``."""

    act: Act
    name: str


def plan_reload(before: Mapping[str, Table], after: Mapping[str, Table],
                placement: Callable[[str], Placement]) -> list[Action]:
    """The actions that take tasks from the configs in force ``before`` to ``after``
    (task name -> table, for tasks that have one), given where each task is now. In task
    name order; tasks whose table did not change get no action (except to start one that is
    configured and not running)."""
    actions = []
    for name in sorted({*before, *after}):
        where = placement(name)
        old, new = before.get(name), after.get(name)
        external = bool((new or {}).get("is_external"))
        if where is Placement.HELD:
            continue
        if where is Placement.EXTERNAL:
            if new is None:
                actions.append(Action(Act.UNLOAD, name))
            elif not external:
                actions.append(Action(Act.MIGRATE_IN, name))
            elif new != old:
                actions.append(Action(Act.THRESHOLDS, name))
        elif where is Placement.INTERNAL:
            if new is None and name != ROUTER_QNAME:
                actions.append(Action(Act.UNLOAD, name))
            elif external:
                actions.append(Action(Act.MIGRATE_OUT, name))
            elif (new or {}) != (old or {}):
                actions.append(Action(Act.APPLY, name))
        elif new is not None:
            actions.append(Action(Act.LOAD, name))
    return actions


def describe_changes(before: Mapping[str, Table], after: Mapping[str, Table]) -> str:
    """``"Example1 changed, Extra added, Old removed"`` (or ``"no task changed"``)."""
    parts = []
    for name in sorted({*before, *after}):
        if name not in before:
            parts.append(f"{name} added")
        elif name not in after:
            parts.append(f"{name} removed")
        elif before[name] != after[name]:
            parts.append(f"{name} changed")
    return ", ".join(parts) or "no task changed"


class ConfigWatcher:
    """Calls ``on_change()`` on the loop when the config file ``path`` is written, renamed
    into place or created (inotify on its directory; bursts within 50 ms are coalesced)."""

    COALESCE_S = 0.05

    def __init__(self, path: Path, on_change: Callable[[], Any]):
        self.path = path
        self.on_change = on_change
        self._watcher: Any = None
        self._pending: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> bool:
        """Start watching (on the loop); ``False`` if inotify is not available."""
        try:
            from inotify_simple import INotify, flags
        except ImportError:  # pragma: no cover - a dependency; SIGHUP still works
            return False
        self._loop = asyncio.get_running_loop()
        self._watcher = INotify(nonblocking=True)
        self._watcher.add_watch(str(self.path.parent),
                                flags.CLOSE_WRITE | flags.MOVED_TO | flags.CREATE)
        self._loop.add_reader(self._watcher.fileno(), self._on_events)
        return True

    def _on_events(self) -> None:
        try:
            events = self._watcher.read(timeout=0)
        except BlockingIOError:
            return
        if any(event.name == self.path.name for event in events):
            if self._pending is not None:
                self._pending.cancel()
            self._pending = self._loop.call_later(self.COALESCE_S, self.on_change)

    def close(self) -> None:
        """Stop watching."""
        if self._pending is not None:
            self._pending.cancel()
        if self._watcher is not None:
            self._loop.remove_reader(self._watcher.fileno())
            self._watcher.close()
            self._watcher = None
