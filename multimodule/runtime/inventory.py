"""A read-only view of the daemon's tasks, for the monitor (see
:class:`~multimodule.runtime.monitoring.TaskInventory`)."""

from __future__ import annotations

from typing import Any, Collection, Mapping

from multimodule.runtime.configs import TaskConfigs
from multimodule.runtime.externals import ExternalTasks
from multimodule.runtime.failsafe import Failsafe
from multimodule.runtime.migration import Migrations
from multimodule.runtime.registry import TaskRegistry
from multimodule.runtime.runner import TaskRunner
from multimodule.supervise.base import TaskProcess


class Inventory:
    """Where each task of a daemon is, read from the parts that keep it."""

    def __init__(self, registry: TaskRegistry, externals: ExternalTasks,
                 migrations: Migrations, failsafe: Failsafe, configs: TaskConfigs):
        self._registry = registry
        self._externals = externals
        self._migrations = migrations
        self._failsafe = failsafe
        self._configs = configs

    def internal(self) -> Mapping[str, TaskRunner]:
        return self._registry.runners

    def failures(self) -> Mapping[str, str]:
        return self._registry.failures

    def external(self) -> Mapping[str, TaskProcess | None]:
        return self._externals.processes

    def moving(self) -> Collection[str]:
        return self._migrations.in_progress

    def held(self) -> Mapping[str, Mapping[str, Any]]:
        return self._failsafe.marks

    def wants_external(self, name: str) -> bool:
        return self._configs.wants_external(name)
