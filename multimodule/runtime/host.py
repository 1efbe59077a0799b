"""What every multimodule process that hosts tasks has: the control daemon
(:mod:`multimodule.runtime.daemon`) and the process of one external task
(:mod:`multimodule.runtime.task_process`) both derive from :class:`HostProcess`.

It owns the state directory and its lock, the transit and its lock, the overflow for full
System V queues, the registry of the tasks running here, the handler watchdog
(:mod:`multimodule.runtime.watchdog`), the config, signals, the systemd notifications, and a
stop bounded in time. Its :meth:`HostProcess.send` is where every send
of a task here goes: in memory to a task in this process, else (after the daemon's chance to
load a task of that name) to the System V queue, without ever blocking the loop.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
import threading
import time
from typing import Any

from multimodule.config import DaemonOptions
from multimodule.errors import AlreadyRunning, ConfigError, MultiModuleError, StateError
from multimodule.oob import Channels, parse_spec
from multimodule.runtime.configs import ConfigWatcher, TaskConfigs
from multimodule.runtime.control import CONTROL_KEY
from multimodule.runtime.delivery import Delivery
from multimodule.runtime.leftovers import Leftovers
from multimodule.runtime.notify import Notifier
from multimodule.runtime.registry import TaskRegistry
from multimodule.runtime.watchdog import HandlerWatchdog
from multimodule.state import InstanceLock, StateStore, claim_temp_files
from multimodule.transit import Transit
from multimodule.transit.lowlevel import Overflow, addressed, ensure_handler

#: Name used for the process's own records and messages.
SOURCE = "MultiModule"

#: Seconds between two STATUS= lines sent to systemd.
STATUS_EVERY_S = 5.0

#: Seconds a stop may take in all, well inside the units' ``TimeoutStopSec=30``: handlers in
#: progress, delivering what is in memory, and waiting for room in full queues share it.
STOP_BUDGET_S = 20.0

#: Of :data:`STOP_BUDGET_S`, at most this long is spent waiting for room in full queues
#: before what they could not take is kept in files.
OVERFLOW_EXIT_WAIT_S = 5.0

#: Seconds a failsafe request sent to the daemon (by an external task's process) stays valid.
FAILSAFE_REQUEST_TTL_S = 60.0


class HostProcess:
    """A process hosting tasks; see the module docstring. :meth:`run` returns the exit
    status. ``transit`` and ``channels`` may be passed in (tests); otherwise they are made
    from ``options``.

    Subclasses say which locks they take and which tasks they start (:meth:`lock_names`,
    :meth:`start_tasks`), how a config change applies (:meth:`apply_file`), and what they stop
    before and after the tasks (:meth:`stop_services`, :meth:`after_tasks`).
    """

    #: Whether this process holds each of its stateful tasks' ``task-NAME.lock`` (the daemon
    #: does; a task's own process holds its one as its state lock already).
    locks_tasks = True

    def __init__(self, options: DaemonOptions, *, transit: Transit | None = None,
                 channels: Channels | None = None):
        self.options = options
        self.transit = transit
        self.channels = channels or Channels(parse_spec(options.oob), options.debug)
        self.configs = TaskConfigs(options.config_file)
        self.notifier = Notifier()
        self.watchdog = HandlerWatchdog(self.channels, options.slow_handler_s)
        self.store: StateStore | None = None
        self.leftovers: Leftovers | None = None
        self.overflow: Overflow | None = None
        self.delivery: Delivery | None = None
        self.registry: TaskRegistry | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        #: Set once the configured tasks are loaded.
        self.ready: asyncio.Event | None = None
        self.started_at: float | None = None
        self.exit_status = 0
        self.last_config_error: str | None = None
        self._stop: asyncio.Event | None = None
        self._lock: InstanceLock | None = None
        self._rate_mark = (time.monotonic(), 0)

    # -- sending ---------------------------------------------------------------------------

    def send(self, qname: str, message: dict[str, Any], *, owned: bool = False,
             origin: str | None = None, destination: str | None = None, **meta: Any) -> None:
        """Send for a task: in memory to a task here (:meth:`load_on_demand` may load one),
        else to the System V queue without blocking the loop. ``owned``: see
        :meth:`Task.send`; ``origin``: the sending task (its checkpoint waits while the
        overflow holds what it sent); ``meta``: extra ``.ipc_transit_meta`` keys (a derived
        ``id``). A task here that is far behind gets its messages through its System V queue
        (see :meth:`Delivery.spilling`), so that memory stays bounded. ``destination``:
        another host's name: the message goes to the ``Bridge`` task's queue, marked for queue
        ``qname`` on that host (see ``transit._address``). Raises the transit's usage
        errors."""
        transit = self.transit
        if destination is not None:
            qname, meta = addressed(qname, destination, meta)
        if transit.is_local(qname) or self.load_on_demand(qname):
            delivery = self.delivery
            if not delivery.spilling(qname):
                if owned:
                    transit.send_owned(qname, message, **meta)
                else:
                    transit.send(qname, message, **meta)
                if origin is not None and delivery.behind(qname):
                    delivery.hold_back(origin, qname)  # bounded memory: see Delivery
                return
        self.overflow.send(qname, message, origin=origin, **meta)

    def send_out(self, qname: str, message: dict[str, Any]) -> None:
        """To the System V queue ``qname``, never blocking (held in order while it is full)."""
        self.overflow.send(qname, message)

    def load_on_demand(self, qname: str) -> bool:
        """Whether a task named ``qname`` now runs here (the daemon loads one on first use)."""
        return False

    def failsafe_hung(self, name: str, reason: str, **fields: Any) -> bool:
        """Task ``name`` here keeps hanging its handlers: put it in failsafe (see
        :data:`~multimodule.runtime.interfaces.FailsafeRequest`). Here (an external task's
        process, whose failsafe is its daemon's business): ask the daemon on its control
        queue (``mmctl failsafe``'s message, valid for :data:`FAILSAFE_REQUEST_TTL_S`); the
        daemon stops this process. Returns ``False``: delivery goes on until then."""
        request = {"failsafe": name, "reason": reason,
                   "expires_at": time.time() + FAILSAFE_REQUEST_TTL_S}
        try:
            self.send_out(self.options.control_queue, {CONTROL_KEY: request})
        except MultiModuleError as exc:
            self.channels.emit("error", SOURCE, f"task {name}: {reason}; cannot ask the daemon "
                                                f"to put it in failsafe: {exc}", task=name)
            return False
        self.channels.emit("log", SOURCE, f"task {name}: {reason}; asked the daemon to put it "
                                          "in failsafe", task=name)
        return False

    @property
    def runners(self) -> dict:
        """Task name -> :class:`~multimodule.runtime.runner.TaskRunner` running here."""
        return self.registry.runners if self.registry is not None else {}

    # -- what subclasses provide -----------------------------------------------------------

    def lock_names(self) -> tuple[str, str]:
        """The names of the state directory's lock and of the transit directory's lock."""
        raise NotImplementedError

    def prepare(self) -> None:
        """After the state directory is locked, before anything else (may raise
        :class:`ConfigError`)."""

    def check_startup_config(self) -> None:
        """Refuse (raise :class:`ConfigError`) a config this process cannot start with."""

    async def start_tasks(self) -> None:
        """Start the tasks (raise :class:`MultiModuleError` to exit 1)."""
        raise NotImplementedError

    def after_ready(self) -> None:
        """Services that start once the tasks run."""

    def apply_file(self, before: dict[str, dict[str, Any]]) -> None:
        """Apply the config file's new tables (``self.configs.file``); ``before``: what was in
        force."""

    async def stop_services(self, deadline: float) -> None:
        """Stop what must stop before the tasks (the control queue, the monitor), waiting
        for nothing past ``deadline`` (``time.monotonic()``)."""

    async def after_tasks(self, deadline: float) -> None:
        """What is left to do once the tasks have stopped (bounded by ``deadline``)."""

    def status_line(self) -> str:
        """One line for systemd's ``STATUS=``."""
        return f"{self.message_rate():.0f} messages/s"

    # -- config ----------------------------------------------------------------------------

    def reload(self) -> str | None:
        """Re-read the config file and apply what changed; refuse (keep the old) if invalid.
        Returns why it was refused. Under systemd, ``RELOADING=1`` before and ``READY=1``
        after, either way. (SIGHUP, the file watcher and ``mmctl reload`` come here.)"""
        self.notifier.reloading()
        try:
            if self.configs.path is None:
                return None
            try:
                new = self.configs.read()
                self.configs.check(self.relevant(new), self.registry.class_of,
                                   str(self.configs.path))
            except ConfigError as exc:
                self.last_config_error = (f"config refused, the previous config stays in "
                                          f"force: {exc}")
                self.channels.emit("error", SOURCE, self.last_config_error)
                return self.last_config_error
            before = self.configs.replace_file(new)
            self.registry.not_tasks.clear()
            self.registry.failures.clear()
            self.apply_file(before)
            return None
        finally:
            self.notifier.ready(self.status_line())

    def relevant(self, tables: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """The tables of ``tables`` this process runs tasks for (all, for the daemon)."""
        return tables

    # -- running ---------------------------------------------------------------------------

    def request_stop(self, exit_externals: bool = False) -> None:
        """Begin an orderly exit (signal handlers and ``cleanly_exit`` call this)."""
        if self._stop is not None:
            self._stop.set()

    def message_rate(self) -> float:
        """Messages handled per second since the previous call."""
        handled = sum(r.task.counters.messages_in for r in self.runners.values())
        now = time.monotonic()
        then, before = self._rate_mark
        self._rate_mark = (now, handled)
        return (handled - before) / (now - then) if now > then else 0.0

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

    def _report(self, channel: str, text: str) -> None:
        # The overflow reports from its threads: hand the record to the loop.
        try:
            self.loop.call_soon_threadsafe(self.channels.emit, channel, SOURCE, text)
        except RuntimeError:  # the loop is closed: we are exiting
            pass

    def _setup(self) -> None:
        opts = self.options
        for path in opts.task_path:
            if str(path) not in sys.path:
                sys.path.insert(0, str(path))
        self.store = StateStore(opts.state_dir)
        state_lock, transit_lock = self.lock_names()
        claim_temp_files(state_lock)  # this process's temporary files carry its lock's name
        lock = InstanceLock(self.store.path, state_lock)
        lock.acquire()
        self._lock = lock
        self.leftovers = Leftovers(self.store.path, lambda channel, text, **fields:
                                   self.channels.emit(channel, SOURCE, text, **fields))
        self.leftovers.remove_interrupted_writes(state_lock)
        self.prepare()

    async def run(self) -> int:
        """Run until SIGINT/SIGTERM or ``cleanly_exit``; return the exit status."""
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.ready = asyncio.Event()
        self.started_at = time.time()
        try:
            self._setup()
        except (StateError, ConfigError, OSError) as exc:  # AlreadyRunning included
            print(f"multimodule: {exc}", file=sys.stderr)
            if self._lock is not None:
                self._lock.release()
            return 1
        watcher = transit_lock = None
        try:
            if self.transit is None:
                self.transit = Transit(self.options.transit_dir)
            # One daemon per control queue (one host per external task) in a transit
            # directory too, or two daemons with different state dirs would share queues.
            transit_lock = InstanceLock(self.transit.path, self.lock_names()[1],
                                        status_file=False)
            try:
                transit_lock.acquire()
            except AlreadyRunning as exc:
                transit_lock = None
                raise MultiModuleError(str(exc)) from None
            self.delivery = Delivery(
                self.loop, self.store, enabled=self.options.journal,
                fsync=self.options.journal_fsync,
                report=lambda text: self.channels.emit("error", SOURCE, text))
            self.overflow = Overflow(self.transit, self._report,
                                     max_bytes=self.options.outbox_max_bytes,
                                     on_room=self.delivery.on_room)
            self.delivery.overflow = self.overflow
            # Both the daemon and an external task's process: what one message may make a
            # task create is bounded in either.
            self.overflow.limit_creations(self.options.queue_creation_rate,
                                          self.options.queue_creation_burst)
            self.channels.send = self.send_out
            self.registry = TaskRegistry(
                transit=self.transit, channels=self.channels, store=self.store,
                send=self.send, send_out=self.send_out, prefixes=self.options.prefixes,
                task_path=self.options.task_path, slow_handler_s=self.options.slow_handler_s,
                delivery=self.delivery, watchdog=self.watchdog, failsafe=self.failsafe_hung,
                task_locks=self.locks_tasks)
            self.leftovers.resend_kept(self.overflow)
            on_main_thread = threading.current_thread() is threading.main_thread()
            if not on_main_thread or not ensure_handler():
                raise MultiModuleError("the daemon must run on the main thread")
            self.watchdog.start()
            self.configs.file = self.configs.read()
            self.check_startup_config()
            if self.configs.path is not None:  # watch before loading: no change is missed
                watcher = ConfigWatcher(self.configs.path, self.reload)
                watcher.start()
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.loop.add_signal_handler(sig, self.request_stop)
            self.loop.add_signal_handler(signal.SIGHUP, self.reload)
            await self.start_tasks()
            self.channels.emit("log", SOURCE, f"running (pid {os.getpid()}): tasks "
                                              f"{', '.join(sorted(self.runners)) or 'none'}")
            self.ready.set()
            # What start-up made (modules, tasks, configs) lives as long as the process: out
            # of the collector's reach, a full collection no longer walks it (1,000 tasks:
            # 90 ms per full collection before, 0 after; gc.freeze's documented use).
            gc.collect()
            gc.freeze()
            self.after_ready()
            self.notifier.ready(self.status_line())
            heartbeat = self.loop.create_task(self._heartbeat()) if self.notifier.enabled \
                else None
            await self._stop.wait()
            self.notifier.stopping()
            if heartbeat is not None:
                heartbeat.cancel()
            await self.shutdown()
        except MultiModuleError as exc:  # ConfigError included
            print(f"multimodule: {exc}", file=sys.stderr)
            self.exit_status = 1
            if self.registry is not None:  # what did start stops in order
                deadline = time.monotonic() + STOP_BUDGET_S
                await self.stop_services(deadline)
                await self.registry.stop_all(deadline)
        finally:
            gc.unfreeze()
            if watcher is not None:
                watcher.close()
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                self.loop.remove_signal_handler(sig)
            self.watchdog.close()
            if transit_lock is not None:
                transit_lock.release()
            self._lock.release()
            self.channels.close()
        return self.exit_status

    async def shutdown(self) -> None:
        """The orderly stop, bounded by :data:`STOP_BUDGET_S` in all: services first, then
        every task at once (timers, receivers, handlers in progress, what is in memory, state),
        then full queues get what time is left, and what they could not take is kept in
        ``STATE_DIR/outbox.QNAME.jsonl`` for the next start."""
        deadline = time.monotonic() + STOP_BUDGET_S
        self.channels.emit("log", SOURCE, "stopping: delivering messages in memory, saving "
                                          "state")
        await self.stop_services(deadline)
        stopped = await self.registry.stop_all(deadline)
        wait = min(OVERFLOW_EXIT_WAIT_S, max(0.0, deadline - time.monotonic()))
        drained = await self.overflow.drain(wait)
        for runner in stopped:
            if runner.checkpoint_behind:
                runner.checkpoint()  # those whose sends were held: now sent, or not at all
        if not drained:
            # With journals, what tasks sent is made again from their journals (their
            # checkpoints are from before it): only what the process itself sent is kept.
            journaled = self.delivery.enabled
            held = {qname: [body for body, origin in items if origin is None or not journaled]
                    for qname, items in self.overflow.stop_and_take().items()}
            if not self.leftovers.keep({q: bodies for q, bodies in held.items() if bodies}):
                self.exit_status = 1
        await self.after_tasks(deadline)
