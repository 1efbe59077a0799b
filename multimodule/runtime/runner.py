"""Running one task inside an asyncio event loop: in-order delivery, schedules, state.

Each task has an in-memory queue (declared local in the process's transit) fed by senders in
this process and by an :class:`~multimodule.transit.lowlevel.AsyncReceiver` for the System V
queue of the same name. One consumer coroutine per task takes messages in order and calls the
handler; it hands the loop back after about 2 ms of handling so that one busy task cannot
starve the others.

Every call of the task's message handler and scheduled work is watched by the process's
:class:`~multimodule.runtime.watchdog.HandlerWatchdog`: reported while it holds the loop past
``--slow-handler-s``, interrupted (:class:`~multimodule.errors.HandlerTimeout`) past the
task's ``handler_timeout_s``, which counts as that handler's failure. A task cut off
:data:`CUTOFFS_TO_FAILSAFE` times within :data:`CUTOFF_WINDOW_S` is put in failsafe through
the ``failsafe`` callable its host gives (the daemon's failsafe; an external task's process
asks its daemon).
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import heapq
import inspect
import itertools
import re
import time
import traceback
import weakref
from collections import deque
from pathlib import Path
from typing import Any, Callable, Protocol

from pydantic import BaseModel

from multimodule.config import DEFAULT_HANDLER_TIMEOUT_S, DEFAULT_SAVE_STATE_S
from multimodule.errors import BadMessage, HandlerTimeout, StateError, TransitError
from multimodule.journal import Journal
from multimodule.oob import Channels
from multimodule.runtime.control import CONTROL_KEY
from multimodule.runtime.schedule import Schedule
from multimodule.runtime.watchdog import HandlerWatchdog, exempt
from multimodule.state import Checkpoint, StateStore
from multimodule.task import Task, Work
from multimodule.transit import META_KEY
from multimodule.transit.lowlevel import make_meta

#: ``send(qname, message, owned=False, origin=NAME, **meta)``: how a task's sends leave it
#: (see :meth:`Task.send`; ``origin`` names the sending task, ``meta`` extra meta keys).
Send = Callable[..., None]

#: What :meth:`TaskRunner.private_path` accepts as a file name suffix.
_SUFFIX = re.compile(r"[A-Za-z0-9_-]{1,64}")

#: Longest derived message id; a longer one is cut to a hash of itself (a loop of tasks
#: sending to each other would otherwise grow it without end).
MAX_DERIVED_ID_CHARS = 120

#: Window of recent message ids a task with ``dedupe = true`` remembers.
DEFAULT_DEDUPE_WINDOW = 10_000

#: ``[id, emitted]`` of the message (or timer tick) being handled, in the handler's context:
#: what it sends gets the id ``ID.N`` (N counting its sends), so a message made again after
#: a crash, by handling the same input again, has the same id as the first time.
_cause: contextvars.ContextVar[list | None] = contextvars.ContextVar("multimodule_cause",
                                                                    default=None)


def derived_id(cause: str, index: int) -> str:
    """The id of the ``index``-th message sent while handling message (or tick) ``cause``."""
    out = f"{cause}.{index}"
    if len(out) > MAX_DERIVED_ID_CHARS:
        out = "h" + hashlib.blake2b(out.encode(), digest_size=12).hexdigest()
    return out


class _Due:
    """One runner's place in a :class:`CheckpointTimer` (``cancel()`` takes it out)."""

    __slots__ = ("runner", "cancelled")

    def __init__(self, runner: TaskRunner):
        self.runner = runner
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


