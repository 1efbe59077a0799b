"""The daemon's side of the resource monitor: sampling, alerts, and failsafe.

:class:`MonitorService` runs in the control daemon. Every ``monitor_interval_s`` it gathers a
:class:`~multimodule.monitor.monitor.TaskView` per task (blocking reads, such as ``systemctl
show`` and ``/proc``, run in a worker thread, never on the event loop), feeds the
:class:`~multimodule.monitor.monitor.Monitor`, and for every level that changed:

- writes a record on the ``alert`` channel (fields ``metric``, ``level``, ``previous``,
  ``value``) and sends ``{"source": "MultiModule", "type": "alert", ...}`` to the Router
  (unless the alert channel already goes to the Router);
- at ``failsafe`` on a metric that stops (all but queue fill), puts the task in failsafe.

Failsafe stops the task (internal: unloaded after the message in hand, what it holds in
memory delivered and its state saved; external: its unit or process stopped) and marks it in
``STATE_DIR/failsafe.json``. A task so marked is not loaded, not even after a daemon restart,
until ``mmctl unfailsafe NAME``; messages sent to it meanwhile wait in its System V queue.

In the process of an external task, :class:`FiguresReporter` writes the task's counters to
``STATE_DIR/task-NAME.figures.json`` at the same interval for the daemon to read.
"""

from __future__ import annotations

import asyncio
import os
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from multimodule.config import TaskSection, monitor_thresholds, split_address
from multimodule.errors import BackendError, MultiModuleError
from multimodule.monitor.levels import Alert
from multimodule.monitor.monitor import Monitor, TaskView, read_figures_file
from multimodule.monitor.sources import Figures
from multimodule.state import write_atomic
from multimodule.supervise.base import ActiveState, TaskProcess
from multimodule.task import ROUTER_QNAME

if TYPE_CHECKING:
    from multimodule.runtime.daemon import Daemon

SOURCE = "MultiModule"


def _printable(text: str) -> str:
    """``text`` on one line, control characters as spaces (it goes into logs)."""
    return "".join(c if c.isprintable() else " " for c in text)


def task_state(process: TaskProcess) -> str:
    """An external task's state in status terms: ``running``, ``activating``, ``failed`` or
    ``stopped`` (from systemd's ``ActiveState``, which both backends report)."""
    return {ActiveState.ACTIVE: "running", ActiveState.ACTIVATING: "activating",
            ActiveState.RELOADING: "running", ActiveState.FAILED: "failed"
            }.get(process.state, "stopped")


def figures_path(state_dir: Path, task: str) -> Path:
    """Where the process of external task ``task`` writes its counters."""
    return state_dir / f"task-{task}.figures.json"


