"""What a host process's runners share about delivery: the journals and the overflow.

:class:`Delivery` is the :class:`~multimodule.runtime.interfaces.DeliveryGuard` of a
:class:`~multimodule.runtime.host.HostProcess`: it makes each task's journal (in the state
directory), writes the journals that have new records once per turn of the event loop (one
``write`` per journal, however many messages), writes them all before any checkpoint, and
tells runners when to pause: a task whose sent messages are held in a full overflow takes no
input until the overflow has room again (backpressure through its own full queues).

Backpressure crosses in-memory hops: a task here that sends, in memory, to a task here that is
:data:`LOCAL_HIGH_WATER` messages behind is held back (:meth:`Delivery.hold_back`): it takes no
input and its timers wait (its own System V input stays in the kernel) until that task is
back under :data:`LOCAL_LOW_WATER` (:meth:`Delivery.caught_up`); coroutines of its own wait in
:meth:`Task.drain`. So a burst fills queues up to a bound, hop by hop back to its source,
instead of the process's memory. A task is never held back for one that waits, directly or
through others, on it (the wait would never end): in a cycle of tasks one keeps going.

When the overflow is full (:meth:`Delivery.spilling`): once a task here that is
paused (or that says it is stalled, :meth:`Delivery.stall`: the Bridge while NATS is away) is
:data:`LOCAL_HIGH_WATER` messages behind, what tasks here send it goes through its
System V queue instead (its receiver takes from there only while the task is less than 256
behind), so the kernel queue and then the bounded overflow fill, and the senders are paused
in turn, instead of the process's memory growing. Sends stay on that path until the System V
queue and the overflow hold nothing more for the task and it is back under
:data:`LOCAL_LOW_WATER`, so a sender's messages never overtake each other. (Tasks that send to
each other in a cycle through full System V queues can wait on each other for good, as with
any bounded queues.)
"""

from __future__ import annotations

import asyncio
from typing import Callable

from multimodule.errors import StateError, TransitError
from multimodule.journal import Journal
from multimodule.state import StateStore
from multimodule.transit.lowlevel import LocalQueue, Overflow, SysvQueue

#: Messages a task here may be behind on its in-memory queue before sends to it from this
#: process go through its System V queue (see the module docstring).
LOCAL_HIGH_WATER = 1024
#: ... and under how many they go in memory again (once nothing of theirs is outside memory).
LOCAL_LOW_WATER = 256


