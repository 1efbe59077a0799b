"""In-memory queues for queues a process declared *local*.

A send to a local queue appends the receiver's own copy of the message (see
``_wire.copy_message``) to a deque: no system call, no wire format. One asyncio consumer (the
task that owns the queue) or any number of threads may receive; producers may be on any thread.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import deque
from typing import Any, Callable

from multimodule.errors import Empty, TransitError
from multimodule.transit._sysv import QueueStat
from multimodule.transit._wire import META_KEY


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class LocalQueue:
    """An unbounded FIFO of message dicts inside this process.

    ``messages_in``/``messages_out`` count puts and gets; ``depth`` is ``len(queue)``.
    ``recorder``: if set, called with each message :meth:`put` appends, before it is
    appended (the host journals a task's input there); :meth:`put_many` bypasses it.
    """

    def __init__(self, qname: str):
        self.qname = qname
        self._items: deque[dict[str, Any]] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._sync_waiters = 0
        self._waiter: asyncio.Future | None = None
        self._waiter_loop: asyncio.AbstractEventLoop | None = None
        self._waiter_thread: int | None = None
        self.messages_in = 0
        self.messages_out = 0
        self.last_get_time: float | None = None
        self.recorder: Callable[[dict[str, Any]], None] | None = None

    def __len__(self) -> int:
        return len(self._items)

    @property
    def waiting(self) -> deque[dict[str, Any]]:
        """The waiting messages, oldest first: for a consumer's cheap "anything left?" check
        between :meth:`get_nowait` calls (read it, never change it)."""
        return self._items

    @property
    def depth(self) -> int:
        """Messages waiting."""
        return len(self._items)

    def put(self, message: dict[str, Any]) -> None:
        """Append ``message`` (already the receiver's own copy; given to :attr:`recorder`
        first) and wake a waiting receiver."""
        if self.recorder is not None:
            self.recorder(message)
        self._items.append(message)
        self.messages_in += 1
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if threading.get_ident() == self._waiter_thread:
                if not waiter.done():
                    waiter.set_result(None)
            else:
                self._waiter_loop.call_soon_threadsafe(_wake, waiter)
        if self._sync_waiters:
            with self._cond:
                self._cond.notify()

    def put_many(self, messages: list[dict[str, Any]]) -> None:
        """Append ``messages`` in order without giving them to :attr:`recorder` (messages
        delivered again from a journal); wakes a waiting receiver."""
        if not messages:
            return
        recorder, self.recorder = self.recorder, None
        try:
            for message in messages:
                self.put(message)
        finally:
            self.recorder = recorder

    def get_nowait(self) -> dict[str, Any]:
        """The next message; raises :class:`Empty` if there is none."""
        try:
            item = self._items.popleft()
        except IndexError:
            raise Empty(f"local queue {self.qname!r} is empty") from None
        self.messages_out += 1
        self.last_get_time = time.time()
        return item

    def get(self, timeout: float | None = None) -> dict[str, Any]:
        """The next message, waiting up to ``timeout`` seconds (``None``: for ever).

        Raises :class:`Empty` when the time is up.
        """
        if self._items:
            return self.get_nowait()
        if timeout is not None and timeout <= 0:
            raise Empty(f"local queue {self.qname!r} is empty")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._sync_waiters += 1
            try:
                while not self._items:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise Empty(f"no message on local queue {self.qname!r} within {timeout} s")
                    self._cond.wait(remaining)
            finally:
                self._sync_waiters -= 1
        return self.get_nowait()

    async def get_async(self) -> dict[str, Any]:
        """The next message, awaiting one if the queue is empty (one async consumer at a time).

        Raises :class:`TransitError` if another coroutine is already waiting on this queue.
        """
        while not self._items:
            if self._waiter is not None and not self._waiter.done():
                raise TransitError(f"local queue {self.qname!r} already has an async consumer")
            loop = asyncio.get_running_loop()
            fut = loop.create_future()
            self._waiter_loop = loop
            self._waiter_thread = threading.get_ident()
            self._waiter = fut
            if self._items:  # a producer on another thread appended before seeing the waiter
                self._waiter = None
                break
            try:
                await fut
            finally:
                if self._waiter is fut:
                    self._waiter = None
        return self.get_nowait()

    def drain(self) -> list[dict[str, Any]]:
        """Remove and return every waiting message, oldest first."""
        items = []
        while self._items:
            items.append(self._items.popleft())
        self.messages_out += len(items)
        return items

    @property
    def last_put_time(self) -> float | None:
        """When the newest waiting message was sent (its ``send_ts``), else ``None``."""
        if not self._items:
            return None
        meta = self._items[-1].get(META_KEY)
        return meta.get("send_ts") if isinstance(meta, dict) else None

    def stat(self) -> QueueStat:
        """This queue's figures (``kind="local"``; bytes and capacity are ``None``; the last
        send time is that of the newest waiting message)."""
        return QueueStat(
            name=self.qname,
            kind="local",
            messages=len(self._items),
            bytes=None,
            max_bytes=None,
            last_send_pid=os.getpid() if self.last_put_time else None,
            last_send_time=self.last_put_time,
            last_receive_pid=os.getpid() if self.last_get_time else None,
            last_receive_time=self.last_get_time,
        )
