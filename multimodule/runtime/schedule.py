"""Recurring work of a task (``Task.named_recur``): fixed-rate schedules on the event loop.

A schedule runs its work every ``interval`` seconds, measured from its start; ticks missed
while the work or the loop was busy are skipped, not accumulated. Changing a schedule never
interrupts work in progress: a new interval applies from the end of the work running now (or
from now, if it is sleeping), new work from the next tick, and a cancelled schedule lets its
running work finish before it ends. A schedule whose interval did not change keeps its phase.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

from multimodule.task import Work

#: ``run(name, work)``: runs one tick, reporting (never raising) the work's errors.
RunWork = Callable[[str, Work], Awaitable[None]]


class Schedule:
    """One named schedule. ``interval_of()`` gives its interval in seconds now (the config's
    ``intervals.NAME`` or the one the task asked for), read at each tick."""

    def __init__(self, name: str, requested: float, work: Work, run: RunWork,
                 interval_of: Callable[[Schedule], float], task_name: str):
        self.name = name
        self.requested = requested
        self.work = work
        self._run_work = run
        self._interval_of = interval_of
        self._task_name = task_name
        self._handle: asyncio.Task | None = None
        self._sleeping = False
        self._cancelled = False
        #: The interval the current wait was computed with (seconds).
        self.running_interval: float | None = None

    @property
    def interval(self) -> float:
        """The interval in force, seconds."""
        return self._interval_of(self)

    @property
    def busy(self) -> bool:
        """Whether its work is running now."""
        return self._handle is not None and not self._sleeping and not self._handle.done()

    def start(self) -> None:
        """Start ticking (call on the loop)."""
        self._cancelled = False
        self._handle = asyncio.get_running_loop().create_task(
            self._run(), name=f"recur:{self._task_name}:{self.name}")

    def reschedule(self) -> None:
        """The interval changed: apply it from now (or from the end of the work running)."""
        if self._handle is None or self._handle.done():
            return
        if self._sleeping:
            self._handle.cancel()
            self.start()
        # else: _run reads the new interval when the work ends

    def cancel(self) -> None:
        """Stop ticking; work in progress finishes first (see :meth:`wait`)."""
        self._cancelled = True
        if self._handle is not None and self._sleeping:
            self._handle.cancel()

    def kill(self) -> None:
        """Cancel at once, work in progress included (a stop whose grace ran out)."""
        self._cancelled = True
        if self._handle is not None:
            self._handle.cancel()

    async def wait(self) -> None:
        """Wait until the schedule has ended (after :meth:`cancel`)."""
        if self._handle is not None:
            await asyncio.wait([self._handle])

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.running_interval = self.interval
        due = loop.time() + interval
        while not self._cancelled:
            self._sleeping = True
            try:
                await asyncio.sleep(max(0.0, due - loop.time()))
            finally:
                self._sleeping = False
            if self._cancelled:
                return
            await self._run_work(self.name, self.work)
            now = loop.time()
            if self.interval != interval:  # changed while the work ran: from now on
                interval = self.running_interval = self.interval
                due = now + interval
                continue
            due += interval
            if due <= now:  # we fell behind: skip the missed ticks
                due = now + interval


class Schedules:
    """The named schedules of one task (``task_name``); ticks run through ``run``, each at
    the interval the task's config gives in ``intervals`` (seconds, by schedule name) or the
    one it asked for."""

    def __init__(self, task_name: str, run: RunWork):
        self.task_name = task_name
        self._run = run
        self.intervals: dict[str, float] = {}
        self.by_name: dict[str, Schedule] = {}

    @property
    def busy(self) -> bool:
        """Whether scheduled work is running now."""
        return any(s.busy for s in self.by_name.values())

    def set_intervals(self, intervals: dict[str, float]) -> None:
        """The config's ``intervals``: only a schedule whose interval changed changes."""
        self.intervals = dict(intervals)
        for schedule in self.by_name.values():
            if schedule.interval != schedule.running_interval:
                schedule.reschedule()

    def recur(self, name: str, interval: float, work: Work) -> None:
        """Create or change the schedule ``name`` (see :meth:`Task.named_recur`): the same
        interval keeps its phase and takes the new work from the next tick; a new one applies
        from now. Raises ``ValueError`` for an interval that is not a positive number."""
        if not (isinstance(interval, (int, float)) and interval > 0):
            raise ValueError(f"named_recur interval must be a positive number of seconds, "
                             f"not {interval!r}")
        schedule = self.by_name.get(name)
        if schedule is not None:
            schedule.work = work
            schedule.requested = float(interval)
            if schedule.interval != schedule.running_interval:
                schedule.reschedule()
            return
        schedule = self.by_name[name] = Schedule(
            name, float(interval), work, self._run, self._interval_of, self.task_name)
        schedule.start()

    def _interval_of(self, schedule: Schedule) -> float:
        return float(self.intervals.get(schedule.name, schedule.requested))

    def cancel(self) -> None:
        """No more ticks; work running finishes (see :meth:`wait`)."""
        for schedule in self.by_name.values():
            schedule.cancel()

    async def wait(self, grace_s: float) -> list[str]:
        """Wait (up to ``grace_s`` seconds) for the work still running after :meth:`cancel`;
        work still running then is cancelled. Returns the names of the schedules cancelled."""
        schedules = list(self.by_name.values())
        self.by_name.clear()
        try:
            async with asyncio.timeout(grace_s):
                for schedule in schedules:
                    await schedule.wait()
        except TimeoutError:
            killed = [s for s in schedules if s.busy]
            for schedule in killed:
                schedule.kill()
            return [s.name for s in killed]
        return []
