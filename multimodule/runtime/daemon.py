"""The control daemon: the composition root of the parts that load tasks (``registry``), follow
the config (``configs``), run tasks in their own processes (``externals``, ``migration``), hold
tasks in failsafe (``failsafe``), watch them (``monitoring``) and obey the control queue
(``control_server``), over the process they share (:class:`~multimodule.runtime.host.HostProcess`).
One asyncio loop runs every internal task. Each part gets only what it needs; none holds the
daemon. Control messages keep the original's shapes (:mod:`multimodule.runtime.control`).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from multimodule.config import (DaemonOptions, check_config, options_path, parse_limits, redact,
                                published_options)
from multimodule.errors import (ConfigError, MultiModuleError, StateError, TaskImportFailed,
                                TaskNotFound)
from multimodule.monitor.monitor import Monitor
from multimodule.oob import Channels, absolute_spec, spec_of
from multimodule.runtime.configs import Act, Action, Placement, describe_changes, plan_reload
from multimodule.runtime.control_server import ControlServer
from multimodule.runtime.externals import ExternalTasks, make_backend
from multimodule.runtime.failsafe import Failsafe
from multimodule.runtime.graph import graph_of
from multimodule.runtime.host import SOURCE, HostProcess
from multimodule.runtime.inventory import Inventory
from multimodule.runtime.metrics import serve_metrics
from multimodule.runtime.migration import Migrations
from multimodule.runtime.task_control import TaskControl
from multimodule.runtime.monitoring import AlertSender, MonitorService
from multimodule.state import write_atomic
from multimodule.supervise.base import TaskBackend
from multimodule.task import ROUTER_QNAME
from multimodule.transit import Transit

#: Seconds the stop waits, at most, for each of: answers owed to control commands in
#: progress, failsafe stops, migrations (all within the stop's budget).
SERVICE_EXIT_WAIT_S = 10.0


class Daemon(HostProcess):
    """The control daemon (see the module docstring). ``backend`` (tests): how external tasks
    run (default: chosen from ``options.task_backend``); ``monitor`` (tests): the monitor's
    windows and levels, e.g. with an injected clock."""

    def __init__(self, options: DaemonOptions, *, transit: Transit | None = None,
                 channels: Channels | None = None, backend: TaskBackend | None = None,
                 monitor: Monitor | None = None):
        super().__init__(options, transit=transit, channels=channels)
        self._backend = backend
        self._monitor = monitor or Monitor(window_s=options.monitor_window_s)
        self.alerts = AlertSender(self.channels, self.send)
        self.externals: ExternalTasks | None = None
        self.migrations: Migrations | None = None
        self.failsafe: Failsafe | None = None
        self.monitor: MonitorService | None = None
        self.control: ControlServer | None = None
        #: Tasks being stopped because they left the config.
        self._exit_externals = False
        self._metrics_server: Any = None

    # -- start -----------------------------------------------------------------------------

    def lock_names(self) -> tuple[str, str]:
        return "multimodule", f".daemon-{self.options.control_queue}"

    def prepare(self) -> None:
        self.failsafe = Failsafe(self.store.path / "failsafe.json", channels=self.channels,
                                 notify=self.alerts, stop_task=self._stop_task,
                                 start_task=self._start_cleared, loaded=self._runs,
                                 moving=lambda name: name in self.migrations)
        self.failsafe.load()
        self._publish_options()

    def check_startup_config(self) -> None:
        # At start there is no config in force to keep: a section its task's own model
        # refuses makes the daemon exit. Tasks that cannot be found are reported when loaded.
        self.configs.check(self.configs.file, self.registry.class_of, str(self.configs.path))

    async def start_tasks(self) -> None:
        opts = self.options
        backend = self._backend or make_backend(
            opts.task_backend, state_dir=self.store.path, transit_dir=self.transit.path,
            config_file=opts.config_file, task_path=opts.task_path, prefixes=opts.prefixes,
            channels=self.channels, loop=self.loop)
        self.externals = ExternalTasks(backend, state_dir=self.store.path,
                                       channels=self.channels, on_failed=self.registry.fail)
        self.migrations = Migrations(registry=self.registry, externals=self.externals,
                                     configs=self.configs, channels=self.channels,
                                     load=self._load, forget=self._forget,
                                     reconcile=self._reconcile)
        self.monitor = MonitorService(
            Inventory(self.registry, self.externals, self.migrations, self.failsafe,
                      self.configs),
            statuses=self.externals.statuses, fills=self.transit.fills,
            state_dir=self.store.path, channels=self.channels, alert=self.alerts,
            failsafe=self.failsafe.begin, interval_s=opts.monitor_interval_s,
            monitor=self._monitor, backend=backend.name,
            on_figures=lambda: self.control.keep_snapshot(self.status_now()))
        self.tasks = TaskControl(registry=self.registry, externals=self.externals,
                                 configs=self.configs, channels=self.channels, load=self._load,
                                 stop_task=self._stop_task, forget=self._forget,
                                 held=lambda n: n in self.migrations or self.failsafe.holds(n))
        self.control = ControlServer(self, transit=self.transit, qname=opts.control_queue,
                                     channels=self.channels, watchdog=self.watchdog)
        self.control.start()
        await self.externals.scan(sorted(self.configs.file))
        if not self._load(ROUTER_QNAME):
            raise MultiModuleError("the Router could not be started (see the error above); "
                                   "nothing can be routed, exiting")
        for name in sorted(self.configs.file):
            if name in self.failsafe.marks:
                self.channels.emit("log", SOURCE, f"task {name} stays stopped: in failsafe "
                                                  f"{self.failsafe.describe(name)}; "
                                                  f"`mmctl unfailsafe {name}` starts it",
                                   task=name)
            elif name not in self.registry:
                self._load(name)

    def after_ready(self) -> None:
        self.monitor.start()
        if self.options.metrics_listen:
            self._metrics_server = serve_metrics(self.options.metrics_listen, self.monitor.rows,
                                                 self.loop, self.channels)

    def _publish_options(self) -> None:
        """Write the options external tasks inherit (see :func:`inherit_options`)."""
        try:
            write_atomic(options_path(self.store.path),
                         published_options(self.options, absolute_spec(self.options.oob),
                                           spec_of(getattr(self.channels, "sinks", {}))))
        except OSError as exc:
            self.channels.emit("error", SOURCE, f"cannot write the options for external "
                                                f"tasks: {exc}")

    # -- loading ---------------------------------------------------------------------------

    def _load(self, name: str, *, on_demand: bool = False) -> bool:
        """Start task ``name`` as its config says: here, or in its own process (adopting
        one that runs already). Returns whether it runs or is starting; failures are
        reported and recorded in the registry."""
        cls = self.registry.find(name, on_demand=on_demand)
        if cls is None:
            return False
        table = self.configs.effective(name)
        try:
            config, settings = self.configs.validate(name, cls, table, self.configs.source(name))
            self.monitor.set_thresholds(name, config)
            if cls.is_stateful and config.get("is_external") is not True \
                    and self.externals.runs_outside(name):
                # Moved out by `mmctl migrate` before this daemon started: adopt it there
                # rather than run a second copy here (`mmctl migrate NAME --internal`).
                self.configs.overrides[name] = {**table, "is_external": True}
                config = {**config, "is_external": True}
                self.channels.emit("log", SOURCE, f"task {name} runs in its own process "
                                                  "(moved there before this daemon started); "
                                                  "adopting it there", task=name)
            if config.get("is_external") is True:
                self.externals.start(name, parse_limits(name, config.get("limits"),
                                                        self.configs.source(name)))
                return True
        except ConfigError as exc:
            self.registry.fail(name, f"task {name} not loaded: {exc}")
            return False
        return self.registry.start(name, cls, config, settings) is not None

    def failsafe_hung(self, name: str, reason: str, **fields: Any) -> bool:
        return self.failsafe.request(name, reason, **fields)

    def load_on_demand(self, qname: str) -> bool:
        if (self.externals is None or qname in self.registry.not_tasks
                or qname in self.registry.failures or qname in self.externals
                or self._held(qname)):
            return False
        return self._load(qname, on_demand=True) and qname in self.registry

    # -- config changes --------------------------------------------------------------------

    def _held(self, name: str) -> bool:
        return (name in self.migrations or self.failsafe.holds(name)
                or name in self.tasks.stopped or name in self.tasks.busy)

    def _placement(self, name: str) -> Placement:
        if self._held(name):
            return Placement.HELD
        if name in self.externals:
            return Placement.EXTERNAL
        if name in self.registry:
            return Placement.INTERNAL
        return Placement.ABSENT

    def apply_file(self, before: dict[str, dict[str, Any]]) -> None:
        after = self.configs.configured()
        for action in plan_reload(before, after, self._placement):
            self._do(action)
        self.channels.emit("log", SOURCE, f"config reloaded from {self.configs.path}: "
                                          f"{describe_changes(before, after)}")

    def _do(self, action: Action) -> None:
        name, act = action.name, action.act
        if act is Act.LOAD:
            self._load(name)
        elif act is Act.UNLOAD:
            self.tasks.unload(name)
        elif act in (Act.MIGRATE_OUT, Act.MIGRATE_IN):
            self.migrations.begin(name, to_external=act is Act.MIGRATE_OUT)
        elif act is Act.THRESHOLDS:
            try:
                self.monitor.set_thresholds(
                    name, check_config({name: self.configs.effective(name)}, "config")[name])
            except ConfigError:
                pass  # reported by the task's own process, which reads the file
        else:
            runner = self.registry.runners[name]
            try:
                config, settings = self.configs.validate(name, runner.cls,
                                                         self.configs.effective(name),
                                                         self.configs.source(name))
            except ConfigError as exc:
                self.channels.emit("error", SOURCE, f"config for {name} refused: {exc}")
                return
            runner.apply_config(config, settings)
            self.monitor.set_thresholds(name, config)

    def _reconcile(self, name: str) -> None:
        """After a move: follow the config in force if it changed meanwhile."""
        tables = {k: v for k, v in self.configs.configured().items() if k == name}
        for action in plan_reload(tables, tables, self._placement):
            self._do(action)

    def _forget(self, name: str) -> None:
        self.monitor.forget(name)

    # -- what control commands act on (see ControlServer) ----------------------------------

    def set_task_config(self, name: str, table: Any) -> str | None:
        """Replace task ``name``'s config (a control message). Returns why it was refused
        (``"no task ..."`` for a name no task answers to), also reported on ``error``."""
        try:
            cls = self.registry.lookup(name)
            checked = check_config({name: table}, "control message")[name]
            self.configs.check_control(name, cls, checked)
            self.configs.validate(name, cls, checked, "control message")
        except TaskNotFound as exc:
            return str(exc)
        except (ConfigError, TaskImportFailed) as exc:
            self.channels.emit("error", SOURCE, f"config for {name} refused: {exc}")
            return f"config for {name} refused: {exc}"
        before = self.configs.configured()
        self.configs.override(name, checked)
        self.registry.failures.pop(name, None)
        self.registry.not_tasks.discard(name)
        for action in plan_reload({k: v for k, v in before.items() if k == name},
                                  {name: checked}, self._placement):
            self._do(action)
        return None

    def migrate(self, name: str, to_external: bool) -> str | asyncio.Task | None:
        """``mmctl migrate``: set ``is_external`` for ``name`` (an override of its config) and
        move it. Returns why it was refused, or the asyncio task moving it."""
        if self.failsafe.holds(name):
            return f"task {name} is in failsafe; `mmctl unfailsafe {name}` first"
        if not self._runs(name):
            return f"no task {name!r} is loaded"
        problem = self.set_task_config(name, {**self.configs.effective(name),
                                              "is_external": to_external})
        return problem or self.migrations.in_progress.get(name)

    def failsafe_task(self, name: str, reason: str) -> asyncio.Task | str:
        """``mmctl failsafe``: see :meth:`Failsafe.begin`."""
        return self.failsafe.begin(name, reason, by_hand=True)

    def unfailsafe(self, name: str) -> str | asyncio.Task | None:
        """``mmctl unfailsafe``: see :meth:`Failsafe.clear`."""
        return self.failsafe.clear(name)

    def request_stop(self, exit_externals: bool = False) -> None:
        self._exit_externals = self._exit_externals or exit_externals
        super().request_stop()

    async def query(self, what: str, name: str | None) -> dict[str, Any]:
        if what == "status":
            return {"query": what, "task": name, "status": await self.status()}
        if what == "graph":
            return {"query": what, "task": name,
                    "graph": graph_of(self.registry.runners, self.configs, self.monitor)}
        reply: dict[str, Any] = {"query": what, "task": name}
        runner = self.registry.get(name)
        if runner is None and (name in self.externals or name in self.failsafe.marks):
            # Not running here: its config in force, and its state as last saved.
            reply["where"] = "failsafe" if name in self.failsafe.marks else "external"
            if what == "config":
                reply["config"] = redact(self.configs.effective(name))
                return reply
            try:
                reply["state"] = self.store.saved(name)
                reply["stateful"] = reply["saved"] = True
            except StateError as exc:
                reply["error"] = str(exc)
        elif runner is None:
            reply["error"] = f"no task {name!r} is loaded"
        elif what == "state":
            reply["state"] = runner.task.state if runner.cls.is_stateful else None
            reply["stateful"] = runner.cls.is_stateful
        else:
            reply["config"] = redact(runner.task.config)
        return reply

    # -- failsafe's stop/start pair --------------------------------------------------------

    def _runs(self, name: str) -> bool:
        return name in self.registry or name in self.externals

    async def _stop_task(self, name: str) -> None:
        if name in self.registry:
            await self.registry.unload(name)
        elif name in self.externals:
            await self.externals.stop(name)
            self.monitor.processes.pop(name, None)

    def _start_cleared(self, name: str) -> str | asyncio.Task | None:
        self.registry.failures.pop(name, None)
        self.registry.not_tasks.discard(name)
        self.monitor.forget(name)
        if not self._load(name):
            return self.registry.failures.pop(name, None) or "it could not be loaded"
        return self.externals.starting.get(name)

    # -- figures ---------------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        """The daemon's figures: pid, uptime, tasks with their counters, external tasks as
        their backend says now (asked off the loop), failures, sends refused because they
        would have created a queue over the rate, rows of the monitor."""
        return self.status_now(await self.externals.status_table())

    def status_now(self, externals: dict[str, Any] | None = None) -> dict[str, Any]:
        """:meth:`status` at once, with ``externals`` (default: as their backend last said)."""
        return {
            "pid": os.getpid(),
            "started_at": self.started_at,
            "tasks": {name: r.figures() for name, r in sorted(self.registry.runners.items())},
            "externals": self.externals.table() if externals is None else externals,
            "import_failures": dict(self.registry.failures),
            "outboxes": self.overflow.depths(),
            "queue_creations_refused": self.overflow.creations_refused,
            "rows": self.monitor.rows(),
            "queues": self.monitor.queue_rows(),
            "failsafe": dict(self.failsafe.marks),
            "monitor": self.monitor.figures(),
            "oob_dropped": self.channels.dropped,
        }

    def status_line(self) -> str:
        if self.externals is None:
            return "starting"
        return (f"{len(self.registry.runners)} tasks internal, {len(self.externals.processes)} "
                f"external, {len(self.registry.failures)} failed; "
                f"{self.message_rate():.0f} messages/s")

    # -- stop ------------------------------------------------------------------------------

    async def stop_services(self, deadline: float) -> None:
        def left() -> float:
            return max(0.0, min(SERVICE_EXIT_WAIT_S, deadline - time.monotonic()))

        if self.monitor is not None:
            await self.monitor.stop()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        if self.control is not None:
            await self.control.stop(left())
        await self.failsafe.settle(left())
        moving = list(self.migrations.in_progress.values()) if self.migrations else []
        if moving:
            await asyncio.wait(moving, timeout=left())

    async def after_tasks(self, deadline: float) -> None:
        """External tasks outlive the daemon unless ``exit_externals`` was asked for."""
        await self.externals.settle(max(0.0, deadline - time.monotonic()))
        if self._exit_externals:
            await self.externals.stop_all(max(1.0, deadline - time.monotonic()))
        elif self.externals.processes:
            self.channels.emit("log", SOURCE, "external tasks keep running: "
                                              + ", ".join(sorted(self.externals.processes)))
        self.externals.close()
        self.control.answer_waiting()  # requests that came while the tasks stopped