class MonitorService:
    """Monitoring, alerts and failsafe for one :class:`~multimodule.runtime.daemon.Daemon`.

    ``marks``: task name -> ``{"reason", "since", "metric", "value"}`` for tasks in failsafe.
    """

    def __init__(self, daemon: Daemon):
        self.daemon = daemon
        options = daemon.options
        self.interval_s = options.monitor_interval_s
        self.monitor = Monitor(window_s=options.monitor_window_s)
        self.marks: dict[str, dict[str, Any]] = {}
        self.entering: dict[str, asyncio.Task] = {}
        self.processes: dict[str, TaskProcess | None] = {}
        self.alerts_sent = 0
        self._runner: asyncio.Task | None = None
        self._metrics_server = None

    # -- failsafe marks --------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self.daemon.store.path / "failsafe.json"

    def load_marks(self) -> None:
        """Read the failsafe marks kept by an earlier run (a bad file is reported and kept
        aside as ``failsafe.json.bad``; no task is then held back)."""
        try:
            data = orjson.loads(self.path.read_bytes())
            if not isinstance(data, dict):
                raise ValueError("not an object")
            self.marks = {}
            for name, mark in data.items():
                if name == ROUTER_QNAME:
                    self.daemon.channels.emit("error", SOURCE, f"{self.path}: the Router is "
                                                               "never held in failsafe; ignored")
                    continue
                mark = mark if isinstance(mark, dict) else {}
                since = mark.get("since")
                mark["since"] = since if isinstance(since, (int, float)) and \
                    0 <= since < 1e11 else None
                mark["reason"] = _printable(str(mark.get("reason") or "unknown"))
                self.marks[str(name)] = mark
        except FileNotFoundError:
            self.marks = {}
        except (OSError, ValueError) as exc:
            self.daemon.channels.emit("error", SOURCE, f"cannot read {self.path}: {exc}; "
                                                       "no task is held in failsafe")
            self.path.replace(self.path.with_name("failsafe.json.bad"))
            self.marks = {}

    def _save_marks(self) -> None:
        write_atomic(self.path, orjson.dumps(self.marks, option=orjson.OPT_INDENT_2))

    def in_failsafe(self, name: str) -> bool:
        return name in self.marks

    def describe(self, name: str) -> str:
        """``since DATE (REASON)`` for a task in failsafe."""
        mark = self.marks.get(name, {})
        since = mark.get("since")
        when = f"since {time.ctime(since)} " if since is not None else ""
        return f"{when}({mark.get('reason')})"

    # -- thresholds ------------------------------------------------------------------------

    def set_thresholds(self, name: str, table: dict[str, Any]) -> None:
        """Apply the ``monitor`` table of task ``name``'s config (already validated)."""
        section = TaskSection.model_validate(table)
        self.monitor.set_overrides(name, monitor_thresholds(section.monitor))

    # -- running ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start sampling (first sample at once) and, if asked for, the Prometheus server."""
        self._runner = self.daemon.loop.create_task(self._run(), name="monitor")
        if self.daemon.options.metrics_listen:
            self._serve_metrics(self.daemon.options.metrics_listen)

    async def stop(self) -> None:
        """Stop sampling; wait for failsafe stops in progress."""
        if self._runner is not None:
            self._runner.cancel()
        for task in list(self.entering.values()):
            await asyncio.wait([task])
        if self._metrics_server is not None:
            self._metrics_server.shutdown()

    async def _run(self) -> None:
        while True:
            try:
                await self.sample()
            except Exception as exc:  # the monitor must never take the daemon down
                self.daemon.channels.emit("error", SOURCE,
                                          f"monitor sample failed: {type(exc).__name__}: {exc}",
                                          traceback=traceback.format_exc())
            await asyncio.sleep(self.interval_s)

    def _internal_views(self) -> list[TaskView]:
        daemon = self.daemon
        views = []
        for name, runner in list(daemon.runners.items()):
            views.append(TaskView(name, "internal", "running", pid=os.getpid(),
                                  where="daemon", counters=runner.figures(),
                                  counters_since=runner.started_at,
                                  last_error=runner.last_error))
        for name, why in daemon.import_failures.items():
            if name not in daemon.runners and name not in daemon.externals:
                views.append(TaskView(name, "internal", "failed", last_error=why))
        for name, mark in self.marks.items():
            external = bool(daemon.effective_config(name).get("is_external"))
            views.append(TaskView(name, "external" if external else "internal", "failsafe",
                                  last_error=f"failsafe: {mark.get('reason')}"))
        return views

    def _external_views(self, names: list[str]) -> tuple[list[TaskView], dict[str, Figures],
                                                          dict[str, float | None]]:
        """Blocking part of a sample (a worker thread): backend state, /proc, /sys, the
        kernel's queue figures and the externals' counter files."""
        daemon = self.daemon
        backend = daemon.backend
        views, figures = [], {}
        # The daemon itself: its own process figures (internal tasks share them).
        me = TaskView(SOURCE, "daemon", "running", pid=os.getpid(), where="daemon")
        views.append(me)
        figures[SOURCE] = self.monitor.processes.read(me.pid)
        for name in names:
            try:
                process = backend.status(name)
            except BackendError as exc:
                views.append(TaskView(name, "external", "failed", last_error=str(exc)))
                continue
            self.processes[name] = process
            state = task_state(process)
            report = read_figures_file(figures_path(daemon.store.path, name)) or {}
            counters = report.get("counters") if report.get("pid") == process.main_pid \
                else None
            view = TaskView(name, "external", state, pid=process.main_pid,
                            where=process.where, cgroup=backend.name == "systemd",
                            counters=counters,
                            counters_since=report.get("started_at") if counters else None,
                            restarts=process.restarts)
            views.append(view)
            figures[name] = self.monitor.read_process(view)
        return views, figures, daemon.transit.fills()

    async def sample(self) -> list[Alert]:
        """Take one sample now; send the alerts due and start failsafe where reached."""
        daemon = self.daemon
        views = self._internal_views()
        externals = [name for name, process in daemon.externals.items()
                     if name not in daemon.migrating]
        loop = asyncio.get_running_loop()
        more, figures, fill = await loop.run_in_executor(None, self._external_views, externals)
        views += more
        known = {view.name for view in views}
        # A task moving between the daemon and its own process keeps its windows.
        views += [TaskView(name, "external" if name in daemon.externals else "internal",
                           "activating") for name in daemon.migrating if name not in known]
        alerts = self.monitor.tick(views, figures, fill)
        for alert in alerts:
            self.send_alert(alert)
            thresholds = self.monitor.tracker.thresholds_for(alert.task, alert.metric)
            if alert.new == "failsafe" and thresholds.stops and alert.task in known:
                reason = (f"flapping: {alert.value:.0f} restarts within "
                          f"{self.monitor.window_s * 5:g} s" if alert.metric == "restarts"
                          else f"{alert.metric} reached {alert.value:.4g} (failsafe level "
                               f"{thresholds.failsafe:g})")
                self.begin_failsafe(alert.task, reason, metric=alert.metric, value=alert.value)
        return alerts

    # -- alerts ----------------------------------------------------------------------------

    def send_alert(self, alert: Alert) -> None:
        """An alert on the ``alert`` channel and to the Router."""
        fields = {"metric": alert.metric, "level": alert.new, "previous": alert.old,
                  "value": alert.value}
        self.notify("alert", alert.task, alert.text, fields)

    def notify(self, kind: str, task: str, text: str, fields: dict[str, Any]) -> None:
        """``text`` on the alert channel and as a ``type: kind`` message to the Router."""
        daemon = self.daemon
        self.alerts_sent += 1
        daemon.channels.emit("alert", task, text, **fields)
        sink = daemon.channels.sinks["alert"]
        if sink.kind == "queue" and sink.target == ROUTER_QNAME:
            return  # the channel itself already goes to the Router
        message = {"source": SOURCE, "type": kind, "task": task, "text": text,
                   "time": time.time(), **fields}
        try:
            daemon.send(ROUTER_QNAME, message)
        except MultiModuleError as exc:
            daemon.channels.emit("error", SOURCE, f"cannot send an alert to the Router: {exc}")

    # -- failsafe --------------------------------------------------------------------------

    def begin_failsafe(self, name: str, reason: str, **fields: Any) -> asyncio.Task | str:
        """Put ``name`` in failsafe (see the module docstring). Returns the asyncio task
        doing it, or why it cannot be done now."""
        daemon = self.daemon
        if name in self.entering:
            return self.entering[name]
        if name == ROUTER_QNAME:
            return "the Router is never put in failsafe: nothing could be routed without it"
        if name in self.marks:
            return f"task {name} is already in failsafe"
        if name in daemon.migrating:
            return f"task {name} is being migrated; try again when it has moved"
        if name not in daemon.runners and name not in daemon.externals:
            return f"no task {name!r} is loaded"
        reason = _printable(reason)
        self.marks[name] = {"reason": reason, "since": time.time(), **fields}
        try:
            self._save_marks()
        except OSError as exc:
            daemon.channels.emit("error", SOURCE, f"cannot save the failsafe mark of {name} "
                                                  f"in {self.path}: {exc}; it holds until the "
                                                  "daemon exits")
        self.notify("failsafe", name, f"failsafe: {reason}; stopped until "
                                      f"`mmctl unfailsafe {name}`",
                    {"level": "failsafe", "reason": reason,
                     "metric": fields.get("metric"), "value": fields.get("value")})
        task = daemon.loop.create_task(self._stop_task(name), name=f"failsafe:{name}")
        self.entering[name] = task
        task.add_done_callback(lambda _: self.entering.pop(name, None))
        return task

    async def _stop_task(self, name: str) -> str | None:
        daemon = self.daemon
        try:
            if name in daemon.runners:
                runner = daemon.runners[name]
                await runner.stop()
                leftover = daemon.transit.undeclare_local(name)
                daemon.runners.pop(name, None)
                for message in leftover:  # sent to it while it stopped: keep them
                    daemon._send_out(name, message)
            elif name in daemon.externals:
                daemon.externals.pop(name)
                self.processes.pop(name, None)
                await daemon.loop.run_in_executor(None, daemon.backend.stop, name)
        except (MultiModuleError, OSError) as exc:
            problem = f"failsafe: cannot stop task {name}: {exc}"
            daemon.channels.emit("error", SOURCE, problem, task=name)
            return problem
        daemon.channels.emit("log", SOURCE, f"task {name} stopped (failsafe)", task=name)
        return None

    def unfailsafe(self, name: str) -> str | asyncio.Task | None:
        """Clear ``name``'s failsafe mark and start it again as its config says. Returns
        why it was refused, the asyncio task starting it (external), or ``None``."""
        daemon = self.daemon
        if name in self.entering:
            return f"task {name} is still being stopped; try again"
        if name not in self.marks:
            return f"task {name} is not in failsafe"
        mark = self.marks.pop(name)
        daemon.import_failures.pop(name, None)
        daemon.not_tasks.discard(name)
        if daemon._load(name) is None and name not in daemon.externals:
            # It cannot run (its config or code changed meanwhile): it stays in failsafe.
            self.marks[name] = mark
            problem = daemon.import_failures.pop(name, None) or "it could not be loaded"
            return f"task {name} stays in failsafe: {problem}"
        try:
            self._save_marks()
        except OSError as exc:
            daemon.channels.emit("error", SOURCE, f"cannot save {self.path}: {exc}")
        self.monitor.forget(name)
        self.notify("failsafe", name, "failsafe cleared by hand; started again",
                    {"level": "ok", "reason": "unfailsafe", "metric": None, "value": None})
        return daemon.starting.get(name)

    # -- figures for operators -------------------------------------------------------------

    def rows(self) -> list[dict[str, Any]]:
        """One row per task (see :class:`Monitor`): figures as the last sample saw them,
        with where and in what state each task is now."""
        daemon = self.daemon
        current = {view.name: view for view in self._internal_views()}
        for name, process in list(daemon.externals.items()):
            known = self.processes.get(name) if process is not None else None
            process = known or process
            state = "activating" if process is None or name in daemon.migrating else \
                task_state(process)
            current[name] = TaskView(name, "external", state,
                                     pid=process.main_pid if process else None,
                                     where=process.where if process else "")
        for name in daemon.migrating:
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

    def _serve_metrics(self, address: str) -> None:
        try:
            from prometheus_client import start_http_server
            from prometheus_client.registry import CollectorRegistry
        except ImportError:
            self.daemon.channels.emit("error", SOURCE, "--metrics-listen needs the "
                                                       "prometheus_client package; not serving")
            return
        host, port = split_address(address)
        registry = CollectorRegistry()
        registry.register(PrometheusCollector(self))
        try:
            self._metrics_server, _ = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            self.daemon.channels.emit("error", SOURCE, f"cannot serve metrics on {address}: "
                                                       f"{exc}")
            return
        self.daemon.channels.emit("log", SOURCE, f"serving metrics on http://{host}:{port}/metrics")


