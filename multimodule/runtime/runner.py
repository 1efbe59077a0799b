"""Running one task inside an asyncio event loop: in-order delivery, schedules, state.

Each task has an in-memory queue (declared local in the process's transit) fed by senders in
this process and by an :class:`~multimodule.transit.lowlevel.AsyncReceiver` for the System V
queue of the same name. :class:`~multimodule.runtime.consumer.Consumer` delivers it in order
and runs the timers' ticks (:class:`~multimodule.runtime.schedule.Schedules`), each call under
the handler watchdog; :class:`~multimodule.runtime.progress.Progress` keeps the task's position
in its input and its checkpoint. :class:`TaskRunner` puts them together: the task's life cycle,
and the :class:`~multimodule.task.TaskHost` the task sends through.
"""

from __future__ import annotations

import asyncio
import re
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel

from multimodule.config import DEFAULT_HANDLER_TIMEOUT_S, DEFAULT_SAVE_STATE_S
from multimodule.errors import BadMessage, StateError, TaskStartFailed, TransitError
from multimodule.journal import Journal
from multimodule.oob import Channels
from multimodule.runtime.calls import TASK_FAILURES, cause, derived_id
from multimodule.runtime.checkpoint_timer import CheckpointTimer
from multimodule.runtime.consumer import Consumer
from multimodule.runtime.interfaces import DeliveryGuard, FailsafeRequest, Send
from multimodule.runtime.progress import Progress
from multimodule.runtime.schedule import Schedules
from multimodule.runtime.watchdog import HandlerWatchdog
from multimodule.state import StateStore
from multimodule.task import Task, Work
from multimodule.transit import META_KEY
from multimodule.transit.lowlevel import make_meta

#: What :meth:`TaskRunner.private_path` accepts as a file name suffix.
_SUFFIX = re.compile(r"[A-Za-z0-9_-]{1,64}")

#: Seconds ``stop`` waits for a handler in progress before cancelling it.
STOP_GRACE_S = 10.0


