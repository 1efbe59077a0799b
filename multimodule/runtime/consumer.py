"""Delivering one task's input: its messages, in order, and its timer ticks, each a call of the
task's code under the process's handler watchdog.

One consumer coroutine per task takes messages from the task's in-memory queue and calls the
handler; it hands the loop back after about 2 ms of handling (:data:`BATCH_BUDGET_S`) so that
one busy task cannot starve the others. Every call is watched by the process's
:class:`~multimodule.runtime.watchdog.HandlerWatchdog`: reported while it holds the loop past
``--slow-handler-s``, interrupted (:class:`~multimodule.errors.HandlerTimeout`) past the task's
``handler_timeout_s``, which counts as that call's failure. A task cut off
:data:`~multimodule.runtime.calls.CUTOFFS_TO_FAILSAFE` times within
:data:`~multimodule.runtime.calls.CUTOFF_WINDOW_S` is put in failsafe through the ``failsafe``
callable its host gives.
"""

from __future__ import annotations

import asyncio
import inspect
import time
import traceback
from typing import Any, Callable

from multimodule.config import DEFAULT_HANDLER_TIMEOUT_S
from multimodule.errors import HandlerTimeout
from multimodule.oob import Channels
from multimodule.runtime.calls import (CUTOFF_WINDOW_S, CUTOFFS_TO_FAILSAFE, TASK_FAILURES,
                                       Cutoffs, cause, short)
from multimodule.runtime.control import CONTROL_KEY
from multimodule.runtime.interfaces import DeliveryGuard, FailsafeRequest
from multimodule.runtime.progress import Progress
from multimodule.runtime.watchdog import HandlerWatchdog, exempt
from multimodule.task import Task, Work
from multimodule.transit import META_KEY

#: Seconds of handling in a row before the consumer yields to the event loop (checked every
#: ``BATCH_CHECK`` messages): long enough to keep up with a bursty producer, short enough that
#: no task starves the others.
BATCH_BUDGET_S = 0.002
BATCH_CHECK = 64