#: Row field -> (metric name, help) for the Prometheus exposition.
PROMETHEUS_GAUGES = {
    "messages_in_per_s": ("multimodule_task_messages_in_per_second",
                          "Messages handled per second over the short window"),
    "messages_out_per_s": ("multimodule_task_messages_out_per_second",
                           "Messages sent per second over the short window"),
    "cpu_percent": ("multimodule_task_cpu_percent", "CPU use, percent of one core"),
    "memory_bytes": ("multimodule_task_memory_bytes", "Memory in use, bytes"),
    "open_fds": ("multimodule_task_open_fds", "Open file descriptors"),
    "threads": ("multimodule_task_threads", "Threads"),
    "queue_fill": ("multimodule_task_queue_fill_ratio", "Fill of the task's System V queue"),
    "queue_depth": ("multimodule_task_queue_depth", "Messages in the task's memory queue"),
    "restarts": ("multimodule_task_restarts", "Restarts counted by the backend"),
    "message_failures": ("multimodule_task_message_failures", "Handler failures"),
}

LEVEL_NUMBER = {"ok": 0, "warn": 1, "severe": 2, "failsafe": 3}


class PrometheusCollector:
    """Exposes the rows of a :class:`MonitorService`, built at scrape time on the event
    loop (the server runs in its own thread; the monitor belongs to the loop)."""

    #: Seconds a scrape waits for the loop.
    SCRAPE_WAIT_S = 5.0

    def __init__(self, service: MonitorService):
        self.service = service

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        async def rows() -> list[dict[str, Any]]:
            return self.service.rows()

        loop = self.service.daemon.loop
        rows = asyncio.run_coroutine_threadsafe(rows(), loop).result(self.SCRAPE_WAIT_S)
        families = {field: GaugeMetricFamily(name, text, labels=["task", "kind"])
                    for field, (name, text) in PROMETHEUS_GAUGES.items()}
        level = GaugeMetricFamily("multimodule_task_level",
                                  "Worst level: 0 ok, 1 warn, 2 severe, 3 failsafe",
                                  labels=["task", "kind"])
        running = GaugeMetricFamily("multimodule_task_running",
                                    "1 while the task runs, 0 when stopped, failed or in "
                                    "failsafe", labels=["task", "kind"])
        failsafe = GaugeMetricFamily("multimodule_task_failsafe",
                                     "1 while the task is held in failsafe",
                                     labels=["task", "kind"])
        for row in rows:
            labels = [row["name"], row["kind"]]
            for field, family in families.items():
                if row.get(field) is not None:
                    family.add_metric(labels, float(row[field]))
            level.add_metric(labels, LEVEL_NUMBER.get(row["level"], 0))
            running.add_metric(labels, 1 if row["state"] == "running" else 0)
            failsafe.add_metric(labels, 1 if row["state"] == "failsafe" else 0)
        yield from families.values()
        yield from (level, running, failsafe)


class FiguresReporter:
    """In the process of an external task: write the task's counters for the daemon every
    ``interval_s`` seconds (``{"pid", "started_at", "time", "counters"}``), atomically."""

    def __init__(self, daemon: Daemon, name: str, interval_s: float):
        self.daemon = daemon
        self.name = name
        self.interval_s = interval_s
        self.path = figures_path(daemon.store.path, name)
        self._runner: asyncio.Task | None = None

    def start(self) -> None:
        self._runner = self.daemon.loop.create_task(self._run(), name="report-figures")

    async def _run(self) -> None:
        while True:
            self.write()
            await asyncio.sleep(self.interval_s)

    def write(self) -> None:
        runner = self.daemon.runners.get(self.name)
        if runner is None:
            return
        report = {"pid": os.getpid(), "started_at": runner.started_at, "time": time.time(),
                  "counters": runner.figures()}
        try:
            write_atomic(self.path, orjson.dumps(report, default=str), mode=0o660)
        except OSError as exc:
            self.daemon.channels.emit("error", SOURCE, f"cannot write {self.path}: {exc}")

    def stop(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
        self.path.unlink(missing_ok=True)