class TaskRunner:
    """Hosts one task instance on the event loop; the task's :class:`~multimodule.task.TaskHost`.

    ``transit``: where the task's in-memory queue is declared and its System V receiver made
    (``receive_sysv=False`` only in tests). ``send``: how the task's sends leave it.
    ``channels``: the out-of-band channels. ``store``: where the task's checkpoint lives.
    ``slow_handler_s``: seconds a handler may hold the loop before it is reported after it
    returns (the watchdog reports it while it runs). ``watchdog``: the process's handler
    watchdog. ``failsafe``: see :data:`~multimodule.runtime.interfaces.FailsafeRequest`
    (``None``: cut-offs are only reported). ``journal``: the task's input
    journal (``None``: journals are off, and a stateless task keeps no checkpoint); ``guard``:
    what the host tells it about the rest of the process (journals to write, backpressure;
    see :class:`~multimodule.runtime.interfaces.DeliveryGuard`).
    """

    def __init__(self, name: str, cls: type[Task], *, transit: Any, send: Send,
                 channels: Channels, store: StateStore | None, slow_handler_s: float,
                 watchdog: HandlerWatchdog, failsafe: FailsafeRequest | None = None,
                 receive_sysv: bool = True, journal: Journal | None = None,
                 guard: DeliveryGuard | None = None):
        self.name = name
        self.cls = cls
        self.store = store
        self.channels = channels
        self._send = send
        self.slow_handler_s = slow_handler_s
        self.journal = journal
        self.guard = guard
        self.watchdog = watchdog
        self.failsafe = failsafe
        self.task = cls()
        self.task.attach(name, self)
        self.queue = transit.declare_local(name)
        self.receiver = (transit.receiver(name, self._received if journal else self.queue.put,
                                          on_error=self._on_transit_error,
                                          backlog=self.queue.__len__,
                                          commit=self._commit_received if journal else None)
                         if receive_sysv else None)
        self.progress = Progress(name, stateful=cls.is_stateful, store=store, journal=journal,
                                 guard=guard, report_error=self.report_error,
                                 log=lambda text: channels.emit("log", name, text))
        self.consumer = Consumer(name, self.task, self.queue, receiver=self.receiver,
                                 guard=guard, progress=self.progress, watchdog=watchdog,
                                 channels=channels, slow_handler_s=slow_handler_s,
                                 failsafe=failsafe, report_error=self.report_error)
        self.schedules = Schedules(name, self.consumer.run_work)
        self._saver: Any = None
        self._barrier: asyncio.Task | None = None
        self.started_at = time.time()
        self.last_error: str | None = None
        self._told_stopping = self._told_stopped = False

    @property
    def idle(self) -> bool:
        """Nothing to do now: no message waiting or in hand, no scheduled work running."""
        return self.consumer.cancellable and not self.queue and not self.schedules.busy

    @property
    def stuck(self) -> bool:
        """See :attr:`~multimodule.runtime.consumer.Consumer.stuck`."""
        return self.consumer.stuck

    # -- life cycle ------------------------------------------------------------------------

    def start(self, config: dict[str, Any], settings: BaseModel | None, *,
              strict: bool = False) -> None:
        """Restore the checkpoint (state, position, dedupe window), put what the journal holds
        past it back on the queue ahead of anything new, apply ``config``, start delivery
        (call with the loop running). With ``strict``, a ``set_config`` that raises is
        raised again (:class:`~multimodule.errors.TaskStartFailed`) before anything is
        delivered."""
        progress = self.progress
        state = progress.restore()
        if state is not None:
            self.task.state = state
        if self.journal is not None:
            again = progress.recover()
            if self.receiver is not None:
                self.receiver.skip_ids = self.journal.last_ids
            self.queue.put_many(again)  # ahead of anything new, and not journaled twice
            self.journal.on_dirty = self.guard.journal_written
            self.queue.recorder = self.journal.append
        if not self.apply_config(config, settings) and strict:
            raise TaskStartFailed(f"set_config raised: {self.last_error}")
        loop = asyncio.get_running_loop()
        self.consumer.start()
        if self.receiver is not None:
            self.receiver.start()
            if self.guard is not None:
                self.guard.spill_path(self.name, self.queue, self.receiver.queue)
        if progress.kept:
            self._saver = CheckpointTimer.of(loop).add(self)

    def _received(self, message: dict[str, Any]) -> None:
        # From the System V queue: a foreign sender's message gets its id here (what this
        # process sends has one already), then it joins the queue (and the journal).
        meta = message.get(META_KEY)
        if meta.__class__ is not dict or meta.get("id").__class__ is not str:
            message[META_KEY] = make_meta({})
        self.queue.put(message)

    def _commit_received(self) -> None:
        # A batch from the System V queue is on the queue (journaled): write it before the
        # receiver takes it off the kernel queue.
        self.journal.flush()

    def apply_config(self, config: dict[str, Any], settings: BaseModel | None) -> bool:
        """Give the task its (validated) config; schedules pick up new ``intervals``, the
        dedupe window its new size. Returns whether the task's ``set_config`` took it
        (what it raised is reported)."""
        self.schedules.set_intervals(config.get("intervals") or {})
        self.progress.set_window(config.get("dedupe", False))
        self.consumer.handler_timeout_s = float(config.get("handler_timeout_s",
                                                           DEFAULT_HANDLER_TIMEOUT_S))
        self.task.config = config
        self.task.settings = settings
        try:
            self.task.set_config(config)
        except TASK_FAILURES as exc:
            self.report_error(f"set_config raised {type(exc).__name__}: {exc}",
                              traceback=traceback.format_exc())
            return False
        return True

    # -- TaskHost --------------------------------------------------------------------------

    def send(self, qname: str, message: dict[str, Any], *, owned: bool = False,
             destination: str | None = None) -> None:
        """The task's sends (see :meth:`Task.send`): a message without an id of its own gets
        one derived from what is being handled (see :func:`~multimodule.runtime.calls.derived_id`)."""
        meta = message.get(META_KEY)
        handling = cause.get()
        if handling is not None and (meta.__class__ is not dict
                                     or meta.get("id").__class__ is not str):
            index = handling[1]
            handling[1] = index + 1
            self._send(qname, message, owned=owned, origin=self.name, destination=destination,
                       id=derived_id(handling[0], index))
        else:
            self._send(qname, message, owned=owned, origin=self.name, destination=destination)

    async def wait_sent(self, written: Callable[[], None] | None = None) -> None:
        """See :meth:`Task.wait_sent`: journals written now, then wait while the overflow
        holds what this task sent."""
        guard = self.guard
        if guard is None:
            return
        guard.flush_journals()
        if written is not None:
            written()
        if self.sends_held():
            await guard.wait_released(self.name)

    def sends_held(self) -> bool:
        """See :meth:`Task.sends_held`."""
        return self.guard is not None and self.guard.holds_from(self.name)

    async def drain(self) -> None:
        """See :meth:`Task.drain`."""
        guard = self.guard
        if guard is not None and guard.blocked(self.name):
            await guard.wait_unblocked(self.name)

    def recur(self, task: Task, name: str, interval: float, work: Work) -> None:
        """See :meth:`~multimodule.runtime.schedule.Schedules.recur`."""
        self.schedules.recur(name, interval, work)

    def set_stalled(self, stalled: bool) -> None:
        """See :meth:`Task.set_stalled`."""
        if self.guard is not None:
            self.guard.stall(self.name, stalled)

    def private_path(self, suffix: str) -> Path | None:
        """See :meth:`Task.private_path`."""
        if not _SUFFIX.fullmatch(suffix):
            raise ValueError(f"private_path suffix must be letters, digits, '-' and '_', "
                             f"not {suffix!r}")
        return None if self.store is None else self.store.path / f"{self.name}.{suffix}"

    # -- stopping --------------------------------------------------------------------------

    def stop_intake(self) -> None:
        """Cancel schedules (no new work is generated by timers; work running finishes) and
        tell the task (:meth:`Task.stopping`), once."""
        self.schedules.cancel()
        if not self._told_stopping:
            self._told_stopping = True
            self._tell("stopping")

    def _tell(self, hook: str) -> None:
        """Call the task's life-cycle hook ``hook`` (:meth:`Task.stopping`,
        :meth:`Task.stopped`); what it raises is reported."""
        try:
            getattr(self.task, hook)()
        except TASK_FAILURES as exc:
            self.report_error(f"{hook}() raised {type(exc).__name__}: {exc}",
                              traceback=traceback.format_exc())

    async def wait_schedules(self, grace_s: float = STOP_GRACE_S) -> None:
        """Wait (up to ``grace_s`` seconds) for the scheduled work still running after
        :meth:`stop_intake`; work still running then is cancelled and reported."""
        for name in await self.schedules.wait(grace_s):
            self.report_error(f"scheduled work {name!r} still busy after {grace_s:g} s; "
                              "cancelled")

    async def stop_receiver(self) -> None:
        """Stop taking from the System V queue; messages already taken stay in memory."""
        if self.receiver is not None:
            await self.receiver.stop()

    async def stop(self) -> None:
        """Stop delivery after the message in progress, deliver what is in memory, save."""
        self.stop_intake()
        await self.stop_receiver()
        await self.stop_consumer()
        await self.deliver_pending()
        await self.wait_schedules()
        self.finish()

    def finish(self) -> None:
        """Stop saving periodically and take the checkpoint one last time (if messages it
        sent still wait in the overflow, the host takes it once they are sent)."""
        if self._saver is not None:
            self._saver.cancel()
        if self._barrier is not None:
            self._barrier.cancel()
        if not self._told_stopped:
            self._told_stopped = True
            self._tell("stopped")
        self.checkpoint()

    async def stop_consumer(self, grace_s: float = STOP_GRACE_S) -> None:
        """See :meth:`~multimodule.runtime.consumer.Consumer.stop`."""
        await self.consumer.stop(grace_s)

    async def deliver_pending(self, grace_s: float = STOP_GRACE_S) -> int:
        """See :meth:`~multimodule.runtime.consumer.Consumer.deliver_pending`."""
        return await self.consumer.deliver_pending(grace_s)

    # -- state -----------------------------------------------------------------------------

    @property
    def save_interval(self) -> float:
        """Seconds between periodic checkpoints (the config's ``intervals.save_state``)."""
        return float(self.schedules.intervals.get("save_state", DEFAULT_SAVE_STATE_S))

    def periodic_checkpoint(self) -> None:
        """The checkpoint taken every ``save_state`` seconds (called by the process's
        :class:`~multimodule.runtime.checkpoint_timer.CheckpointTimer`). If messages it sent
        wait in the overflow (a full queue downstream), a steady stream could put it off for
        ever: then the task takes no input until they are sent, and checkpoints (a barrier,
        at most one at a time)."""
        if self.checkpoint() or self.guard is None or not self.guard.holds_from(self.name):
            return
        if self._barrier is None or self._barrier.done():
            self._barrier = asyncio.get_running_loop().create_task(
                self._checkpoint_when_released(), name=f"checkpoint:{self.name}")

    async def _checkpoint_when_released(self) -> None:
        # (An async handler still awaiting then puts it off to the next interval.)
        intake = self.consumer.intake
        intake.clear()
        try:
            await self.guard.wait_released(self.name)
            self.checkpoint()
        finally:
            intake.set()

    @property
    def in_progress(self) -> bool:
        """Whether a handler or a scheduled work has begun and not finished (a checkpoint now
        would hold part of its effect)."""
        return self.consumer.handling or self.schedules.busy

    def checkpoint(self) -> bool:
        """Save the task's checkpoint now if it changed (see
        :meth:`~multimodule.runtime.progress.Progress.take`); return whether it was saved.
        Never while a handler or scheduled work is in progress."""
        if not self.progress.kept or self.in_progress:
            return False
        return self.progress.take(self.task.state if self.cls.is_stateful else None)

    @property
    def checkpoint_behind(self) -> bool:
        """Whether messages were handled since the last checkpoint."""
        return self.progress.since_checkpoint != 0

    def close_journal(self) -> None:
        """Write and close the journal (when the task leaves this process)."""
        if self.journal is not None:
            self.queue.recorder = None
            try:
                self.journal.close()
            except StateError as exc:
                self.report_error(str(exc))

    # -- reporting -------------------------------------------------------------------------

    def report_error(self, text: str, **fields: Any) -> None:
        """A record on the ``error`` channel for this task; remembered as ``last_error``."""
        self.last_error = text
        self.channels.emit("error", self.name, text, **fields)

    def _on_transit_error(self, exc: TransitError) -> None:
        if isinstance(exc, BadMessage):
            self.report_error(f"discarded a malformed message from queue {self.name!r}: "
                              f"{exc.reason}", raw=repr(exc.raw))
        else:
            self.report_error(f"queue {self.name!r}: {exc}")

    def figures(self) -> dict[str, Any]:
        """Counters and queue depth, for status queries."""
        c = self.task.counters
        return {
            "name": self.name,
            "stateful": self.cls.is_stateful,
            "messages_in": c.messages_in,
            "messages_out": c.messages_out,
            "emitted": c.emitted,
            "task_message_failure": c.task_message_failure,
            "recur_failure": c.recur_failure,
            "handler_seconds": round(c.handler_seconds, 6),
            "handler_cpu_seconds": round(c.handler_cpu_seconds, 6),
            "slow_handlers": c.slow_handlers,
            "duplicates_dropped": self.progress.duplicates_dropped,
            # Messages handled since the last checkpoint: what a kill now would redo.
            "since_checkpoint": self.progress.since_checkpoint,
            "handler_timeouts": c.handler_timeouts,
            "queue_depth": self.queue.depth,
            "started_at": self.started_at,
            "last_error": self.last_error,
            **self.task.extra_figures(),
        }
