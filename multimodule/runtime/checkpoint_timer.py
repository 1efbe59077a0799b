"""One timer for the periodic checkpoints of every task of a process (per event loop).

A task per runner sleeping ``save_state`` seconds in a loop made 1,000 idle tasks wake the
process 1,000 times a second; :class:`CheckpointTimer` keeps a heap of due times instead.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import weakref
from typing import Protocol


class Checkpointed(Protocol):
    """What the timer needs of a task runner."""

    @property
    def save_interval(self) -> float:
        """Seconds between two periodic checkpoints."""

    def periodic_checkpoint(self) -> None:
        """Take the periodic checkpoint (errors reported, never raised)."""


class _Due:
    """One runner's place in a :class:`CheckpointTimer` (``cancel()`` takes it out)."""

    __slots__ = ("runner", "cancelled")

    def __init__(self, runner: Checkpointed):
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

    def add(self, runner: Checkpointed) -> _Due:
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
