"""The daemon's side of the resource monitor: sampling, alerts, and the status rows.

:class:`MonitorService` runs in the control daemon. Every ``interval_s`` it gathers a
:class:`~multimodule.monitor.monitor.TaskView` per task from a read-only
:class:`TaskInventory` (blocking reads, such as ``systemctl show`` and ``/proc``, run in worker
threads, never on the event loop), feeds the :class:`~multimodule.monitor.monitor.Monitor`, and
for every level that changed (an internal task's memory is the deep size of its instance, walked
on the loop within a budget per sample by :class:`~multimodule.monitor.deepsize.MemoryAttribution`;
see that module for what it cannot see):

- :class:`AlertSender` writes a record on the ``alert`` channel (fields ``metric``, ``level``,
  ``previous``, ``value``) and sends ``{"source": "MultiModule", "type": "alert", ...}`` to the
  Router (unless the alert channel already goes to the Router);
- at ``failsafe`` on a metric that stops (all but queue fill), it asks for failsafe (see
  :mod:`multimodule.runtime.failsafe`).
"""

from __future__ import annotations

import asyncio
import os
import time
import traceback
from pathlib import Path
from typing import Any, Awaitable, Callable, Collection, Mapping, Protocol

from multimodule.config import TaskSection, monitor_thresholds
from multimodule.errors import MultiModuleError
from multimodule.monitor.deepsize import MemoryAttribution
from multimodule.monitor.levels import Alert
from multimodule.monitor.monitor import Monitor, TaskView, read_figures_file
from multimodule.monitor.sources import Figures
from multimodule.oob import Channels
from multimodule.runtime.runner import TaskRunner
from multimodule.state import figures_path
from multimodule.supervise.base import ActiveState, TaskProcess
from multimodule.task import ROUTER_QNAME

SOURCE = "MultiModule"


def task_state(process: TaskProcess) -> str:
    """An external task's state in status terms: ``running``, ``activating``, ``failed`` or
    ``stopped`` (from systemd's ``ActiveState``, which both backends report)."""
    return {ActiveState.ACTIVE: "running", ActiveState.ACTIVATING: "activating",
            ActiveState.RELOADING: "running", ActiveState.FAILED: "failed"
            }.get(process.state, "stopped")


class TaskInventory(Protocol):
    """What the monitor may read of the daemon's tasks (it changes nothing through it)."""

    def internal(self) -> Mapping[str, TaskRunner]:
        """Runners of the tasks running in the daemon."""

    def failures(self) -> Mapping[str, str]:
        """Tasks that could not be loaded -> why."""

    def external(self) -> Mapping[str, TaskProcess | None]:
        """External tasks -> what the backend last said (``None`` while starting)."""

    def moving(self) -> Collection[str]:
        """Tasks being migrated now."""

    def held(self) -> Mapping[str, Mapping[str, Any]]:
        """Tasks in failsafe -> their marks."""

    def wants_external(self, name: str) -> bool:
        """Whether the config in force runs ``name`` in its own process."""


class AlertSender:
    """``alert(kind, task, text, fields)``: a record on the ``alert`` channel and a message
    ``{"source": "MultiModule", "type": kind, "task", "text", "time", **fields}`` to the Router
    through ``send`` (unless the alert channel itself goes to the Router). ``sent``: count."""

    def __init__(self, channels: Channels, send: Callable[[str, dict[str, Any]], None]):
        self.channels = channels
        self.send = send
        self.sent = 0

    def __call__(self, kind: str, task: str, text: str, fields: dict[str, Any]) -> None:
        self.sent += 1
        self.channels.emit("alert", task, text, **fields)
        sink = self.channels.sinks["alert"]
        if sink.kind == "queue" and sink.target == ROUTER_QNAME:
            return
        message = {"source": SOURCE, "type": kind, "task": task, "text": text,
                   "time": time.time(), **fields}
        try:
            self.send(ROUTER_QNAME, message)
        except MultiModuleError as exc:
            self.channels.emit("error", SOURCE, f"cannot send an alert to the Router: {exc}")


#: ``statuses(names)``: what the backend says of each external task (off the loop).
Statuses = Callable[[list[str]], Awaitable[Mapping[str, TaskProcess | str]]]


