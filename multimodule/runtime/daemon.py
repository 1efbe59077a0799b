"""The control daemon: loads tasks, routes their messages, keeps their state, obeys its control
queue, follows its config file.

One asyncio event loop runs every internal task cooperatively. The daemon is the tasks' host
(:class:`~multimodule.task.TaskHost`): a task's send goes to the in-memory queue of a task in
this process, loading that task on first use if a task of that name can be found, and otherwise
to the System V queue of that name through a per-queue outbox that never blocks the loop.

Control messages (on ``-q``, default ``MultiModule_control``) keep the original's shapes::

    {".multimodule": {"config": {"Task": {...}}}}              replace Task's config
    {".multimodule": {"control": [{"type": "cleanly_exit", "exit_externals": 0}]}}
    {".multimodule": {"control": [{"type": "reload"}]}}        re-read the config file
    {".multimodule": {"query": "state"|"config"|"status", "task": "T", "reply_to": "Q"}}
    {".multimodule": {"failsafe": "T", "reason": "..."}}        stop T until unfailsafe
    {".multimodule": {"unfailsafe": "T"}}

The resource monitor (:mod:`multimodule.runtime.monitoring`) samples every task, sends alerts
and puts tasks in failsafe.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
import traceback
from collections import deque
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel

from multimodule.config import (
    INHERITED_OPTIONS,
    DaemonOptions,
    check_config,
    load_config_file,
    options_path,
    parse_limits,
    validate_task_config,
)
from multimodule.errors import (
    AlreadyRunning,
    BackendError,
    ConfigError,
    MultiModuleError,
    QueueFull,
    TaskImportFailed,
    TaskNotFound,
    TransitError,
)
from multimodule.oob import Channels, absolute_spec, parse_spec
from multimodule.runtime.notify import Notifier
from multimodule.runtime.loader import find_task_class
from multimodule.runtime.control import CONTROL_KEY, parse_control
from multimodule.runtime.monitoring import FiguresReporter, MonitorService
from multimodule.runtime.runner import TaskRunner
from multimodule.state import InstanceLock, StateStore, write_atomic
from multimodule.supervise.base import (
    LaunchSpec,
    TaskBackend,
    TaskProcess,
    choose_backend_name,
)
from multimodule.supervise.detached import DetachedBackend
from multimodule.supervise.systemd import SystemdBackend
from multimodule.supervise.units import render_dropin
from multimodule.task import ROUTER_QNAME, Task, Work
from multimodule.transit import Transit
from multimodule.transit.lowlevel import encode_body, ensure_handler, make_meta


#: Name used for the daemon's own records and messages.
DAEMON_SOURCE = "MultiModule"

#: Seconds between two STATUS= lines sent to systemd.
STATUS_EVERY_S = 5.0

#: Seconds the daemon waits at exit for outboxes to drain into full System V queues.
OUTBOX_EXIT_WAIT_S = 5.0


class Outbox:
    """Messages for one System V queue that was full: a thread sends them in order, waiting
    for room, so the event loop never waits. While it holds messages, later sends to the same
    queue join it (order is kept). ``depth``: messages waiting. ``kept_file``: the file these
    messages were restored from at start; removed once they are all sent."""

    #: Seconds of each wait for room, between two looks at the stop flag.
    WAIT_S = 0.5

    def __init__(self, daemon: Daemon, qname: str, kept_file: Path | None = None):
        self.daemon = daemon
        self.qname = qname
        self.kept_file = kept_file
        self.items: deque[bytes] = deque()
        self.cond = threading.Condition()
        self.retired = False
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name=f"mm-outbox:{qname}", daemon=True)

    def start(self) -> None:
        """Start the sending thread."""
        self.thread.start()

    @property
    def depth(self) -> int:
        return len(self.items)

    def put(self, body: bytes) -> bool:
        """Queue ``body``; ``False`` if this outbox already emptied and retired."""
        with self.cond:
            if self.retired:
                return False
            self.items.append(body)
            return True

    def _run(self) -> None:
        transit = self.daemon.transit
        while not self.stopping:
            with self.cond:
                if not self.items:
                    # Nothing left: retire, so the next send tries the fast path again.
                    self.retired = True
                    if self.daemon._outboxes.get(self.qname) is self:
                        del self.daemon._outboxes[self.qname]
                    if self.kept_file is not None:
                        self.kept_file.unlink(missing_ok=True)
                    return
                body = self.items[0]
            try:
                transit.sysv_queue(self.qname).send_body(body, self.WAIT_S)
            except QueueFull:
                continue
            except TransitError as exc:
                self.daemon.loop.call_soon_threadsafe(
                    self.daemon.channels.emit, "error", DAEMON_SOURCE,
                    f"outbox for queue {self.qname!r}: {exc}; retrying in 1 s")
                time.sleep(1.0)
                continue
            with self.cond:
                self.items.popleft()

    def wait_empty(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every message to be sent."""
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def stop_and_take(self) -> list[bytes]:
        """Stop the thread (within ``WAIT_S``) and return the messages not sent, in order."""
        self.stopping = True
        self.thread.join()
        with self.cond:
            self.retired = True
            return list(self.items)