class Consumer:
    """Calls task ``name``'s code: its handler for each message of ``queue`` (a
    :class:`~multimodule.transit.lowlevel.LocalQueue`), its scheduled work for each tick.

    ``task``: the instance. ``receiver``: the task's System V receiver (told when a batch is
    consumed), or ``None``. ``guard``: backpressure (no input taken while the task is
    blocked). ``progress``: where each message handled is counted (and duplicates dropped).
    ``watchdog``, ``slow_handler_s`` (seconds), ``failsafe``: see the module docstring.
    ``report_error(text, **fields)``: an ``error`` record for the task.
    ``handler_timeout_s``: seconds one call may hold the loop (read by the watchdog).
    """

    def __init__(self, name: str, task: Task, queue: Any, *, receiver: Any,
                 guard: DeliveryGuard | None, progress: Progress, watchdog: HandlerWatchdog,
                 channels: Channels, slow_handler_s: float, failsafe: FailsafeRequest | None,
                 report_error: Callable[..., None]):
        self.name = name
        self.task = task
        self.queue = queue
        self.receiver = receiver
        self.guard = guard
        self.progress = progress
        self.watchdog = watchdog
        self.channels = channels
        self.slow_handler_s = slow_handler_s
        self.failsafe = failsafe
        self.report_error = report_error
        self.handler_timeout_s = DEFAULT_HANDLER_TIMEOUT_S
        self.cutoffs = Cutoffs()
        self._coroutine: asyncio.Task | None = None
        #: Cleared while a checkpoint waits for the messages the task sent to leave the
        #: overflow: no input is taken and no timer runs meanwhile.
        self.intake = asyncio.Event()
        self.intake.set()
        #: Waiting for input (not in a handler): the coroutine may be cancelled.
        self.cancellable = False
        self._stop_after_message = False
        #: A handler hung while stopping, or the task is being put in failsafe because its
        #: handlers kept being cut off: nothing more is delivered to this instance (what it
        #: holds in memory stays in its journal, or without one goes back to its System V
        #: queue, when it is released).
        self.stuck = False

    def start(self) -> None:
        """Start taking messages (call with the loop running)."""
        self._coroutine = asyncio.get_running_loop().create_task(
            self._consume(), name=f"consume:{self.name}")

    @property
    def handling(self) -> bool:
        """Whether a handler has begun and not finished."""
        coroutine = self._coroutine
        return coroutine is not None and not coroutine.done() and not self.cancellable

    def _held_back(self, grace_s: float, when: str) -> None:
        # A handler that hung this long would hang on the next message too: the messages
        # still in memory are left for the host (journal, or back to the System V queue).
        self.stuck = True
        where = ("stay in its journal" if self.progress.journal is not None
                 else "go back to its queue")
        self.report_error(f"handler still busy after {grace_s:g} s{when}; cancelled; "
                          f"{len(self.queue)} more messages in memory {where}")

    async def stop(self, grace_s: float) -> None:
        """Let the message in progress finish (up to ``grace_s`` seconds, then it is
        cancelled and the task marked :attr:`stuck`), then stop the consumer coroutine (so
        that :meth:`deliver_pending` never runs two handlers of this task at once)."""
        coroutine = self._coroutine
        if coroutine is not None and not coroutine.done():
            if self.cancellable:
                coroutine.cancel()
            else:
                self._stop_after_message = True
            try:
                await asyncio.wait_for(asyncio.shield(coroutine), grace_s)
            except asyncio.TimeoutError:
                self._held_back(grace_s, "")
                coroutine.cancel()
            except asyncio.CancelledError:
                pass

    async def deliver_pending(self, grace_s: float) -> int:
        """Handle the messages waiting in memory now (not those they cause to be sent here);
        return how many were handled. A handler still busy after ``grace_s`` seconds is
        cancelled and the task marked :attr:`stuck`: the rest stay in memory for the host."""
        if self.stuck:
            return 0
        count = len(self.queue)
        for handled in range(count):
            message = self.queue.get_nowait()
            try:
                await asyncio.wait_for(self.process(message), grace_s)
            except asyncio.TimeoutError:
                self._held_back(grace_s, " while delivering what was in memory")
                return handled + 1
        return count

    async def _consume(self) -> None:
        queue = self.queue
        process = self.process
        receiver = self.receiver
        guard = self.guard
        name = self.name
        intake = self.intake
        held = guard.held_for if guard is not None else {}
        try:
            while True:
                self.cancellable = True
                if not intake.is_set():
                    await intake.wait()  # a checkpoint waits for what the task sent
                if guard is not None and guard.blocked(name):
                    await guard.wait_unblocked(name)  # backpressure: no input taken meanwhile
                message = await queue.get_async()
                self.cancellable = False
                cpu_before = time.thread_time()
                await process(message)
                items = queue.waiting
                until = time.perf_counter() + BATCH_BUDGET_S
                handled = 1
                while items and not self.stuck:
                    if name in held:
                        break  # it sent to a task here that is far behind: see Delivery
                    await process(queue.get_nowait())
                    handled += 1
                    if handled % BATCH_CHECK == 0 and time.perf_counter() > until:
                        break
                self.task.counters.handler_cpu_seconds += time.thread_time() - cpu_before
                if receiver is not None:
                    receiver.consumed()
                if guard is not None:
                    guard.caught_up(name, len(items))
                if self._stop_after_message or self.stuck:
                    return
                self.cancellable = True
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            if not self.cancellable:
                raise
        finally:
            self.cancellable = False

    async def process(self, message: dict[str, Any]) -> None:
        """Deliver one message: a state transform, or the task's handler (watched, see the
        module docstring). A message whose id is in the dedupe window was handled before (it
        came again after a crash) and is dropped."""
        counters = self.task.counters
        counters.messages_in += 1
        meta = message.get(META_KEY)
        message_id = meta.get("id") if meta.__class__ is dict else None
        progress = self.progress
        if progress.window and message_id in progress.recent_set:
            progress.position += 1
            progress.duplicates_dropped += 1
            return
        control = message.get(CONTROL_KEY)
        if control is not None and type(control) is dict and "transform" in control:
            self._transform(control["transform"])
            progress.handled(message_id)
            return
        watchdog = self.watchdog
        started = time.perf_counter()
        awaited = cut = False
        token = cause.set([message_id, 0] if message_id.__class__ is str else None)
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
                f"message handler raised {type(exc).__name__}: {exc}; message: {short(message)}",
                traceback=traceback.format_exc(), failure="task_message_failure",
            )
            cut = isinstance(exc, HandlerTimeout)
            if cut:
                self._cut_off()
        finally:
            cause.reset(token)
        progress.handled(message_id)
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
            self.report_error(f"state transform must be an object, got {short(transform)}")
            return
        if not self.progress.stateful:
            self.report_error("state transform sent to a stateless task; ignored",
                              transform=transform)
            return
        self.task.state.update(transform)
        self.channels.emit("debug", self.name, "state transformed", keys=sorted(transform))

    async def run_work(self, name: str, work: Work) -> None:
        """Run one tick of schedule ``name``, reporting (not raising) its errors. Held while
        the task is blocked (backpressure). What it sends gets ids derived from the task's
        incarnation, the schedule and the tick's number (kept in the checkpoint)."""
        guard = self.guard
        if not self.intake.is_set():
            await self.intake.wait()
        if guard is not None and guard.blocked(self.name):
            await guard.wait_unblocked(self.name)
        checkpoint = self.progress.data
        ticks = checkpoint.ticks
        tick = ticks[name] = ticks.get(name, 0) + 1
        token = cause.set([f"{checkpoint.incarnation}/{self.name}/{name}/{tick}", 0])
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
            cause.reset(token)
            self.task.counters.handler_cpu_seconds += time.thread_time() - cpu_before

    def _cut_off(self) -> None:
        """A call of this task's code was interrupted: count it, and put the task in
        failsafe at the :data:`~multimodule.runtime.calls.CUTOFFS_TO_FAILSAFE`-th within
        :data:`~multimodule.runtime.calls.CUTOFF_WINDOW_S`."""
        self.task.counters.handler_timeouts += 1
        if not self.cutoffs.add() or self.failsafe is None:
            return
        reason = (f"its handlers held the event loop past handler_timeout_s "
                  f"({self.handler_timeout_s:g} s) and were interrupted "
                  f"{CUTOFFS_TO_FAILSAFE} times within {CUTOFF_WINDOW_S:g} s")
        if self.failsafe(self.name, reason, metric="handler_timeouts",
                         value=CUTOFFS_TO_FAILSAFE):
            self.stuck = True


# The consumer's own code around a handler always reaches ``watchdog.ended``: a cut that
# lands there (the handler has just returned) does nothing.
exempt(Consumer.process, Consumer.run_work)
