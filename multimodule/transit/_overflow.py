"""Ordered overflow for full System V queues: sends that must not block the event loop.

A process that hosts tasks on an asyncio loop cannot wait for room in a full System V queue.
:class:`Overflow` sends at once when there is room; otherwise the message joins a per-queue
:class:`_OverflowSender` whose thread waits for room and sends in order. While a queue's sender
holds messages, later sends to that queue join it, so order per queue is kept. A sender that
has emptied retires (under the overflow's lock), and the next send tries the fast path again.

A queue removed under a sender (``ipcrm``, logind's ``RemoveIPC=``) is opened again, which
creates it anew, and sending goes on. What is still held when the process stops can be kept in
taken with :meth:`Overflow.stop_and_take` (the host keeps it in its state directory) and sent
at the next start with :meth:`Overflow.resend`.

:meth:`Overflow.limit_creations` bounds the System V queues its sends create (a token bucket,
consulted only for a name this process has not opened yet and that has no live queue): a send
that would create one over the rate raises :class:`QueueCreationRefused` to its caller, who
hears of it (a task's handler fails and is reported), rather than being held, which would keep
a flood in memory and still create every queue.

What is held is bounded in bytes (``max_bytes``): past it, :attr:`Overflow.full` is true, and
the host pauses every task that has messages held (:meth:`Overflow.holds_from`) until the
overflow has room again (``on_room`` is called, from a sender's thread, when it falls back
under the bound), so backpressure reaches those tasks' own senders through their full queues
instead of growing memory. Each held message remembers its ``origin`` (the task that sent it):
a task's checkpoint waits until nothing it sent is held, so a message held here and lost with
the process is made again from its sender's journal.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from typing import Any, Callable

from multimodule.errors import QueueCreationRefused, QueueFull, QueueRemoved, TransitError
from multimodule.transit import _wire

#: Seconds of each wait for room, between two looks at the stop flag.
WAIT_S = 0.5
#: Seconds between two attempts after an error other than a full or removed queue.
RETRY_S = 1.0

Report = Callable[[str, str], None]

#: Default bound of what an :class:`Overflow` holds, in bytes of encoded messages.
DEFAULT_MAX_BYTES = 16 * 1024 * 1024


def _compact(body: bytes) -> bytes:
    """A copy of ``body`` in a block of its own size. orjson writes into a buffer of a few KiB
    and shrinks it in place: kept as it is, each held message would pin about 4 KiB of the
    heap (measured: 4,171 bytes of RSS per held 158-byte message; 255 with the copy)."""
    return memoryview(body).tobytes()


class _CreationBucket:
    """A token bucket: ``rate`` new queues per second, at most ``burst`` at once, on
    ``clock`` (seconds)."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float]):
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.tokens = float(burst)
        self.stamp = clock()
        self.refused = 0
        self.lock = threading.Lock()

    def take(self, qname: str) -> None:
        """One token for creating ``qname``; raises :class:`QueueCreationRefused` if none."""
        with self.lock:
            now = self.clock()
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= 1:
                self.tokens -= 1
                return
            self.refused += 1
        raise QueueCreationRefused(
            f"queue {qname!r} does not exist and was not created, nothing sent: this process "
            f"creates at most {self.rate:g} new System V queues per second ({self.burst} at "
            "once)")


class _OverflowSender:
    """Messages for one full queue, sent in order by a thread of its own."""

    def __init__(self, overflow: Overflow, qname: str, when_sent: Callable[[], None] | None):
        self.overflow = overflow
        self.qname = qname
        self.when_sent = when_sent
        self.items: deque[tuple[bytes, str | None]] = deque()
        self.retired = False
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"mm-overflow:{qname}",
                                       daemon=True)

    def _run(self) -> None:
        overflow = self.overflow
        queue = overflow.transit.sysv_queue(self.qname)
        while not self.stopping.is_set():
            with overflow.lock:
                if not self.items:
                    self.retired = True
                    if overflow.senders.get(self.qname) is self:
                        del overflow.senders[self.qname]
                    break
                body = self.items[0][0]
            try:
                queue.send_body(body, WAIT_S)
            except QueueFull:
                continue
            except QueueRemoved:
                try:
                    queue.reopen()  # creates it anew: its readers open the name again too
                except TransitError as exc:
                    overflow.report("error", f"queue {self.qname!r} was removed and cannot "
                                             f"be made again: {exc}; retrying in {RETRY_S:g} s")
                    self.stopping.wait(RETRY_S)
                continue
            except TransitError as exc:
                overflow.report("error", f"overflow for queue {self.qname!r}: {exc}; "
                                         f"retrying in {RETRY_S:g} s")
                self.stopping.wait(RETRY_S)
                continue
            with overflow.lock:
                overflow.forget(self.items.popleft())
        else:
            return  # stopped: stop_and_take has what is left
        if self.when_sent is not None:
            self.when_sent()


