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
import inspect
import time
import traceback
from collections import deque
from typing import Any, Callable

from pydantic import BaseModel

from multimodule.config import DEFAULT_HANDLER_TIMEOUT_S, DEFAULT_SAVE_STATE_S
from multimodule.errors import BadMessage, HandlerTimeout, StateError, TransitError
from multimodule.oob import Channels
from multimodule.runtime.control import CONTROL_KEY
from multimodule.runtime.schedule import Schedule
from multimodule.runtime.watchdog import HandlerWatchdog, exempt
from multimodule.state import StateStore
from multimodule.task import Task, Work

#: ``send(qname, message, owned=False)``: how a task's sends leave it (see :meth:`Task.send`).
Send = Callable[..., None]

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
    ``channels``: the out-of-band channels. ``store``: where a stateful task's state lives.
    ``slow_handler_s``: seconds a handler may hold the loop before it is reported after it
    returns (the watchdog reports it while it runs). ``watchdog``: the process's handler
    watchdog. ``failsafe``: see :data:`FailsafeRequest` (``None``: cut-offs are only
    reported). ``handler_timeout_s`` (from the task's config): seconds one call may hold the
    loop before it is interrupted.
    """

    def __init__(self, name: str, cls: type[Task], *, transit: Any, send: Send,
                 channels: Channels, store: StateStore | None, slow_handler_s: float,
                 watchdog: HandlerWatchdog, failsafe: FailsafeRequest | None = None,
                 receive_sysv: bool = True):
        self.name = name
        self.cls = cls
        self.store = store if cls.is_stateful else None
        self.channels = channels
        self.send = send
        self.slow_handler_s = slow_handler_s
        self.watchdog = watchdog
        self.failsafe = failsafe
        self.handler_timeout_s = DEFAULT_HANDLER_TIMEOUT_S
        self._cutoffs: deque[float] = deque()  # time.monotonic() of recent cut-offs
        self.task = cls()
        self.task.attach(name, self)
        self.queue = transit.declare_local(name)
        self.receiver = (transit.receiver(name, self.queue.put,
                                          on_error=self._on_transit_error,
                                          backlog=self.queue.__len__)
                         if receive_sysv else None)
        self.intervals: dict[str, float] = {}
        self.schedules: dict[str, Schedule] = {}
        self._consumer: asyncio.Task | None = None
        self._saver: asyncio.Task | None = None
        self._cancellable = False
        self._stop_after_message = False
        self.started_at = time.time()
        self.last_error: str | None = None
        #: A handler hung while stopping, or the task is being put in failsafe because its
        #: handlers kept being cut off: nothing more is delivered to this instance (what it
        #: holds in memory goes back to its System V queue when it is released).
        self.stuck = False

    @property
    def idle(self) -> bool:
        """Nothing to do now: no message waiting or in hand, no scheduled work running."""
        return (self._cancellable and not self.queue
                and not any(s.busy for s in self.schedules.values()))

    # -- life cycle ------------------------------------------------------------------------

    def start(self, config: dict[str, Any], settings: BaseModel | None) -> None:
        """Restore state, apply ``config``, start delivery (call with the loop running)."""
        if self.store is not None:
            state, problem = self.store.load(self.name)
            if problem:
                self.report_error(problem)
            self.task.state = state
        self.apply_config(config, settings)
        loop = asyncio.get_running_loop()
        self._consumer = loop.create_task(self._consume(), name=f"consume:{self.name}")
        if self.receiver is not None:
            self.receiver.start()
        if self.store is not None:
            self._saver = loop.create_task(self._save_periodically(), name=f"save:{self.name}")

    def apply_config(self, config: dict[str, Any], settings: BaseModel | None) -> None:
        """Give the task its (validated) config; schedules pick up new ``intervals``."""
        self.intervals = dict(config.get("intervals") or {})
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
        """Cancel schedules (no new work is generated by timers; work running finishes)."""
        for schedule in self.schedules.values():
            schedule.cancel()

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
        """Stop saving periodically and save the state one last time."""
        if self._saver is not None:
            self._saver.cancel()
        self.save_state()

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
                self.report_error(f"handler still busy after {grace_s:g} s; cancelled; "
                                  f"{len(self.queue)} messages in memory go back to its queue")
                consumer.cancel()
            except asyncio.CancelledError:
                pass

    # -- delivery --------------------------------------------------------------------------

    async def _consume(self) -> None:
        queue = self.queue
        process = self.process
        receiver = self.receiver
        try:
            while True:
                self._cancellable = True
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
                self.report_error(f"handler still busy after {grace_s:g} s while "
                                  f"delivering what was in memory; cancelled; "
                                  f"{len(self.queue)} messages go back to its queue")
                return handled + 1
        return count

    async def process(self, message: dict[str, Any]) -> None:
        """Deliver one message: a state transform, or the task's handler (watched, see the
        module docstring)."""
        counters = self.task.counters
        counters.messages_in += 1
        control = message.get(CONTROL_KEY)
        if control is not None and type(control) is dict and "transform" in control:
            self._transform(control["transform"])
            return
        watchdog = self.watchdog
        started = time.perf_counter()
        awaited = cut = False
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
        """Run one tick of a schedule (watched, see the module docstring), reporting (not
        raising) its errors."""
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

    async def _save_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.save_interval)
            self.save_state()

    def save_state(self) -> None:
        """Save the task's state now if it changed (stateful tasks only)."""
        if self.store is None:
            return
        try:
            self.store.save(self.name, self.task.state)
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
            "handler_timeouts": c.handler_timeouts,
            "queue_depth": self.queue.depth,
            "started_at": self.started_at,
            "last_error": self.last_error,
            **self.task.extra_figures(),
        }


# The runner's own code around a handler always reaches ``watchdog.ended``: a cut that lands
# there (the handler has just returned) does nothing.
exempt(TaskRunner.process, TaskRunner.run_work)
