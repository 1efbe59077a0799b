"""The internal tasks of one process: their runners, what failed to load and why, and the
names known not to be tasks.

:class:`TaskRegistry` finds a task's class (:mod:`multimodule.runtime.loader`), starts a
:class:`~multimodule.runtime.runner.TaskRunner` for it (with its journal, when journals are on),
and unloads it again: what was still in its memory is in its journal, delivered first wherever
the task runs next (without journals, it goes back to its System V queue). Deciding
*whether* a task runs here (its config, failsafe, external tasks) is the host's job, not the
registry's.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

from pydantic import BaseModel

from multimodule.errors import AlreadyRunning, StateError, TaskImportFailed, TaskNotFound
from multimodule.oob import Channels
from multimodule.runtime.delivery import Delivery
from multimodule.runtime.interfaces import FailsafeRequest, Send
from multimodule.runtime.loader import find_task_class
from multimodule.runtime.runner import STOP_GRACE_S, TaskRunner
from multimodule.runtime.watchdog import HandlerWatchdog
from multimodule.state import InstanceLock, StateStore
from multimodule.task import Task

#: Name used for the host's own records.
SOURCE = "MultiModule"

#: ``send_out(qname, message)``: to the System V queue, never blocking (the overflow).
SendOut = Callable[[str, dict[str, Any]], None]


class TaskRegistry:
    """Runners by task name, plus ``failures`` (name -> why it could not be loaded) and
    ``not_tasks`` (names a message was sent to that no task class answers to).

    ``send``: the tasks' send; ``send_out``: to a System V queue without blocking (what a
    stopped task held goes back there). ``prefixes``, ``task_path``: where task classes are
    found (see :func:`~multimodule.runtime.loader.find_task_class`). ``delivery``: the
    journals and backpressure the runners share. ``slow_handler_s``, ``watchdog``,
    ``failsafe``: for the runners (see :class:`~multimodule.runtime.runner.TaskRunner`).
    ``task_locks``: hold ``task-NAME.lock`` (the lock a task's own process takes) for each
    stateful task running here, so that no second copy of it runs elsewhere at once (the
    daemon; an external task's process holds it as its own lock already).
    """

    def __init__(self, *, transit: Any, channels: Channels, store: StateStore, send: Send,
                 send_out: SendOut, prefixes: Sequence[str], task_path: Sequence[Path],
                 slow_handler_s: float, delivery: Delivery, watchdog: HandlerWatchdog,
                 failsafe: FailsafeRequest | None = None, task_locks: bool = False):
        self.delivery = delivery
        self.task_locks = task_locks
        self._locks: dict[str, InstanceLock] = {}
        self.transit = transit
        self.channels = channels
        self.store = store
        self.send = send
        self.send_out = send_out
        self.prefixes = list(prefixes)
        self.task_path = list(task_path)
        self.slow_handler_s = slow_handler_s
        self.watchdog = watchdog
        self.failsafe = failsafe
        self.runners: dict[str, TaskRunner] = {}
        self.failures: dict[str, str] = {}
        self.not_tasks: set[str] = set()

    def __contains__(self, name: object) -> bool:
        return name in self.runners

    def get(self, name: str) -> TaskRunner | None:
        """The runner of ``name``, if loaded here."""
        return self.runners.get(name)

    # -- classes ---------------------------------------------------------------------------

    def find(self, name: str, *, on_demand: bool = False) -> type[Task] | None:
        """Task ``name``'s class, found the one way (see :meth:`lookup`), or ``None``:
        recorded in :attr:`not_tasks` when looked for on first use (a send to a name no task
        answers to), else reported and recorded in :attr:`failures`."""
        try:
            return find_task_class(name, self.prefixes, self.task_path)
        except TaskNotFound as exc:
            if on_demand:
                self.not_tasks.add(name)
            else:
                self.fail(name, f"cannot load task {name}: {exc}")
        except TaskImportFailed as exc:
            self.fail(name, str(exc), traceback=exc.details)
        return None

    def lookup(self, name: str) -> type[Task]:
        """Task ``name``'s class: the loaded one, else found the one way every path finds one
        (the built-ins, the ``prefixes``; a top-level module only under ``task_path``: no
        name, in the config, a control message or a send, imports any other module).
        Raises :class:`TaskNotFound` or :class:`TaskImportFailed`; records nothing."""
        runner = self.runners.get(name)
        if runner is not None:
            return runner.cls
        return find_task_class(name, self.prefixes, self.task_path)

    def class_of(self, name: str) -> type[Task] | None:
        """Task ``name``'s class to check a config against (see :meth:`lookup`); ``None``
        if there is none (nothing is recorded)."""
        try:
            return self.lookup(name)
        except (TaskNotFound, TaskImportFailed):
            return None

    def fail(self, name: str, why: str, **fields: Any) -> None:
        """Record and report that task ``name`` could not be loaded."""
        self.failures[name] = why
        self.channels.emit("error", SOURCE, why, task=name, **fields)

    # -- loading and unloading -------------------------------------------------------------

    def start(self, name: str, cls: type[Task], config: dict[str, Any],
              settings: BaseModel | None, *, strict: bool = False) -> TaskRunner | None:
        """Construct and start task ``name`` (state restored, config applied, delivery
        started); ``None`` if it raised (reported, recorded in :attr:`failures`); with
        ``strict``, also if its ``set_config`` raised (then nothing of it was delivered or
        saved: its messages are still in its journal)."""
        runner = None
        if self.task_locks and cls.is_stateful:
            lock = InstanceLock(self.store.path, f"task-{name}", status_file=False)
            try:
                lock.acquire()
            except (AlreadyRunning, StateError) as exc:
                self.fail(name, f"task {name} not loaded here: {exc}")
                return None
            self._locks[name] = lock
        try:
            runner = TaskRunner(name, cls, transit=self.transit, send=self.send,
                                channels=self.channels, store=self.store,
                                slow_handler_s=self.slow_handler_s,
                                journal=self.delivery.journal_for(name), guard=self.delivery,
                                watchdog=self.watchdog, failsafe=self.failsafe)
            self.runners[name] = runner
            runner.start(config, settings, strict=strict)
        except Exception as exc:
            self.runners.pop(name, None)
            self.transit.undeclare_local(name)
            if runner is not None and runner.journal is not None:
                runner.close_journal()
                self.delivery.forget(runner.journal)
            self._release_lock(name)
            self.fail(name, f"task {name} failed to start: {type(exc).__name__}: {exc}",
                      traceback=traceback.format_exc())
            return None
        self.failures.pop(name, None)
        self.channels.emit("debug", SOURCE, f"loaded task {name} from {cls.__module__}")
        return runner

    async def unload(self, name: str) -> None:
        """Stop task ``name`` (the message in hand finishes, what is in memory is delivered,
        its checkpoint saved); what reached its memory meanwhile is in its journal (or, with
        journals off, goes back to its System V queue, behind which later sends queue up).
        Nothing is lost."""
        runner = self.runners[name]
        await runner.stop()
        self.release(name)

    def release(self, name: str) -> None:
        """Forget ``name``'s runner. Its in-memory leftovers are in its journal, past its
        checkpoint (delivered first wherever it starts next); without a journal they go to
        its System V queue."""
        runner = self.runners.pop(name, None)
        self.delivery.forget_task(name)
        self._release_lock(name)
        leftovers = self.transit.undeclare_local(name)
        if runner is not None and runner.journal is not None:
            runner.close_journal()
            self.delivery.forget(runner.journal)
            return
        for message in leftovers:
            self.send_out(name, message)

    def _release_lock(self, name: str) -> None:
        lock = self._locks.pop(name, None)
        if lock is not None:
            lock.release()

    async def stop_all(self, deadline: float) -> list[TaskRunner]:
        """Stop every runner at once, bounded by ``deadline`` (``time.monotonic()``): timers
        stop, receivers stop, handlers in progress finish (or are cancelled at the deadline),
        what is in memory is delivered (a delivery may send to another task here, so rounds
        go on until nothing is left), state is saved, and what a stuck task still holds goes
        back to its System V queue (or is in its journal). Returns the runners stopped."""
        runners = list(self.runners.values())
        for runner in runners:
            runner.stop_intake()
        await asyncio.gather(*(runner.stop_receiver() for runner in runners))

        def left() -> float:
            return max(0.0, min(STOP_GRACE_S, deadline - time.monotonic()))

        await asyncio.gather(*(runner.stop_consumer(left()) for runner in runners))
        for _ in range(100):
            handled = await asyncio.gather(*(runner.deliver_pending(left())
                                             for runner in runners))
            if not any(handled) or time.monotonic() >= deadline:
                break
        await asyncio.gather(*(runner.wait_schedules(left()) for runner in runners))
        for runner in runners:
            runner.finish()
            self.release(runner.name)
        return runners