class MonitorService:
    """Monitoring for one daemon; see the module docstring.

    ``inventory``: the tasks. ``statuses``: see :data:`Statuses`. ``fills()``: fill of every
    System V queue (a blocking read of the kernel's table). ``state_dir``: where external tasks
    write their counters. ``alert``: an :class:`AlertSender`. ``failsafe(name, reason,
    **fields)``: put a task in failsafe. ``backend``: the external tasks' backend name
    (``"systemd"`` reads unit cgroups). ``monitor``: the windows and levels (injectable).
    ``attribution``: the memory figures of internal tasks (injectable; default budgets).
    ``on_figures()``: called on the loop when sampling starts and after each sample (the
    daemon keeps a snapshot of its status then, for ``status`` while the loop is blocked).
    """

    def __init__(self, inventory: TaskInventory, *, statuses: Statuses,
                 fills: Callable[[], dict[str, float | None]], state_dir: Path,
                 channels: Channels, alert: AlertSender,
                 failsafe: Callable[..., Any], interval_s: float, monitor: Monitor,
                 backend: str | None, attribution: MemoryAttribution | None = None,
                 on_figures: Callable[[], None] | None = None):
        self.inventory = inventory
        self.statuses = statuses
        self.fills = fills
        self.state_dir = state_dir
        self.channels = channels
        self.alert = alert
        self.failsafe = failsafe
        self.interval_s = interval_s
        self.monitor = monitor
        self.backend = backend
        self.attribution = attribution or MemoryAttribution()
        #: Internal task -> why the walk of its memory failed, as last reported.
        self._walk_failures: dict[str, str] = {}
        self.on_figures = on_figures
        #: What the last sample learnt of each external task.
        self.processes: dict[str, TaskProcess] = {}
        self._runner: asyncio.Task | None = None

    def start(self) -> None:
        """Start sampling (first sample at once)."""
        if self.on_figures is not None:
            self.on_figures()
        self._runner = asyncio.get_running_loop().create_task(self._run(), name="monitor")

    async def stop(self) -> None:
        """Stop sampling."""
        if self._runner is not None:
            self._runner.cancel()
            await asyncio.wait([self._runner])

    async def _run(self) -> None:
        while True:
            try:
                await self.sample()
                if self.on_figures is not None:
                    self.on_figures()
            except Exception as exc:  # the monitor must never take the daemon down
                self.channels.emit("error", SOURCE,
                                   f"monitor sample failed: {type(exc).__name__}: {exc}",
                                   traceback=traceback.format_exc())
            await asyncio.sleep(self.interval_s)

    def _internal_views(self) -> list[TaskView]:
        inv = self.inventory
        runners, externals = inv.internal(), inv.external()
        views = [TaskView(name, "internal", "running", pid=os.getpid(), where="daemon",
                          counters=runner.figures(), counters_since=runner.started_at,
                          last_error=runner.last_error)
                 for name, runner in list(runners.items())]
        for name, why in inv.failures().items():
            if name not in runners and name not in externals:
                views.append(TaskView(name, "internal", "failed", last_error=why))
        for name, mark in inv.held().items():
            kind = "external" if inv.wants_external(name) else "internal"
            views.append(TaskView(name, kind, "failsafe",
                                  last_error=f"failsafe: {mark.get('reason')}"))
        return views

    def _read_external(self, processes: Mapping[str, TaskProcess | str]
                       ) -> tuple[list[TaskView], dict[str, Figures], dict[str, float | None]]:
        """Blocking part of a sample (a worker thread): /proc, /sys, the kernel's queue
        figures and the externals' counter files."""
        me = TaskView(SOURCE, "daemon", "running", pid=os.getpid(), where="daemon")
        views, figures = [me], {SOURCE: self.monitor.processes.read(me.pid)}
        for name, process in processes.items():
            if isinstance(process, str):
                views.append(TaskView(name, "external", "failed", last_error=process))
                continue
            report = read_figures_file(figures_path(self.state_dir, name)) or {}
            counters = report.get("counters") if report.get("pid") == process.main_pid \
                else None
            view = TaskView(name, "external", task_state(process), pid=process.main_pid,
                            where=process.where, cgroup=self.backend == "systemd",
                            counters=counters,
                            counters_since=report.get("started_at") if counters else None,
                            restarts=process.restarts)
            views.append(view)
            figures[name] = self.monitor.read_process(view)
        return views, figures, self.fills()

    async def sample(self) -> list[Alert]:
        """Take one sample now; send the alerts due and start failsafe where reached."""
        inv = self.inventory
        views = self._internal_views()
        memory = self._attribute_memory()
        moving = set(inv.moving())
        processes = await self.statuses([n for n in inv.external() if n not in moving])
        self.processes.update({n: p for n, p in processes.items() if not isinstance(p, str)})
        more, figures, fill = await asyncio.get_running_loop().run_in_executor(
            None, self._read_external, processes)
        views += more
        figures.update(memory)
        known = {view.name for view in views}
        # A task moving between the daemon and its own process keeps its windows.
        views += [TaskView(name, "external" if name in inv.external() else "internal",
                           "activating") for name in moving if name not in known]
        alerts = self.monitor.tick(views, figures, fill)
        for alert in alerts:
            self.send_alert(alert)
            thresholds = self.monitor.tracker.thresholds_for(alert.task, alert.metric)
            if alert.new == "failsafe" and thresholds.stops and alert.task in known:
                reason = (f"flapping: {alert.value:.0f} restarts within "
                          f"{self.monitor.window_s * 5:g} s" if alert.metric == "restarts"
                          else f"{alert.metric} reached {alert.value:.4g} (failsafe level "
                               f"{thresholds.failsafe:g})")
                self.failsafe(alert.task, reason, metric=alert.metric, value=alert.value)
        return alerts

    def _attribute_memory(self) -> dict[str, Figures]:
        """The memory figure of each internal task (on the loop: the walk reads the tasks'
        objects, which only the loop's thread changes); a walk that failed is reported once
        per new reason."""
        runners = self.inventory.internal()
        memory = self.attribution.measure({name: runner.task
                                           for name, runner in list(runners.items())})
        failures = self.attribution.failures
        for name, why in failures.items():
            if self._walk_failures.get(name) != why:
                self.channels.emit("error", SOURCE, f"cannot measure the memory of task "
                                                    f"{name}: {why}", task=name)
        self._walk_failures = dict(failures)
        return {name: Figures(memory_bytes=size) for name, size in memory.items()}

    def send_alert(self, alert: Alert) -> None:
        """An alert on the ``alert`` channel and to the Router."""
        self.alert("alert", alert.task, alert.text,
                   {"metric": alert.metric, "level": alert.new, "previous": alert.old,
                    "value": alert.value})

    def set_thresholds(self, name: str, config: dict[str, Any]) -> None:
        """Apply the ``monitor`` table of task ``name``'s config (already validated)."""
        section = TaskSection.model_validate(config)
        self.monitor.set_overrides(name, monitor_thresholds(section.monitor))

    def forget(self, name: str) -> None:
        """``name`` starts afresh (cleared from failsafe, or moved): no figures from before."""
        self.monitor.forget(name)
        self.attribution.forget(name)
        self.processes.pop(name, None)

    # -- figures for operators -------------------------------------------------------------

    def rows(self) -> list[dict[str, Any]]:
        """One row per task (see :class:`Monitor`): figures as the last sample saw them,
        with where and in what state each task is now."""
        inv = self.inventory
        moving = inv.moving()
        current = {view.name: view for view in self._internal_views()}
        for name, process in list(inv.external().items()):
            known = self.processes.get(name) if process is not None else None
            process = known or process
            state = "activating" if process is None or name in moving else \
                task_state(process)
            current[name] = TaskView(name, "external", state,
                                     pid=process.main_pid if process else None,
                                     where=process.where if process else "")
        for name in moving:
            current.setdefault(name, TaskView(name, "internal", "activating"))
        rows = []
        sampled = self.monitor.rows
        for name in sorted(set(current) | {n for n, r in sampled.items()
                                           if r["kind"] == "daemon"}):
            row = sampled.get(name) or self.monitor.empty_row(current[name])
            view = current.get(name)
            if view is not None:
                row.update(kind=view.kind, state=view.state, pid=view.pid, where=view.where)
                if view.last_error:
                    row["last_error"] = view.last_error
            rows.append(row)
        return rows

    def queue_rows(self) -> list[dict[str, Any]]:
        """One row per System V queue that is no task's own (name, fill, level), by name."""
        rows = self.monitor.queue_rows
        return [rows[qname] for qname in sorted(rows)]

    def figures(self) -> dict[str, Any]:
        """The monitor's settings and counts, for the status reply."""
        return {"interval_s": self.interval_s, "window_s": self.monitor.window_s,
                "alerts_sent": self.alert.sent,
                "memory_attribution_s": round(self.attribution.last_cost_s, 6),
                "memory_attribution_walked": self.attribution.last_walked}