class Daemon:
    """The control daemon (or, with ``options.module``, the host of one external task).

    ``transit`` and ``channels`` may be passed in (tests); otherwise they are made from
    ``options``. :meth:`run` returns the process exit status.
    """

    def __init__(self, options: DaemonOptions, *, transit: Transit | None = None,
                 channels: Channels | None = None):
        self.options = options
        self.transit = transit
        self.channels = channels or Channels(parse_spec(options.oob), options.debug)
        self.runners: dict[str, TaskRunner] = {}
        self.file_config: dict[str, dict[str, Any]] = {}
        self.overrides: dict[str, dict[str, Any]] = {}
        self.import_failures: dict[str, str] = {}
        self.not_tasks: set[str] = set()
        self._outboxes: dict[str, Outbox] = {}
        self._stop: asyncio.Event | None = None
        self._reload_handle: asyncio.TimerHandle | None = None
        self._control_runner: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.store: StateStore | None = None
        self.lock: InstanceLock | None = None
        self.control_receiver = None
        self.started_at: float | None = None
        #: Set once the configured tasks are loaded (tests and readiness notification wait on it).
        self.ready: asyncio.Event | None = None
        self.exit_status = 0
        self.notifier = Notifier()
        self.last_config_error: str | None = None
        #: How external tasks run (made in run(); None in the process of an external task).
        self.backend: TaskBackend | None = None
        self.externals: dict[str, TaskProcess | None] = {}  # None while being started
        self.migrating: set[str] = set()
        self.migrations: dict[str, asyncio.Task] = {}
        self.starting: dict[str, asyncio.Task] = {}
        self._exit_externals = False
        self._rate_mark: tuple[float, int] = (time.monotonic(), 0)
        #: The resource monitor, alerts and failsafe marks (the control daemon only).
        self.watch = MonitorService(self)
        self.reporter: FiguresReporter | None = None

    # -- TaskHost --------------------------------------------------------------------------

    def send(self, qname: str, message: dict[str, Any], *, owned: bool = False) -> None:
        """Send for a task: in memory to a task here (loading it on first use), else out over
        System V without blocking the loop. ``owned``: see :meth:`Task.send`. Raises the
        transit's usage errors."""
        transit = self.transit
        if transit.is_local(qname) or (
                not self.options.module and qname not in self.not_tasks
                and qname not in self.externals and qname not in self.watch.marks
                and qname not in self.import_failures and self._load_on_demand(qname)):
            if owned:
                transit.send_owned(qname, message)
            else:
                transit.send(qname, message)
            return
        self._send_out(qname, message)

    def _send_out(self, qname: str, message: dict[str, Any]) -> None:
        """Send over System V now if there is room, else through the queue's outbox."""
        outbox = self._outboxes.get(qname)
        if outbox is not None and outbox.put(encode_body(message, make_meta({}))):
            return
        try:
            self.transit.send(qname, message, timeout=0)
            return
        except QueueFull:
            pass
        # Full: queue it behind a thread that waits for room (created before the first put, so
        # the thread cannot retire before it sees the message).
        outbox = Outbox(self, qname)
        outbox.put(encode_body(message, make_meta({})))
        self._outboxes[qname] = outbox
        outbox.start()
        self.channels.emit("debug", DAEMON_SOURCE,
                           f"queue {qname!r} is full; holding messages in order")

    def recur(self, task: Task, name: str, interval: float, work: Work) -> None:
        """Schedule ``work`` for ``task`` (see :meth:`Task.named_recur`)."""
        self.runners[task.name].recur(name, interval, work)

    # -- config ----------------------------------------------------------------------------

    def effective_config(self, name: str) -> dict[str, Any]:
        """The table in force for task ``name``: a control-message override, else the file's."""
        if name in self.overrides:
            return self.overrides[name]
        return self.file_config.get(name, {})

    def _validated(self, name: str, cls: type[Task], table: dict[str, Any], source: str
                   ) -> tuple[dict[str, Any], BaseModel | None]:
        config, settings = validate_task_config(name, cls.Config, table, source)
        external = config.get("is_external") is True
        if external and not cls.is_stateful:
            raise ConfigError(f"{source}: {name}.is_external: only a stateful task runs "
                              "external (a stateless one is served by the daemon's copy)")
        return config, settings

    def _load(self, name: str, *, on_demand: bool = False) -> TaskRunner | None:
        """Import, construct and start task ``name``; report and return ``None`` on failure."""
        try:
            # On first use (a message sent to the name), a bare module name is only looked
            # for in --task-path directories: a queue name must not import any module at all.
            cls = find_task_class(name, self.options.prefixes,
                                  bare_paths=self.options.task_path if on_demand else None)
        except TaskNotFound as exc:
            if on_demand:
                self.not_tasks.add(name)
            else:
                self.import_failures[name] = str(exc)
                self.channels.emit("error", DAEMON_SOURCE, f"cannot load task {name}: {exc}",
                                   task=name)
            return None
        except TaskImportFailed as exc:
            self.import_failures[name] = str(exc)
            self.channels.emit("error", DAEMON_SOURCE, str(exc), task=name,
                               traceback=exc.details)
            return None
        table = self.effective_config(name)
        try:
            config, settings = self._validated(name, cls, table, self._config_source(name))
            self.watch.set_thresholds(name, config)
            if not self.options.module and config.get("is_external") is not True \
                    and cls.is_stateful and self._runs_outside(name):
                # Moved out by `mmctl migrate` before this daemon started: adopt it there
                # rather than run a second copy here (`mmctl migrate NAME --internal` brings
                # it back).
                self.overrides[name] = {**table, "is_external": True}
                config = {**config, "is_external": True}
                self.channels.emit("log", DAEMON_SOURCE,
                                   f"task {name} runs in its own process (moved there before "
                                   "this daemon started); adopting it there", task=name)
            if config.get("is_external") is True and not self.options.module:
                self._start_external(name, config)
                return None
        except (ConfigError, BackendError) as exc:
            self.import_failures[name] = str(exc)
            self.channels.emit("error", DAEMON_SOURCE, f"task {name} not loaded: {exc}",
                               task=name)
            return None
        try:
            runner = TaskRunner(self, name, cls, store=self.store)
            self.runners[name] = runner
            runner.start(config, settings)
        except Exception as exc:
            self.runners.pop(name, None)
            self.transit.undeclare_local(name)
            self.import_failures[name] = f"{type(exc).__name__}: {exc}"
            self.channels.emit("error", DAEMON_SOURCE,
                               f"task {name} failed to start: {type(exc).__name__}: {exc}",
                               task=name, traceback=traceback.format_exc())
            return None
        self.channels.emit("debug", DAEMON_SOURCE, f"loaded task {name} from {cls.__module__}")
        return runner

    def _start_external(self, name: str, config: dict[str, Any]) -> None:
        """Start (or adopt) external task ``name`` through the backend, in a worker thread
        (``systemctl start`` waits for the unit's READY=1; the loop must not). Until it is
        up, ``externals[name]`` is ``None`` and sends to it go to its System V queue. Raises
        :class:`ConfigError` for bad limits; a failing backend is reported and recorded as
        the task's import failure."""
        limits = parse_limits(name, config.get("limits"), self._config_source(name))
        self.externals[name] = None
        self.starting[name] = self.loop.create_task(self._start_in_worker(name, limits),
                                                    name=f"start:{name}")

    async def _start_in_worker(self, name: str, limits) -> str | None:
        """Returns why the start failed, or ``None``."""
        try:
            process = await self.loop.run_in_executor(
                None, self.backend.start, name, render_dropin(name, limits), limits)
        except (BackendError, OSError) as exc:
            if self.externals.get(name, 0) is None:
                del self.externals[name]
            self.import_failures[name] = str(exc)
            self.channels.emit("error", DAEMON_SOURCE, f"task {name} not started: {exc}",
                               task=name)
            return f"task {name} not started: {exc}"
        finally:
            self.starting.pop(name, None)
        if name in self.externals:
            self.externals[name] = process
            self.channels.emit("log", DAEMON_SOURCE,
                               f"external task {name} runs as {process.where} "
                               f"(pid {process.main_pid}, {self.backend.name})", task=name)
        return None

    # -- migration -------------------------------------------------------------------------

    def _begin_migration(self, name: str, *, to_external: bool) -> None:
        self.migrating.add(name)
        self.migrations[name] = self.loop.create_task(self._migrate(name, to_external),
                                                      name=f"migrate:{name}")

    async def _migrate(self, name: str, to_external: bool) -> str | None:
        """Move task ``name`` between the daemon and its own process, keeping its state and
        every message, in order.

        To external: stop the runner (the message in hand finishes, what is in memory is
        delivered, state saved), then, in one step of the loop, hand the name over to System V
        (messages sent meanwhile by other tasks join the queue behind the leftovers) and start
        the task's process, which restores the state and reads the queue. To internal: stop
        the task's process (it delivers what it holds and saves), then load it here.
        """
        where = "its own process" if to_external else "the daemon"
        self.channels.emit("log", DAEMON_SOURCE, f"migrating task {name} to {where}", task=name)
        try:
            if to_external:
                runner = self.runners[name]
                await runner.stop()
                leftover = self.transit.undeclare_local(name)
                del self.runners[name]
                self.externals[name] = None  # sends go out over System V from now on
                for message in leftover:
                    self._send_out(name, message)
                config = self.effective_config(name)
                limits = parse_limits(name, config.get("limits"), self._config_source(name))
                process = await self.loop.run_in_executor(
                    None, self.backend.start, name, render_dropin(name, limits), limits)
                self.externals[name] = process
            else:
                await self.loop.run_in_executor(None, self.backend.stop, name)
                del self.externals[name]
                if self._load(name) is None:
                    raise MultiModuleError(f"task {name} could not be loaded in the daemon")
        except (MultiModuleError, OSError) as exc:
            problem = f"migration of task {name} to {where} failed: {exc}"
            self.channels.emit("error", DAEMON_SOURCE, problem, task=name)
        else:
            problem = None
            self.channels.emit("log", DAEMON_SOURCE, f"task {name} now runs in {where}",
                               task=name)
        finally:
            self.migrating.discard(name)
        # The config may have changed again while we were busy.
        if bool(self.effective_config(name).get("is_external")) != (name in self.externals):
            self._apply(name, {})
        return problem

    def migrate(self, name: str, to_external: bool) -> str | None:
        """``mmctl migrate``: set ``is_external`` for ``name`` (a control-message override of
        its config) and move it. Returns why it was refused, or ``None``."""
        if self.watch.in_failsafe(name):
            return f"task {name} is in failsafe; `mmctl unfailsafe {name}` first"
        if name not in self.runners and name not in self.externals:
            return f"no task {name!r} is loaded"
        table = dict(self.effective_config(name))
        table["is_external"] = to_external
        return self.set_task_config(name, table)

    def _apply_process_limits(self, name: str) -> None:
        """In an external task's process: ``limits.nice`` and ``limits.environment``, which a
        backend cannot always set (detached processes; units started by an unprivileged
        daemon). Raises :class:`ConfigError` for bad limits."""
        limits = parse_limits(name, self.effective_config(name).get("limits"),
                              self._config_source(name))
        os.environ.update(limits.environment)
        if limits.nice is not None:
            try:
                os.setpriority(os.PRIO_PROCESS, 0, limits.nice)
            except OSError as exc:
                self.channels.emit("error", DAEMON_SOURCE,
                                   f"cannot set nice {limits.nice} for task {name}: {exc}",
                                   task=name)

    def _publish_options(self) -> None:
        """Write the options external tasks inherit (see :func:`inherit_options`): their
        units' command lines do not carry the daemon's ``-o``, ``-d`` or monitor options."""
        opts = self.options
        inherited = {name: getattr(opts, name) for name in INHERITED_OPTIONS}
        inherited["oob"] = absolute_spec(opts.oob)
        try:
            write_atomic(options_path(self.store.path), orjson.dumps(inherited), mode=0o640)
        except OSError as exc:
            self.channels.emit("error", DAEMON_SOURCE, f"cannot write the options for "
                                                       f"external tasks: {exc}")

    def _make_backend(self) -> TaskBackend:
        opts = self.options
        if choose_backend_name(opts.task_backend) == "systemd":
            return SystemdBackend()

        def on_event(task: str, text: str) -> None:
            self.channels.emit("log", DAEMON_SOURCE, f"external task {task}: {text}", task=task)

        spec = LaunchSpec(
            argv_prefix=(sys.executable, "-m", "multimodule.cli.daemon"),
            state_dir=self.store.path.resolve(),
            config_file=opts.config_file.resolve() if opts.config_file else None,
            transit_dir=self.transit.path.resolve(),
            task_path=tuple(p.resolve() for p in opts.task_path),
            prefixes=tuple(opts.prefixes))
        return DetachedBackend(spec, loop=self.loop, on_event=on_event)

    def _runs_outside(self, name: str) -> bool:
        """Whether an external instance of task ``name`` runs now (its unit is active, or
        its detached process holds its lock)."""
        if self.backend is None or name in self.externals:
            return False
        try:
            return self.backend.status(name).running
        except BackendError:
            return False

    def _task_class(self, name: str) -> type[Task] | None:
        """Task ``name``'s class, to check a config for it: the loaded one, else found the
        way the config file's tasks are (``None`` if there is none to be found)."""
        runner = self.runners.get(name)
        if runner is not None:
            return runner.cls
        try:
            return find_task_class(name, self.options.prefixes)
        except (TaskNotFound, TaskImportFailed):
            return None

    def _load_on_demand(self, name: str) -> bool:
        return self._load(name, on_demand=True) is not None

    def _config_source(self, name: str) -> str:
        if name in self.overrides:
            return "control message"
        return str(self.options.config_file or "config")

    def _check_startup_config(self) -> None:
        """At start there is no config in force to keep: a section that its task's own model
        refuses makes the daemon exit (raises :class:`ConfigError`). Tasks that cannot be
        found or imported are reported when loaded; the others run."""
        module = self.options.module
        for name, table in self.file_config.items():
            if module and name != module:
                continue  # the process of one external task checks only its own section
            cls = self._task_class(name)
            if cls is not None:
                self._validated(name, cls, table, str(self.options.config_file))

    def reload_config(self) -> bool:
        """Re-read the config file and apply what changed; refuse (keep the old) if invalid.

        Under systemd, ``RELOADING=1`` before and ``READY=1`` after, either way."""
        self.notifier.reloading()
        try:
            return self._reload_config()
        finally:
            self.notifier.ready(self.status_line())

    def _reload_config(self) -> bool:
        path = self.options.config_file
        if path is None:
            return True
        try:
            new = load_config_file(path)
            # Check every section against its task's own model before touching anything.
            for name, table in new.items():
                cls = self._task_class(name)
                if cls is not None:
                    self._validated(name, cls, table, str(path))
        except ConfigError as exc:
            self.last_config_error = f"config refused, the previous config stays in force: {exc}"
            self.channels.emit("error", DAEMON_SOURCE, self.last_config_error)
            return False
        before = {name: self.effective_config(name) for name in set(self.file_config) | set(new)}
        for name in set(self.file_config) | set(new):
            if self.file_config.get(name) != new.get(name):
                self.overrides.pop(name, None)  # the file changed this task: the file wins
        self.file_config = new
        self.not_tasks.clear()
        self.import_failures.clear()
        for name in sorted(set(before) | set(new)):
            if self.options.module and name != self.options.module:
                continue  # the process of one external task runs that task only
            self._apply(name, before.get(name, {}))
        self.channels.emit("debug", DAEMON_SOURCE, f"config reloaded from {path}")
        return True

    def _apply(self, name: str, before: dict[str, Any]) -> None:
        table = self.effective_config(name)
        # In the process of an external task (-m), is_external is where it already runs.
        external = bool(table.get("is_external")) and not self.options.module
        if name in self.migrating:
            return  # the migration in progress reads the config in force when it ends
        if self.watch.in_failsafe(name) or name in self.watch.entering:
            return  # stays stopped; unfailsafe loads it with the config then in force
        if name in self.externals:
            if not external:
                self._begin_migration(name, to_external=False)
            elif table != before:
                try:
                    self.watch.set_thresholds(name, check_config({name: table}, "config")[name])
                except ConfigError:
                    pass  # reported by the task's own process, which reads the file
            return  # otherwise the task's own process follows the config file
        runner = self.runners.get(name)
        if runner is not None and external:
            self._begin_migration(name, to_external=True)
            return
        if runner is None:
            if name in self.file_config or name in self.overrides:
                self._load(name)
            return
        if table == before:
            return
        try:
            config, settings = self._validated(name, runner.cls, table, self._config_source(name))
        except ConfigError as exc:
            self.channels.emit("error", DAEMON_SOURCE, f"config for {name} refused: {exc}")
            return
        runner.apply_config(config, settings)
        self.watch.set_thresholds(name, config)

    def set_task_config(self, name: str, table: Any) -> str | None:
        """Replace task ``name``'s config (a control message). Returns ``None``, or why it
        was refused (also reported on ``error``)."""
        try:
            checked = check_config({name: table}, "control message")[name]
            cls = self._task_class(name)
            if cls is not None:
                self._validated(name, cls, checked, "control message")
        except ConfigError as exc:
            self.channels.emit("error", DAEMON_SOURCE, f"config for {name} refused: {exc}")
            return f"config for {name} refused: {exc}"
        before = self.effective_config(name)
        self.overrides[name] = checked
        self.import_failures.pop(name, None)
        self.not_tasks.discard(name)
        self._apply(name, before)
        return None

    # -- control queue ---------------------------------------------------------------------

    def _on_control(self, message: dict[str, Any]) -> None:
        try:
            body = parse_control(message)
        except ConfigError as exc:
            self.channels.emit("error", DAEMON_SOURCE, f"control message refused: {exc}",
                               message=message)
            reply_to = (message.get(CONTROL_KEY) or {}).get("reply_to") \
                if isinstance(message.get(CONTROL_KEY), dict) else None
            if isinstance(reply_to, str):
                self._reply(reply_to, {"error": f"control message refused: {exc}"})
            return
        if body.expires_at is not None and body.expires_at < time.time():
            self.channels.emit("log", DAEMON_SOURCE, "ignored an expired control message",
                               message=message)
            return
        errors: list[str] = []
        for name, table in (body.config or {}).items():
            problem = self.set_task_config(name, table)
            if problem:
                errors.append(problem)
        migration = None
        if body.migrate is not None:
            problem = self.migrate(body.migrate.task, body.migrate.to == "external")
            if problem:
                errors.append(problem)
            else:
                migration = self.migrations.get(body.migrate.task)
        if body.failsafe is not None:
            outcome = self.watch.begin_failsafe(
                body.failsafe, body.reason or "put in failsafe by hand", by_hand=True)
            if isinstance(outcome, str):
                errors.append(outcome)
            else:
                migration = outcome
        if body.unfailsafe is not None:
            outcome = self.watch.unfailsafe(body.unfailsafe)
            if isinstance(outcome, str):
                errors.append(outcome)
            elif outcome is not None:
                migration = outcome  # answer once its unit or process is up
        for item in body.control:
            if item.type == "cleanly_exit":
                self.channels.emit("log", DAEMON_SOURCE, "cleanly_exit requested on the "
                                                         "control queue" +
                                   (", external tasks too" if item.exit_externals else ""))
                self._exit_externals = item.exit_externals
                self.request_stop()
            elif item.type == "reload" and not self.reload_config():
                errors.append(self.last_config_error or "config file refused")
        if errors and body.reply_to is None:
            self.channels.emit("error", DAEMON_SOURCE,
                               "control message refused: " + "; ".join(errors))
        if body.query is not None:
            reply = self._query(body.query, body.task)
        elif errors:
            reply = {"error": "; ".join(errors)}
        else:
            reply = {"ok": True}
        if body.reply_to is not None:
            if migration is not None and not migration.done() and "error" not in reply:
                # Answer once the task has moved, so that `mmctl migrate` returns then.
                reply_to = body.reply_to

                def answer(task: asyncio.Task) -> None:
                    problem = task.result() if not task.cancelled() else "cancelled"
                    self._reply(reply_to, {"error": problem} if problem else {"ok": True})

                migration.add_done_callback(answer)
            else:
                self._reply(body.reply_to, reply)

    def _reply(self, reply_to: str, reply: dict[str, Any]) -> None:
        # Only to a reply queue that still exists, never creating or remembering it: a client
        # that gave up has removed its queue.
        if not self.transit.send_if_exists(reply_to, reply):
            self.channels.emit("debug", DAEMON_SOURCE,
                               f"no reply sent: reply queue {reply_to!r} is gone or full")

    def _query(self, what: str, name: str | None) -> dict[str, Any]:
        reply: dict[str, Any] = {"query": what, "task": name}
        if what == "status":
            reply["status"] = self.status()
            return reply
        runner = self.runners.get(name)
        if runner is None and (name in self.externals or self.watch.in_failsafe(name)):
            # Not running here: its config in force, and its state as last saved.
            reply["where"] = "failsafe" if self.watch.in_failsafe(name) else "external"
            if what == "config":
                reply["config"] = self.effective_config(name)
                return reply
            try:
                reply["state"] = orjson.loads(self.store.file_for(name).read_bytes())
                reply["stateful"] = True
                reply["saved"] = True
            except FileNotFoundError:
                reply["error"] = f"task {name} has no saved state"
            except (OSError, orjson.JSONDecodeError) as exc:
                reply["error"] = f"cannot read the saved state of {name}: {exc}"
        elif runner is None:
            reply["error"] = f"no task {name!r} is loaded"
        elif what == "state":
            reply["state"] = runner.task.state if runner.cls.is_stateful else None
            reply["stateful"] = runner.cls.is_stateful
        else:
            reply["config"] = runner.task.config
        return reply

    def status_line(self) -> str:
        """One line for systemd's ``STATUS=``: tasks loaded and failed, messages per second
        handled since the previous line."""
        handled = sum(r.task.counters.messages_in for r in self.runners.values())
        now = time.monotonic()
        then, before = self._rate_mark
        self._rate_mark = (now, handled)
        rate = (handled - before) / (now - then) if now > then else 0.0
        if self.options.module:
            return f"task {self.options.module}: {rate:.0f} messages/s"
        return (f"{len(self.runners)} tasks internal, {len(self.externals)} external, "
                f"{len(self.import_failures)} failed; {rate:.0f} messages/s")

    async def _heartbeat(self) -> None:
        """WATCHDOG=1 from the loop itself at half the watchdog timeout; STATUS= every 5 s."""
        interval = min(self.notifier.watchdog_interval_s or STATUS_EVERY_S, STATUS_EVERY_S)
        last_status = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            if self.notifier.watchdog_interval_s is not None:
                self.notifier.watchdog()
            if time.monotonic() - last_status >= STATUS_EVERY_S:
                last_status = time.monotonic()
                self.notifier.status(self.status_line())

    def _external_status(self) -> dict[str, Any]:
        out = {}
        for name in sorted(self.externals):
            if self.externals[name] is None:
                out[name] = {"backend": self.backend.name, "state": "activating", "pid": None,
                             "restarts": 0, "where": ""}
                continue
            try:
                process = self.backend.status(name)
            except BackendError as exc:
                out[name] = {"backend": self.backend.name, "error": str(exc)}
                continue
            out[name] = {"backend": self.backend.name, "state": process.state.value,
                         "pid": process.main_pid, "restarts": process.restarts,
                         "where": process.where}
        return out

    def status(self) -> dict[str, Any]:
        """The daemon's figures: pid, uptime, tasks with their counters, failures."""
        return {
            "pid": os.getpid(),
            "started_at": self.started_at,
            "tasks": {name: r.figures() for name, r in sorted(self.runners.items())},
            "externals": self._external_status(),
            "import_failures": dict(self.import_failures),
            "outboxes": {q: o.depth for q, o in list(self._outboxes.items())},
            "rows": self.watch.rows(),
            "queues": [self.watch.monitor.queue_rows[q]
                       for q in sorted(self.watch.monitor.queue_rows)],
            "failsafe": dict(self.watch.marks),
            "monitor": {"interval_s": self.watch.interval_s,
                        "window_s": self.watch.monitor.window_s,
                        "alerts_sent": self.watch.alerts_sent},
            "oob_dropped": self.channels.dropped,
        }

    # -- running ---------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Begin an orderly exit (signal handlers and ``cleanly_exit`` call this)."""
        if self._stop is not None:
            self._stop.set()

    def _schedule_reload(self) -> None:
        if self._reload_handle is not None:
            self._reload_handle.cancel()
        # Coalesce the bursts of events an editor's save makes.
        self._reload_handle = self.loop.call_later(0.05, self.reload_config)

    def _watch_config(self) -> Any:
        path = self.options.config_file
        if path is None:
            return None
        try:
            from inotify_simple import INotify, flags
        except ImportError:  # pragma: no cover - a dependency; SIGHUP still works
            return None
        watcher = INotify(nonblocking=True)
        watcher.add_watch(str(path.parent), flags.CLOSE_WRITE | flags.MOVED_TO | flags.CREATE)
        name = path.name

        def on_events() -> None:
            try:
                events = watcher.read(timeout=0)
            except BlockingIOError:
                return
            if any(event.name == name for event in events):
                self._schedule_reload()

        self.loop.add_reader(watcher.fileno(), on_events)
        return watcher

    async def _serve_control(self, queue) -> None:
        while True:
            message = await queue.get_async()
            try:
                self._on_control(message)
            except Exception as exc:  # the daemon never dies of a control message
                self.channels.emit("error", DAEMON_SOURCE,
                                   f"control message failed: {type(exc).__name__}: {exc}",
                                   traceback=traceback.format_exc())

    async def run(self) -> int:
        """Run until SIGINT/SIGTERM or ``cleanly_exit``; return the exit status."""
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.ready = asyncio.Event()
        self.started_at = time.time()
        opts = self.options
        for path in opts.task_path:
            if str(path) not in sys.path:
                sys.path.insert(0, str(path))
        try:
            self.store = StateStore(opts.state_dir)
            lock_name = f"task-{opts.module}" if opts.module else "multimodule"
            self.lock = InstanceLock(self.store.path, lock_name)
            self.lock.acquire()
            if not opts.module:
                self.watch.load_marks()
                self._publish_options()
        except AlreadyRunning as exc:
            print(f"multimodule: {exc}", file=sys.stderr)
            return 1
        except (ConfigError, OSError) as exc:
            print(f"multimodule: {exc}", file=sys.stderr)
            return 1
        watcher = None
        transit_lock = None
        try:
            if self.transit is None:
                self.transit = Transit(opts.transit_dir)
            # One daemon per control queue (one host per external task) in a transit
            # directory too, or two daemons with different state dirs would share queues.
            transit_lock = InstanceLock(
                self.transit.path,
                f".task-{opts.module}" if opts.module else f".daemon-{opts.control_queue}",
                status_file=False)
            try:
                transit_lock.acquire()
            except AlreadyRunning as exc:
                transit_lock = None
                raise MultiModuleError(str(exc)) from None
            self.channels.send = self._send_out
            self._restore_outboxes()
            if not opts.module:
                self.backend = self._make_backend()
            if not ensure_handler():
                raise MultiModuleError("the daemon must run on the main thread")
            if opts.config_file is not None:
                self.file_config = load_config_file(opts.config_file)
                self._check_startup_config()
            # Watch before loading: a change made while tasks load is not missed.
            watcher = self._watch_config()
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.loop.add_signal_handler(sig, self.request_stop)
            self.loop.add_signal_handler(signal.SIGHUP, self.reload_config)
            if opts.module:
                self._apply_process_limits(opts.module)
                self._load(opts.module)
            else:
                control = self.transit.declare_local(opts.control_queue)
                self.control_receiver = self.transit.receiver(opts.control_queue, control.put)
                self.control_receiver.start()
                self._control_runner = self.loop.create_task(self._serve_control(control))
                if self._load(ROUTER_QNAME) is None:
                    raise MultiModuleError("the Router could not be started (see the error "
                                           "above); nothing can be routed, exiting")
                for name in sorted(self.file_config):
                    if self.watch.in_failsafe(name):
                        self.channels.emit("log", DAEMON_SOURCE,
                                           f"task {name} stays stopped: in failsafe "
                                           f"{self.watch.describe(name)}; "
                                           f"`mmctl unfailsafe {name}` starts it", task=name)
                    elif name not in self.runners:
                        self._load(name)
            self.channels.emit("log", DAEMON_SOURCE, f"running (pid {os.getpid()}): tasks "
                                                     f"{', '.join(sorted(self.runners)) or 'none'}")
            self.ready.set()
            if opts.module:
                self.reporter = FiguresReporter(self, opts.module, opts.monitor_interval_s)
                self.reporter.start()
            else:
                self.watch.start()
            self.notifier.ready(self.status_line())
            heartbeat = self.loop.create_task(self._heartbeat()) if self.notifier.enabled \
                else None
            await self._stop.wait()
            self.notifier.stopping()
            if heartbeat is not None:
                heartbeat.cancel()
            await self._shutdown()
        except MultiModuleError as exc:
            print(f"multimodule: {exc}", file=sys.stderr)
            self.exit_status = 1
        finally:
            if watcher is not None:
                self.loop.remove_reader(watcher.fileno())
                watcher.close()
            if transit_lock is not None:
                transit_lock.release()
            self.lock.release()
            self.channels.close()
        return self.exit_status

    async def _shutdown(self) -> None:
        self.channels.emit("log", DAEMON_SOURCE, "stopping: delivering messages in memory, "
                                                 "saving state")
        await self.watch.stop()
        if self.reporter is not None:
            self.reporter.stop()
        if self._control_runner is not None:
            await self.control_receiver.stop()
            self._control_runner.cancel()
        runners = list(self.runners.values())
        for runner in runners:
            runner.stop_intake()
        for runner in runners:
            await runner.stop_receiver()
        for runner in runners:
            await runner.stop_consumer()
        # Deliver what is in memory; a delivery may emit to another task, so go round
        # until every queue is empty (bounded, in case tasks feed each other for ever).
        for _ in range(100):
            handled = 0
            for runner in list(self.runners.values()):
                handled += await runner.deliver_pending()
            if not handled:
                break
        for runner in list(self.runners.values()):
            await runner.stop()
            # Left in memory by a handler that hung: back to the task's queue, not lost.
            for message in self.transit.undeclare_local(runner.name):
                self._send_out(runner.name, message)
        for outbox in list(self._outboxes.values()):
            if not await self.loop.run_in_executor(None, outbox.wait_empty, OUTBOX_EXIT_WAIT_S):
                self._save_outbox(outbox)
        await self._leave_externals()

    async def _leave_externals(self) -> None:
        """External tasks outlive the daemon unless ``exit_externals`` was asked for."""
        if self.backend is None:
            return
        for start in list(self.starting.values()):
            await asyncio.wait([start])
        if self._exit_externals:
            for name in list(self.externals):
                try:
                    await self.loop.run_in_executor(None, self.backend.stop, name)
                    self.channels.emit("log", DAEMON_SOURCE, f"external task {name} stopped")
                except BackendError as exc:
                    self.channels.emit("error", DAEMON_SOURCE,
                                       f"cannot stop external task {name}: {exc}")
        elif self.externals:
            self.channels.emit("log", DAEMON_SOURCE, "external tasks keep running: "
                                                     + ", ".join(sorted(self.externals)))
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()

    def _outbox_file(self, qname: str) -> Path:
        return self.store.path / f"outbox.{qname}.jsonl"

    def _save_outbox(self, outbox: Outbox) -> None:
        """Keep what a full queue could not take before exit; the next start sends it."""
        bodies = outbox.stop_and_take()
        path = self._outbox_file(outbox.qname)
        try:
            write_atomic(path, b"".join(body + b"\n" for body in bodies))
        except OSError as exc:
            self.channels.emit("error", DAEMON_SOURCE,
                               f"{len(bodies)} messages for full queue {outbox.qname!r} are "
                               f"lost: cannot save them to {path}: {exc}")
            self.exit_status = 1
            return
        self.channels.emit("error", DAEMON_SOURCE,
                           f"queue {outbox.qname!r} stayed full: {len(bodies)} messages kept "
                           f"in {path} and sent when the daemon starts again")

    def _restore_outboxes(self) -> None:
        for path in sorted(self.store.path.glob("outbox.*.jsonl")):
            qname = path.name[len("outbox."):-len(".jsonl")]
            try:
                bodies = [line for line in path.read_bytes().split(b"\n") if line]
            except OSError as exc:
                self.channels.emit("error", DAEMON_SOURCE, f"cannot read {path}: {exc}")
                continue
            outbox = Outbox(self, qname, kept_file=path)  # removed once all are sent
            for body in bodies:
                outbox.put(body)
            self._outboxes[qname] = outbox
            outbox.start()
            self.channels.emit("log", DAEMON_SOURCE,
                               f"sending {len(bodies)} messages kept for queue {qname!r} "
                               "at the last exit")