def _settle(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class CheckpointTimer:
    """One timer for the periodic checkpoints of every task of a process (per event loop).

    A task per runner sleeping ``save_state`` seconds in a loop made 1,000 idle tasks wake
    the process 1,000 times a second, each through a task of its own; here one asyncio task
    sleeps until the next checkpoint due (a heap of due times, each runner at its own
    interval) and takes every one due by then, never one before its time.
    """

    _timers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, CheckpointTimer] = \
        weakref.WeakKeyDictionary()

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._heap: list[tuple[float, int, _Due]] = []
        self._order = itertools.count()
        self._task: asyncio.Task | None = None
        self._waiter: asyncio.Future | None = None

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> CheckpointTimer:
        """The timer of ``loop`` (made on first use)."""
        timer = cls._timers.get(loop)
        if timer is None:
            timer = cls._timers[loop] = cls(loop)
        return timer

    def add(self, runner: TaskRunner) -> _Due:
        """Checkpoint ``runner`` every ``runner.save_interval`` seconds, the first one
        interval after the next turn of the loop (after the task's own schedules, started
        with it, have begun their first interval: its first checkpoint follows their first
        tick, as when each runner slept in a task of its own)."""
        due = _Due(runner)
        self.loop.call_soon(self._begin, due)
        return due

    def _begin(self, due: _Due) -> None:
        if due.cancelled:
            return
        self._push(due)
        if self._task is None or self._task.done():
            self._task = self.loop.create_task(self._run(), name="checkpoints")

    def _push(self, due: _Due) -> None:
        at = self.loop.time() + due.runner.save_interval
        waiter = self._waiter
        if waiter is not None and not waiter.done() and self._heap and at < self._heap[0][0]:
            waiter.set_result(None)  # sooner than what the timer sleeps for
        heapq.heappush(self._heap, (at, next(self._order), due))

    async def _run(self) -> None:
        heap = self._heap
        loop = self.loop
        while heap:
            delay = heap[0][0] - loop.time()
            if delay > 0:  # always sleep until the first due: never a busy loop
                waiter = self._waiter = loop.create_future()
                handle = loop.call_later(delay, _settle, waiter)
                try:
                    await waiter
                finally:
                    handle.cancel()
                continue
            now = loop.time()
            due_now = []
            while heap and heap[0][0] <= now:  # never before a task's own due time
                due_now.append(heapq.heappop(heap)[2])
            for due in due_now:
                if due.cancelled:
                    continue
                try:
                    due.runner.periodic_checkpoint()
                finally:
                    self._push(due)


class DeliveryGuard(Protocol):
    """What the host tells a runner about the rest of the process (see
    :class:`~multimodule.runtime.host.HostProcess`)."""

    def blocked(self, task: str) -> bool:
        """Whether ``task`` must take no input now (the overflow is full and holds messages
        it sent: backpressure)."""

    async def wait_unblocked(self, task: str) -> None:
        """Return once :meth:`blocked` is false for ``task``."""

    def holds_from(self, task: str) -> bool:
        """Whether messages ``task`` sent wait in the overflow (its checkpoint must wait)."""

    async def wait_released(self, task: str) -> None:
        """Return once no message ``task`` sent waits in the overflow."""

    def flush_journals(self) -> None:
        """Write every journal of the process (before a checkpoint)."""

    def journal_written(self, journal: Journal) -> None:
        """``journal`` has buffered records: have them written at the end of this turn of
        the loop."""

    def spill_path(self, task: str, local: Any, sysv: Any) -> None:
        """``task`` takes input from its in-memory queue ``local`` and from ``sysv``."""

    def stall(self, task: str, stalled: bool) -> None:
        """``task`` cannot keep up for now (or can again): hold its senders back."""


#: ``failsafe(name, reason, **fields) -> bool``: put task ``name`` in failsafe because its
#: handlers keep being cut off (``fields``: ``metric``, ``value`` for the alert); whether it is
#: being stopped in this process now (then nothing more is delivered to it).
FailsafeRequest = Callable[..., bool]

#: A task whose handlers are interrupted this many times within :data:`CUTOFF_WINDOW_S`
#: seconds is put in failsafe: a handler that hangs now and then is reported, one that hangs
#: on most messages would hold the loop for ``handler_timeout_s`` on each of them.
CUTOFFS_TO_FAILSAFE = 3
CUTOFF_WINDOW_S = 600.0

#: Seconds of handling in a row before the consumer yields to the event loop (checked every
#: ``BATCH_CHECK`` messages): long enough to keep up with a bursty producer, short enough that
#: no task starves the others.
BATCH_BUDGET_S = 0.002
BATCH_CHECK = 64


#: What a task's code may raise without taking the daemon down: everything but the
#: cancellation asyncio uses for its own control flow.
TASK_FAILURES = (Exception, KeyboardInterrupt, SystemExit)