class Delivery:
    """See the module docstring. ``store``: where journals live; ``enabled``: journals are
    made at all (``--no-journal`` turns them off); ``fsync``: see :class:`Journal`.
    ``report(text)``: an error to report (a journal that cannot be written)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, store: StateStore, *,
                 enabled: bool, fsync: bool, report: Callable[[str], None]):
        self.loop = loop
        self.store = store
        self.enabled = enabled
        self.fsync = fsync
        self.report = report
        self.overflow: Overflow | None = None
        #: ``qname -> (local queue, System V queue)`` of the tasks here that take input from
        #: their System V queue too: those whose in-memory sends may spill there.
        self.spillable: dict[str, tuple[LocalQueue, SysvQueue]] = {}
        self._spilling: set[str] = set()
        #: Tasks that said they cannot keep up for now (:meth:`stall`).
        self.stalled: set[str] = set()
        #: ``producer -> consumer``: tasks held back until a task they sent to catches up.
        self.held_for: dict[str, str] = {}
        #: ``consumer -> producers`` held back for it.
        self.holding: dict[str, set[str]] = {}
        self._dirty: set[Journal] = set()
        self._flush_scheduled = False
        self._waiters: list[asyncio.Future] = []

    def journal_for(self, task: str) -> Journal | None:
        """A journal for ``task`` (``None`` when journals are off). Raises
        :class:`ConfigError` if its directory is refused."""
        if not self.enabled:
            return None
        return Journal(self.store.journal_dir(task), fsync=self.fsync)

    # -- journals --------------------------------------------------------------------------

    def journal_written(self, journal: Journal) -> None:
        """``journal`` has buffered records: write it at the end of this turn of the loop."""
        self._dirty.add(journal)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush_dirty)

    def _flush_dirty(self) -> None:
        self._flush_scheduled = False
        try:
            self.flush_journals()
        except StateError as exc:
            self.report(f"{exc}; retrying at the next write")

    def flush_journals(self) -> None:
        """Write every journal with buffered records now. Raises :class:`StateError` (the
        others are still written; the failed one stays buffered for the next try)."""
        dirty, self._dirty = self._dirty, set()
        failed: StateError | None = None
        for journal in dirty:
            try:
                journal.flush()
            except StateError as exc:
                self._dirty.add(journal)
                failed = exc
        if failed is not None:
            raise failed

    def forget(self, journal: Journal) -> None:
        """``journal`` was closed (its task left the process)."""
        self._dirty.discard(journal)

    # -- backpressure ----------------------------------------------------------------------

    def spill_path(self, task: str, local: LocalQueue, sysv: SysvQueue) -> None:
        """Task ``task`` here takes input from ``local`` and, through its receiver, from
        ``sysv``: sends to it may spill there."""
        self.spillable[task] = (local, sysv)

    def forget_task(self, task: str) -> None:
        """Task ``task`` left this process (what it held back goes on)."""
        self.spillable.pop(task, None)
        self._spilling.discard(task)
        self.stalled.discard(task)
        self._release(task)
        consumer = self.held_for.pop(task, None)
        if consumer is not None:
            self.holding.get(consumer, set()).discard(task)

    def behind(self, task: str) -> bool:
        """Whether task ``task`` here has :data:`LOCAL_HIGH_WATER` messages or more waiting
        in memory."""
        queues = self.spillable.get(task)
        return queues is not None and len(queues[0]) >= LOCAL_HIGH_WATER

    def hold_back(self, producer: str, consumer: str) -> None:
        """``producer`` sent in memory to ``consumer``, which is :meth:`behind`: hold it back
        (see the module docstring) unless ``consumer`` waits, directly or through others, on
        ``producer``, or ``producer`` waits already."""
        if producer in self.held_for:
            return
        waiter = consumer
        while waiter is not None:
            if waiter == producer:
                return  # a cycle: this one keeps going, so that the others catch up
            waiter = self.held_for.get(waiter)
        self.held_for[producer] = consumer
        self.holding.setdefault(consumer, set()).add(producer)

    def caught_up(self, consumer: str, waiting: int) -> None:
        """``consumer`` has ``waiting`` messages left in memory after a batch: at
        :data:`LOCAL_LOW_WATER` or fewer, what it held back goes on."""
        if waiting <= LOCAL_LOW_WATER and consumer in self.holding:
            self._release(consumer)

    def _release(self, consumer: str) -> None:
        producers = self.holding.pop(consumer, None)
        if producers:
            for producer in producers:
                self.held_for.pop(producer, None)
            self._wake()

    def spilling(self, qname: str) -> bool:
        """Whether sends from this process to task ``qname`` (running here) go through its
        System V queue now rather than in memory (see the module docstring)."""
        if qname not in self._spilling:
            overflow = self.overflow
            if (overflow is None or not overflow.full) and not self.stalled:
                return False  # the common case: nobody is paused
            queues = self.spillable.get(qname)
            if queues is None or len(queues[0]) < LOCAL_HIGH_WATER:
                return False
            if qname not in self.stalled and not self.blocked(qname):
                return False
            # What was sent in memory so far is written before anything goes the other way:
            # a message on the System V queue survives a kill at once, and must not be found
            # there after a restart without the ones sent before it.
            self._flush_dirty()
            self._spilling.add(qname)
            return True
        local, sysv = self.spillable[qname]
        try:
            waiting = sysv.stat().messages
        except TransitError:  # removed under us: nothing of ours waits there
            waiting = 0
        if len(local) > LOCAL_LOW_WATER or qname in self.overflow.senders or waiting:
            return True
        self._spilling.discard(qname)
        return False

    def stall(self, task: str, stalled: bool) -> None:
        """Task ``task`` says it cannot keep up for now (``stalled``: its handler waits on
        something outside, such as the Bridge on NATS servers that are away), or that it can
        again: while stalled it is treated as paused (see :meth:`spilling`)."""
        if stalled:
            self.stalled.add(task)
        else:
            self.stalled.discard(task)

    def on_room(self) -> None:
        """The overflow has room again, or sent a task's last held message (any thread)."""
        try:
            self.loop.call_soon_threadsafe(self._wake)
        except RuntimeError:  # the loop is closed: we are exiting
            pass

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def blocked(self, task: str) -> bool:
        """Whether ``task`` must take no input now: it is held back for a task here that is
        behind, or the overflow is full and holds messages it sent."""
        if task in self.held_for:
            return True
        overflow = self.overflow
        return overflow is not None and overflow.full and overflow.holds_from(task)

    async def wait_unblocked(self, task: str) -> None:
        """Return once :meth:`blocked` is false for ``task``."""
        await self._wait_while(self.blocked, task)

    async def wait_released(self, task: str) -> None:
        """Return once no message ``task`` sent waits in the overflow."""
        await self._wait_while(self.holds_from, task)

    async def _wait_while(self, condition: Callable[[str], bool], task: str) -> None:
        # Re-checked at every wake-up the overflow sends (see on_room).
        while condition(task):
            waiter = self.loop.create_future()
            self._waiters.append(waiter)
            await waiter

    def holds_from(self, task: str) -> bool:
        """Whether messages ``task`` sent wait in the overflow."""
        overflow = self.overflow
        return overflow is not None and overflow.holds_from(task)