class Overflow:
    """Sends to System V queues that never block the caller; see the module docstring.

    ``transit``: the :class:`~multimodule.transit.Transit` to send through. ``report``: called
    (from any thread) with ``(channel, text)``: ``"debug"`` when a queue starts overflowing,
    ``"error"`` when sending runs into trouble. ``max_bytes``: the bound of what is held (see
    :attr:`full`); ``on_room``: called (from a sender's thread) when what is held falls back
    under it.
    """

    def __init__(self, transit: Any, report: Report, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 on_room: Callable[[], None] | None = None):
        self.transit = transit
        self.report = report
        self.max_bytes = max_bytes
        self.on_room = on_room
        self.lock = threading.Lock()
        self.senders: dict[str, _OverflowSender] = {}
        #: Bytes of the messages held now.
        self.held_bytes = 0
        self._held_from: dict[str, int] = {}
        self._creations: _CreationBucket | None = None

    @property
    def full(self) -> bool:
        """Whether what is held has reached ``max_bytes``: the tasks whose messages are held
        should take no input until ``on_room`` says otherwise."""
        return self.held_bytes >= self.max_bytes

    def holds_from(self, origin: str) -> bool:
        """Whether a message sent with ``origin`` is held now (not yet on its queue)."""
        return origin in self._held_from

    def _remember(self, items: list[tuple[bytes, str | None]]) -> None:
        # Under self.lock.
        for body, origin in items:
            self.held_bytes += len(body)
            if origin is not None:
                self._held_from[origin] = self._held_from.get(origin, 0) + 1

    def forget(self, item: tuple[bytes, str | None]) -> None:
        """Account for one held message gone (sent, or taken to be kept); under ``lock``."""
        body, origin = item
        was_full = self.held_bytes >= self.max_bytes
        self.held_bytes -= len(body)
        if origin is not None:
            left = self._held_from[origin] - 1
            if left:
                self._held_from[origin] = left
            else:
                del self._held_from[origin]
        if (was_full and self.held_bytes < self.max_bytes) or origin is not None and \
                origin not in self._held_from:
            if self.on_room is not None:
                self.on_room()

    def limit_creations(self, rate: float, burst: int, *,
                        clock: Callable[[], float] = time.monotonic) -> None:
        """From now on, let :meth:`send` create at most ``rate`` new System V queues per
        second, ``burst`` at once (a token bucket, full to start with; ``clock``: for tests).
        A queue that exists already (made by anyone) is no creation. Refusals count in
        :attr:`creations_refused`."""
        self._creations = _CreationBucket(rate, burst, clock)

    @property
    def creations_refused(self) -> int:
        """Sends refused because they would have created a queue over the limit."""
        return self._creations.refused if self._creations is not None else 0

    # -- sending ---------------------------------------------------------------------------

    def send(self, qname: str, message: dict[str, Any], *, origin: str | None = None,
             **meta: Any) -> None:
        """Send ``message`` to System V queue ``qname`` now if it has room, else hold it
        behind the messages already held for that queue. Never blocks. ``origin``: the task
        that sends it (see :meth:`holds_from`); ``meta``: extra ``.ipc_transit_meta`` keys.
        Raises the transit's usage errors (:class:`InvalidQueueName`,
        :class:`UnserializableMessage`), :class:`TransitBroken` if the queue cannot be opened,
        and :class:`QueueCreationRefused` if it would be created over
        :meth:`limit_creations`."""
        if qname in self.senders:  # without the lock first: most queues never overflow
            body = _compact(_wire.encode_body(message, _wire.meta_for(message, meta)))
            with self.lock:
                sender = self.senders.get(qname)
                if sender is not None and not sender.retired:
                    sender.items.append((body, origin))
                    self._remember([(body, origin)])
                    return
        creations = self._creations
        if creations is not None and self.transit.sysv_queue_if_exists(qname) is None:
            creations.take(qname)
        try:
            self.transit.send_sysv(qname, message, timeout=0, **meta)
            return
        except QueueFull:
            pass
        self._hold(qname, [(_compact(_wire.encode_body(message, _wire.meta_for(message, meta))),
                            origin)])
        self.report("debug", f"queue {qname!r} is full; holding its messages in order")

    def _hold(self, qname: str, items: list[tuple[bytes, str | None]],
              when_sent: Callable[[], None] | None = None) -> None:
        with self.lock:
            self._remember(items)
            sender = self.senders.get(qname)
            if sender is not None and not sender.retired:
                sender.items.extend(items)
                return
            sender = _OverflowSender(self, qname, when_sent)
            sender.items.extend(items)
            self.senders[qname] = sender
        sender.thread.start()

    # -- figures ---------------------------------------------------------------------------

    def depths(self) -> dict[str, int]:
        """Queue name -> messages held for it now."""
        with self.lock:
            return {qname: len(s.items) for qname, s in self.senders.items() if s.items}

    @property
    def held(self) -> int:
        """Messages held for all queues."""
        with self.lock:
            return sum(len(s.items) for s in self.senders.values())

    # -- stopping --------------------------------------------------------------------------

    def _join_all(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for sender in list(self.senders.values()):
            sender.thread.join(max(0.0, deadline - time.monotonic()))
        return not self.held

    async def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds (all queues at once) for every held message to be
        sent; return whether none is left."""
        if not self.senders:
            return True
        return await asyncio.get_running_loop().run_in_executor(None, self._join_all, timeout)

    def stop_and_take(self) -> dict[str, list[tuple[bytes, str | None]]]:
        """Stop every sender (each within ``WAIT_S``) and return what they still hold:
        queue name -> ``(encoded body, origin)`` in order (for the caller to keep and
        :meth:`resend` at the next start)."""
        with self.lock:
            senders = list(self.senders.values())
        for sender in senders:
            sender.stopping.set()
        for sender in senders:
            sender.thread.join()
        out = {}
        with self.lock:
            for sender in senders:
                sender.retired = True
                if self.senders.get(sender.qname) is sender:
                    del self.senders[sender.qname]
                if sender.items:
                    out[sender.qname] = list(sender.items)
                    for item in sender.items:
                        self.forget(item)
                    sender.items.clear()
        return out

    def resend(self, qname: str, bodies: list[bytes],
               when_sent: Callable[[], None] | None = None) -> None:
        """Send encoded ``bodies`` (from :meth:`stop_and_take` of an earlier run) to ``qname``
        in order, behind anything held for it; ``when_sent`` is called (on the sender's
        thread) once they are all sent."""
        self._hold(qname, [(body, None) for body in bodies], when_sent)