#: Seconds ``stop`` waits for a handler in progress before cancelling it.
STOP_GRACE_S = 10.0


def _short(message: Any, limit: int = 300) -> str:
    text = repr(message)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class TaskRunner:
    """Hosts one task instance on the event loop; the task's :class:`~multimodule.task.TaskHost`.

    ``transit``: where the task's in-memory queue is declared and its System V receiver made
    (``receive_sysv=False`` only in tests). ``send``: how the task's sends leave it.
    ``channels``: the out-of-band channels. ``store``: where the task's checkpoint lives.
    ``slow_handler_s``: seconds a handler may hold the loop before it is reported after it
    returns (the watchdog reports it while it runs). ``watchdog``: the process's handler
    watchdog. ``failsafe``: see :data:`FailsafeRequest` (``None``: cut-offs are only
    reported). ``handler_timeout_s`` (from the task's config): seconds one call may hold the
    loop before it is interrupted. ``journal``: the task's input journal (``None``: journals
    are off, and a stateless task keeps no checkpoint); ``guard``: what the host tells it
    about the rest of the process (journals to write, backpressure; see
    :class:`DeliveryGuard`).
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
        self.handler_timeout_s = DEFAULT_HANDLER_TIMEOUT_S
        self._cutoffs: deque[float] = deque()  # time.monotonic() of recent cut-offs
        self.task = cls()
        self.task.attach(name, self)
        self.queue = transit.declare_local(name)
        self.receiver = (transit.receiver(name, self._received if journal else self.queue.put,
                                          on_error=self._on_transit_error,
                                          backlog=self.queue.__len__,
                                          commit=self._commit_received if journal else None)
                         if receive_sysv else None)
        self.intervals: dict[str, float] = {}
        self.schedules: dict[str, Schedule] = {}
        self.checkpoint_data = Checkpoint(state={} if cls.is_stateful else None)
        #: Sequence number (in the journal) of the last message handled.
        self.position = 0
        self._checkpointed_position = 0
        self._checkpointed_ticks = 0
        self.dedupe_window = 0
        self._recent: deque[str] = deque()
        self._recent_set: set[str] = set()
        self.duplicates_dropped = 0
        self._consumer: asyncio.Task | None = None
        self._saver: _Due | None = None
        self._barrier: asyncio.Task | None = None
        #: Cleared while a checkpoint waits for the messages the task sent to leave the
        #: overflow: no input is taken and no timer runs meanwhile.
        self._intake = asyncio.Event()
        self._intake.set()
        self._cancellable = False
        self._stop_after_message = False
        self.started_at = time.time()
        self.last_error: str | None = None
        #: A handler hung while stopping, or the task is being put in failsafe because its
        #: handlers kept being cut off: nothing more is delivered to this instance (what it
        #: holds in memory stays in its journal, or without one goes back to its System V
        #: queue, when it is released).
        self.stuck = False
        self._told_stopping = self._told_stopped = False

    @property
    def idle(self) -> bool:
        """Nothing to do now: no message waiting or in hand, no scheduled work running."""
        return (self._cancellable and not self.queue
                and not any(s.busy for s in self.schedules.values()))

    # -- life cycle ------------------------------------------------------------------------

    def start(self, config: dict[str, Any], settings: BaseModel | None) -> None:
        """Restore the checkpoint (state, position, dedupe window), put what the journal holds
        past it back on the queue ahead of anything new, apply ``config``, start delivery
        (call with the loop running)."""
        if self.store is not None and (self.cls.is_stateful or self.journal is not None):
            checkpoint, problem = self.store.load(self.name, self.cls.is_stateful)
            if problem:
                self.report_error(problem)
            self.checkpoint_data = checkpoint
            if checkpoint.state is not None:
                self.task.state = checkpoint.state
            self.position = self._checkpointed_position = checkpoint.position
            self._checkpointed_ticks = sum(checkpoint.ticks.values())
            self._recent.extend(checkpoint.recent_ids)
            self._recent_set.update(checkpoint.recent_ids)
        if self.journal is not None:
            try:
                again = self.journal.recover(self.position)
            except StateError as exc:
                self.report_error(f"journal not read, its messages are not delivered again: "
                                  f"{exc}")
                again = []
            for why in self.journal.bad_records:
                self.report_error(f"journal record skipped: {why}")
            for what in self.journal.cut_off:
                self.channels.emit("log", self.name, f"journal: {what}")
            if self.receiver is not None:
                self.receiver.skip_ids = self.journal.last_ids
            self.queue.put_many(again)  # ahead of anything new, and not journaled twice
            self.journal.on_dirty = self.guard.journal_written
            self.queue.recorder = self.journal.append
            if again:
                self.channels.emit("log", self.name, f"delivering {len(again)} messages again "
                                                     "from the journal (not handled before "
                                                     "the last stop)")
        self.apply_config(config, settings)
        loop = asyncio.get_running_loop()
        self._consumer = loop.create_task(self._consume(), name=f"consume:{self.name}")
        if self.receiver is not None:
            self.receiver.start()
            if self.guard is not None:
                self.guard.spill_path(self.name, self.queue, self.receiver.queue)
        if self.store is not None and (self.cls.is_stateful or self.journal is not None):
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

    def apply_config(self, config: dict[str, Any], settings: BaseModel | None) -> None:
        """Give the task its (validated) config; schedules pick up new ``intervals``, the
        dedupe window its new size."""
        self.intervals = dict(config.get("intervals") or {})
        dedupe = config.get("dedupe", False)
        self.dedupe_window = (DEFAULT_DEDUPE_WINDOW if dedupe is True
                              else int(dedupe) if dedupe else 0)
        while len(self._recent) > self.dedupe_window:
            self._recent_set.discard(self._recent.popleft())
        self.handler_timeout_s = float(config.get("handler_timeout_s",
                                                  DEFAULT_HANDLER_TIMEOUT_S))
        self.task.config = config
        self.task.settings = settings
        try:
            self.task.set_config(config)
        except TASK_FAILURES as exc:
            self.report_error(f"set_config raised {type(exc).__name__}: {exc}",
                              traceback=traceback.format_exc())
        for schedule in self.schedules.values():
            if schedule.interval != schedule.running_interval:
                schedule.reschedule()  # only a changed interval changes a schedule

    # -- TaskHost --------------------------------------------------------------------------

    def send(self, qname: str, message: dict[str, Any], *, owned: bool = False,
             destination: str | None = None) -> None:
        """The task's sends (see :meth:`Task.send`): a message without an id of its own gets
        one derived from what is being handled (see :func:`derived_id`)."""
        meta = message.get(META_KEY)
        cause = _cause.get()
        if cause is not None and (meta.__class__ is not dict
                                  or meta.get("id").__class__ is not str):
            index = cause[1]
            cause[1] = index + 1
            self._send(qname, message, owned=owned, origin=self.name, destination=destination,
                       id=derived_id(cause[0], index))
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

    def recur(self, task: Task, name: str, interval: float, work: Work) -> None:
        """Create or change the schedule ``name`` (see :meth:`Task.named_recur`): the same
        interval keeps its phase and takes the new work from the next tick; a new one applies
        from now. Raises ``ValueError`` for an interval that is not a positive number."""
        if not (isinstance(interval, (int, float)) and interval > 0):
            raise ValueError(f"named_recur interval must be a positive number of seconds, "
                             f"not {interval!r}")
        schedule = self.schedules.get(name)
        if schedule is not None:
            schedule.work = work
            schedule.requested = float(interval)
            if schedule.interval != schedule.running_interval:
                schedule.reschedule()
            return
        schedule = self.schedules[name] = Schedule(
            name, float(interval), work, self.run_work, self._interval_of, self.name)
        schedule.start()

    def _interval_of(self, schedule: Schedule) -> float:
        return float(self.intervals.get(schedule.name, schedule.requested))

    def stop_intake(self) -> None:
        """Cancel schedules (no new work is generated by timers; work running finishes) and
        tell the task (:meth:`Task.stopping`), once."""
        for schedule in self.schedules.values():
            schedule.cancel()
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

    async def wait_schedules(self, grace_s: float = STOP_GRACE_S) -> None:
        """Wait (up to ``grace_s`` seconds) for the scheduled work still running after
        :meth:`stop_intake`; work still running then is cancelled and reported."""
        schedules = list(self.schedules.values())
        self.schedules.clear()
        try:
            async with asyncio.timeout(grace_s):
                for schedule in schedules:
                    await schedule.wait()
        except TimeoutError:
            for schedule in schedules:
                if schedule.busy:
                    schedule.kill()
                    self.report_error(f"scheduled work {schedule.name!r} still busy after "
                                      f"{grace_s:g} s; cancelled")

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
        """Let the message in progress finish (up to ``grace_s`` seconds, then it is
        cancelled and the task marked :attr:`stuck`), then stop the consumer coroutine (so
        that :meth:`deliver_pending` never runs two handlers of this task at once)."""
        consumer = self._consumer
        if consumer is not None and not consumer.done():
            if self._cancellable:
                consumer.cancel()
            else:
                self._stop_after_message = True
            try:
                await asyncio.wait_for(asyncio.shield(consumer), grace_s)
            except asyncio.TimeoutError:
                # A handler that hung this long would hang on the next message too: the
                # messages still in memory are left for the host to send back to the queue.
                self.stuck = True
                where = ("stay in its journal" if self.journal is not None
                         else "go back to its queue")
                self.report_error(f"handler still busy after {grace_s:g} s; cancelled; "
                                  f"{len(self.queue)} more messages in memory {where}")
                consumer.cancel()
            except asyncio.CancelledError:
                pass

    # -- delivery --------------------------------------------------------------------------

    async def _consume(self) -> None:
        queue = self.queue
        process = self.process
        receiver = self.receiver
        guard = self.guard
        name = self.name
        intake = self._intake
        try:
            while True:
                self._cancellable = True
                if not intake.is_set():
                    await intake.wait()  # a checkpoint waits for what the task sent
                if guard is not None and guard.blocked(name):
                    await guard.wait_unblocked(name)  # backpressure: no input taken meanwhile
                message = await queue.get_async()
                self._cancellable = False
                cpu_before = time.thread_time()
                await process(message)
                items = queue.waiting
                until = time.perf_counter() + BATCH_BUDGET_S
                handled = 1
                while items and not self.stuck:
                    await process(queue.get_nowait())
                    handled += 1
                    if handled % BATCH_CHECK == 0 and time.perf_counter() > until:
                        break
                self.task.counters.handler_cpu_seconds += time.thread_time() - cpu_before
                if receiver is not None:
                    receiver.consumed()
                if self._stop_after_message or self.stuck:
                    return
                self._cancellable = True
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            if not self._cancellable:
                raise
        finally:
            self._cancellable = False

    async def deliver_pending(self, grace_s: float = STOP_GRACE_S) -> int:
        """Handle the messages waiting in memory now (not those they cause to be sent here);
        return how many were handled. A handler still busy after ``grace_s`` seconds is
        cancelled and the task marked :attr:`stuck`: the rest stay in memory for the host
        to send back to the task's System V queue."""
        if self.stuck:
            return 0
        count = len(self.queue)
        for handled in range(count):
            message = self.queue.get_nowait()
            try:
                await asyncio.wait_for(self.process(message), grace_s)
            except asyncio.TimeoutError:
                self.stuck = True
                where = ("stay in its journal" if self.journal is not None
                         else "go back to its queue")
                self.report_error(f"handler still busy after {grace_s:g} s while "
                                  f"delivering what was in memory; cancelled; "
                                  f"{len(self.queue)} more messages {where}")
                return handled + 1
        return count

    async def process(self, message: dict[str, Any]) -> None:
        """Deliver one message: a state transform, or the task's handler (watched, see the
        module docstring). A message whose id is in the dedupe window was handled before (it
        came again after a crash) and is dropped."""
        counters = self.task.counters
        counters.messages_in += 1
        meta = message.get(META_KEY)
        message_id = meta.get("id") if meta.__class__ is dict else None
        if self.dedupe_window and message_id in self._recent_set:
            self.position += 1
            self.duplicates_dropped += 1
            return
        control = message.get(CONTROL_KEY)
        if control is not None and type(control) is dict and "transform" in control:
            self._transform(control["transform"])
            self._handled(message_id)
            return
        watchdog = self.watchdog
        started = time.perf_counter()
        awaited = cut = False
        token = _cause.set([message_id, 0] if message_id.__class__ is str else None)
        try:
            generation = watchdog.began(self, "message handler")
            try:
                result = self.task.message(message)
            finally:
                watchdog.ended(generation)
            if result is not None and inspect.isawaitable(result):
                awaited = True
                await (watchdog.steps(result, self, "message handler")
                       if inspect.iscoroutine(result) else result)
        except TASK_FAILURES as exc:
            counters.task_message_failure += 1
            self.report_error(
                f"message handler raised {type(exc).__name__}: {exc}; message: {_short(message)}",
                traceback=traceback.format_exc(), failure="task_message_failure",
            )
            cut = isinstance(exc, HandlerTimeout)
            if cut:
                self._cut_off()
        finally:
            _cause.reset(token)
        self._handled(message_id)
        elapsed = time.perf_counter() - started
        counters.handler_seconds += elapsed
        if not awaited and not cut and elapsed > self.slow_handler_s:
            counters.slow_handlers += 1
            self.channels.emit(
                "error", self.name,
                f"warning: message handler held the event loop for {elapsed:.3f} s "
                f"(threshold {self.slow_handler_s} s)",
                severity="warning", duration_s=round(elapsed, 6),
            )

    def _handled(self, message_id: Any) -> None:
        self.position += 1
        if self.dedupe_window and message_id.__class__ is str:
            recent = self._recent
            recent.append(message_id)
            self._recent_set.add(message_id)
            if len(recent) > self.dedupe_window:
                self._recent_set.discard(recent.popleft())

    def _transform(self, transform: Any) -> None:
        if not isinstance(transform, dict):
            self.report_error(f"state transform must be an object, got {_short(transform)}")
            return
        if not self.cls.is_stateful:
            self.report_error("state transform sent to a stateless task; ignored",
                              transform=transform)
            return
        self.task.state.update(transform)
        self.channels.emit("debug", self.name, "state transformed", keys=sorted(transform))

    async def run_work(self, name: str, work: Work) -> None:
        """Run one tick of a schedule, reporting (not raising) its errors. Held while the
        task is blocked (backpressure). What it sends gets ids derived from the task's
        incarnation, the schedule and the tick's number (kept in the checkpoint)."""
        guard = self.guard
        if not self._intake.is_set():
            await self._intake.wait()
        if guard is not None and guard.blocked(self.name):
            await guard.wait_unblocked(self.name)
        ticks = self.checkpoint_data.ticks
        tick = ticks[name] = ticks.get(name, 0) + 1
        token = _cause.set([f"{self.checkpoint_data.incarnation}/{self.name}/{name}/{tick}", 0])
        cpu_before = time.thread_time()
        watchdog = self.watchdog
        what = f"scheduled work {name!r}"
        try:
            generation = watchdog.began(self, what)
            try:
                result = work()
            finally:
                watchdog.ended(generation)
            if result is not None and inspect.isawaitable(result):
                await (watchdog.steps(result, self, what) if inspect.iscoroutine(result)
                       else result)
        except TASK_FAILURES as exc:
            self.task.counters.recur_failure += 1
            self.report_error(f"{what} raised {type(exc).__name__}: {exc}",
                              traceback=traceback.format_exc(), failure="recur_failure")
            if isinstance(exc, HandlerTimeout):
                self._cut_off()
        finally:
            _cause.reset(token)
            self.task.counters.handler_cpu_seconds += time.thread_time() - cpu_before

    def _cut_off(self) -> None:
        """A call of this task's code was interrupted: count it, and put the task in
        failsafe at the :data:`CUTOFFS_TO_FAILSAFE`-th within :data:`CUTOFF_WINDOW_S`."""
        self.task.counters.handler_timeouts += 1
        now = time.monotonic()
        cutoffs = self._cutoffs
        cutoffs.append(now)
        while now - cutoffs[0] > CUTOFF_WINDOW_S:
            cutoffs.popleft()
        if len(cutoffs) < CUTOFFS_TO_FAILSAFE or self.failsafe is None:
            return
        cutoffs.clear()
        reason = (f"its handlers held the event loop past handler_timeout_s "
                  f"({self.handler_timeout_s:g} s) and were interrupted "
                  f"{CUTOFFS_TO_FAILSAFE} times within {CUTOFF_WINDOW_S:g} s")
        if self.failsafe(self.name, reason, metric="handler_timeouts",
                         value=CUTOFFS_TO_FAILSAFE):
            self.stuck = True

    # -- state -----------------------------------------------------------------------------

    @property
    def save_interval(self) -> float:
        return float(self.intervals.get("save_state", DEFAULT_SAVE_STATE_S))

    def periodic_checkpoint(self) -> None:
        """The checkpoint taken every ``save_state`` seconds (called by the process's
        :class:`CheckpointTimer`). If messages it sent wait in the overflow (a full queue
        downstream), a steady stream could put it off for ever: then the task takes no input
        until they are sent, and checkpoints (a barrier, at most one at a time)."""
        if self.checkpoint() or self.guard is None or not self.guard.holds_from(self.name):
            return
        if self._barrier is None or self._barrier.done():
            self._barrier = asyncio.get_running_loop().create_task(
                self._checkpoint_when_released(), name=f"checkpoint:{self.name}")

    async def _checkpoint_when_released(self) -> None:
        # (An async handler still awaiting then puts it off to the next interval.)
        self._intake.clear()
        try:
            await self.guard.wait_released(self.name)
            self.checkpoint()
        finally:
            self._intake.set()

    @property
    def in_progress(self) -> bool:
        """Whether a handler or a scheduled work has begun and not finished (a checkpoint now
        would hold part of its effect)."""
        consumer = self._consumer
        return ((consumer is not None and not consumer.done() and not self._cancellable)
                or any(s.busy for s in self.schedules.values()))

    def checkpoint(self) -> bool:
        """Save the task's checkpoint now (state, journal position, dedupe window, ticks) if
        it changed; return whether it was saved. Not while a handler or scheduled work is
        in progress, nor while messages it sent wait in the overflow (they exist only in
        memory: a crash must make them again from the input before this position); the
        journals of the process are written first, so every message the task sent in
        memory is journaled by its receiver. Errors are reported, not raised."""
        if self.store is None or (not self.cls.is_stateful and self.journal is None):
            return False
        if self.in_progress:
            return False
        guard = self.guard
        if guard is not None:
            if guard.holds_from(self.name):
                return False
            try:
                guard.flush_journals()
            except StateError as exc:
                self.report_error(f"checkpoint not taken: {exc}")
                return False
        ticks = sum(self.checkpoint_data.ticks.values())
        if (not self.cls.is_stateful and self.position == self._checkpointed_position
                and ticks == self._checkpointed_ticks):
            return False
        checkpoint = self.checkpoint_data
        checkpoint.position = self.position
        if self.cls.is_stateful:
            checkpoint.state = self.task.state
        checkpoint.recent_ids = list(self._recent) if self.dedupe_window else []
        try:
            self.store.save(self.name, checkpoint)
        except StateError as exc:
            self.report_error(str(exc))
            return False
        self._checkpointed_position = self.position
        self._checkpointed_ticks = ticks
        if self.journal is not None:
            self.journal.checkpointed(self.position)
        return True

    @property
    def checkpoint_behind(self) -> bool:
        """Whether messages were handled since the last checkpoint."""
        return self.position != self._checkpointed_position

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
            "duplicates_dropped": self.duplicates_dropped,
            # Messages handled since the last checkpoint: what a kill now would redo.
            "since_checkpoint": self.position - self._checkpointed_position,
            "handler_timeouts": c.handler_timeouts,
            "queue_depth": self.queue.depth,
            "started_at": self.started_at,
            "last_error": self.last_error,
            **self.task.extra_figures(),
        }


# The runner's own code around a handler always reaches ``watchdog.ended``: a cut that lands
# there (the handler has just returned) does nothing.
exempt(TaskRunner.process, TaskRunner.run_work)
