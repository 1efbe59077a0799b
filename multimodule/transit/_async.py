"""Bringing a System V queue's messages to an asyncio event loop without polling.

``sysv_ipc`` offers no file descriptor to watch, so one worker thread per queue blocks in
``msgrcv`` and hands each message to the loop. Hand-over is batched: the thread appends to a
deque and schedules one drain callback with ``loop.call_soon_threadsafe`` only when none is
pending, so a burst costs one loop wake-up, not one per message. At most ``max_pending``
messages wait between the thread and the loop; beyond that the thread stops taking from the
queue, so a slow consumer pushes back on senders through the full System V queue instead of
growing memory.

With ``commit`` (a receiver whose consumer journals what it is given), nothing is taken off
the kernel queue before it is safe elsewhere: the worker waits until the queue holds a message
without taking it, copies up to ``max_pending`` messages (``MSG_COPY``), hands them to the loop,
which delivers them and calls ``commit()`` (the journal's write), and only then takes them off
the queue. A kill of the process at any point loses nothing: before the commit the messages
are still in the kernel queue, after it in the journal. Between the commit and the take the
same messages are in both: after a restart, those whose ids are in ``skip_ids`` (the
journal's last ids) are taken off without being delivered again. A spill file is removed only
after its reference is taken. On a kernel without ``MSG_COPY`` the receiver takes as it
would without ``commit`` (and says so once in :attr:`copy_unsupported`).

An ``intercept`` callable, when given, sees each message on the worker thread first and may
take care of it there (it is then not handed over): for answers that must not wait for a loop
that may be blocked (the control server's ``status`` while a task's handler holds the loop).

``EINTR`` (``"Signaled while waiting"``) is retried; stopping sends the thread the interrupt
signal (see ``_interrupt``) until it has left ``msgrcv``, so no message is taken after
:meth:`AsyncReceiver.stop` returns and none taken before it is lost.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Any, Callable

from multimodule.errors import BadMessage, Cancelled, QueueRemoved, TransitError
from multimodule.transit._interrupt import Interrupter, ensure_handler
from multimodule.transit._sysv import SysvQueue
from multimodule.transit._wire import META_KEY

Deliver = Callable[[dict[str, Any]], None]

#: The worker's request, queued behind a batch, that the loop commit it.
_COMMIT = object()
OnError = Callable[[TransitError], None]
#: ``intercept(message) -> bool``, on the worker thread: whether it took care of ``message``.
Intercept = Callable[[dict[str, Any]], bool]


class AsyncReceiver:
    """Feeds messages from one System V queue to ``deliver(message)`` on ``loop``.

    ``deliver`` runs on the loop, once per message, in queue order. ``on_error`` (on the loop)
    gets each :class:`BadMessage` (the receiver goes on with the next message) and any other
    :class:`TransitError` (after :class:`QueueRemoved` the name is opened again and receiving
    goes on; after other errors the receiver stops and :attr:`error` holds the error).
    ``intercept`` (see :data:`Intercept`) runs on the worker thread for each decoded message
    before it is handed over; a message it took care of (``True``) is not delivered. It must
    not block; if it raises, the message is delivered as usual.

    Must be started on the loop's thread; the main thread is best, so that the interrupt
    handler can be installed (raises :class:`TransitError` if it cannot be).
    """

    def __init__(
        self,
        queue: SysvQueue,
        deliver: Deliver,
        *,
        on_error: OnError | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        max_pending: int = 64,
        backlog: Callable[[], int] | None = None,
        high_water: int = 256,
        commit: Callable[[], None] | None = None,
        intercept: Intercept | None = None,
    ):
        self.queue = queue
        self.deliver = deliver
        self.on_error = on_error
        self.intercept = intercept
        self.loop = loop
        self.max_pending = max_pending
        self.backlog = backlog
        self.high_water = high_water
        self._resume = threading.Event()
        self._throttled = False
        self.error: TransitError | None = None
        self.received = 0
        self._pending: deque[dict[str, Any] | TransitError] = deque()
        self._drain_scheduled = False
        self._room = threading.Semaphore(max_pending)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        # Guards _exited and _interrupter: no signal may be sent to the worker once it has
        # begun to exit (pthread_kill on a finished thread is undefined behaviour).
        self._exit_lock = threading.Lock()
        self._exited = False
        self._interrupter: Interrupter | None = None
        self.commit = commit
        #: Ids of messages already journaled (the journal's last): taken off, not delivered,
        #: when the first messages found on the queue after a start are among them.
        self.skip_ids: set[str] = set()
        #: Set when this kernel cannot copy a message (``MSG_COPY``): taking as without commit.
        self.copy_unsupported = False
        self._batch_done = threading.Event()
        self._commit_ok = False

    @property
    def throttled(self) -> bool:
        """Whether the worker leaves messages in the kernel queue now (backpressure: the
        consumer is ``high_water`` messages behind)."""
        return self._throttled

    @property
    def pending(self) -> int:
        """Messages (and errors) taken off the queue and not yet handed to ``deliver``."""
        return len(self._pending)

    @property
    def native_id(self) -> int | None:
        """The worker thread's kernel thread id (``/proc/self/task/ID``), or ``None``."""
        return self._thread.native_id if self._thread is not None else None

    @property
    def running(self) -> bool:
        """Whether the worker thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the worker thread. Raises :class:`TransitError` if it cannot be stopped later."""
        if self._thread is not None:
            raise TransitError(f"receiver for {self.queue.qname!r} already started")
        if not ensure_handler():
            raise TransitError(
                "cannot install the SIGURG interrupt handler (not on the main thread, or the "
                "signal is ignored); start the first receiver from the main thread"
            )
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        self._thread = threading.Thread(
            target=self._run, name=f"mm-recv:{self.queue.qname}", daemon=True
        )
        self._thread.start()

    # -- worker thread ---------------------------------------------------------------------

    def _is_stopping(self) -> bool:
        return self._stopping

    def _run(self) -> None:
        try:
            if self.commit is not None and self._run_committed():
                return
            while not self._stopping:
                self._wait_for_backlog()
                self._room.acquire()
                # The room is kept only by a message handed over; _drain gives it back.
                delivered = False
                try:
                    if self._stopping:
                        return
                    delivered = self._take_one()
                    if delivered is None:
                        return
                finally:
                    if not delivered:
                        self._room.release()
        finally:
            with self._exit_lock:
                self._exited = True
                if self._interrupter is not None:
                    self._interrupter.disarm()
            self._done.set()

    def _run_committed(self) -> bool:
        """The worker's loop with ``commit``; returns ``False`` to fall back to taking (no
        ``MSG_COPY``), ``True`` when done."""
        queue = self.queue
        while not self._stopping:
            self._wait_for_backlog()
            if self._stopping:
                break
            try:
                queue.wait_for_message(self._is_stopping)
                payloads = queue.copy_payloads(self.max_pending)
            except Cancelled:
                break
            except BadMessage as exc:
                self._hand_over(exc)
                continue
            except QueueRemoved as exc:
                self._hand_over(exc)
                try:
                    queue.reopen()
                except TransitError as exc2:
                    self._hand_over(exc2, fatal=True)
                    break
                continue
            except TransitError as exc:
                if not self._stopping:
                    self._hand_over(exc, fatal=True)
                break
            if payloads is None:
                self.copy_unsupported = True
                return False
            if not payloads:
                continue
            batch: list[dict[str, Any] | TransitError] = []
            for payload in payloads:
                try:
                    message = queue.decode(payload, keep_spill=True)
                except BadMessage as exc:
                    batch.append(exc)
                    continue
                if self.skip_ids:
                    meta = message.get(META_KEY)
                    if meta.__class__ is dict and meta.get("id") in self.skip_ids:
                        continue  # journaled before the last stop; only the take was left
                    self.skip_ids = set()
                if self.intercept is not None:
                    try:
                        if self.intercept(message):
                            continue  # taken care of here; taken off with the batch
                    except Exception:  # noqa: BLE001 - documented: the message goes to the loop
                        pass
                batch.append(message)
            self.skip_ids = set()
            self._batch_done.clear()
            for item in batch:
                self._hand_over(item)
            if not self._hand_over_commit():
                break  # the commit failed: what was copied stays on the queue
            try:
                queue.discard(len(payloads))
            except TransitError as exc:
                self._hand_over(exc, fatal=True)
                break
            for payload in payloads:
                queue.remove_spill_of(payload)
        return True

    def _hand_over_commit(self) -> bool:
        # Wait until the loop delivered the batch and committed it; False if it failed.
        self._pending.append(_COMMIT)
        if not self._drain_scheduled:
            self._drain_scheduled = True
            try:
                self.loop.call_soon_threadsafe(self._drain)
            except RuntimeError:
                self._drain_scheduled = False
                return False
        self._batch_done.wait()
        return self._commit_ok

    def _take_one(self) -> bool | None:
        """Receive and hand over one message: ``True`` if a message was handed over,
        ``False`` if an error was reported and receiving goes on, ``None`` to stop."""
        try:
            payload = self.queue.receive_payload(None, self._is_stopping)
        except Cancelled:
            return None
        except QueueRemoved as exc:
            self._hand_over(exc)
            try:
                self.queue.reopen()
            except TransitError as exc2:
                self._hand_over(exc2, fatal=True)
                return None
            return False
        except TransitError as exc:
            if not self._stopping:
                self._hand_over(exc, fatal=True)
            return None
        try:
            message = self.queue.decode(payload)
        except BadMessage as exc:
            self._hand_over(exc)
            return False
        if self.intercept is not None:
            try:
                if self.intercept(message):
                    return False
            except Exception:  # noqa: BLE001 - documented: the message goes to the loop
                pass
        self._hand_over(message)
        return True

    def _wait_for_backlog(self) -> None:
        # Leave messages in the kernel queue (where they survive a crash of this process, and
        # senders feel backpressure) while the consumer is behind by high_water or more.
        backlog = self.backlog
        if backlog is None or backlog() < self.high_water:
            return
        self._resume.clear()
        self._throttled = True
        while not self._stopping and backlog() >= self.high_water:
            self._resume.wait()
            self._resume.clear()
        self._throttled = False

    def consumed(self) -> None:
        """Tell the worker the consumer made progress (call on the loop after handling)."""
        if self._throttled and self.backlog() < self.high_water:
            self._resume.set()

    def _hand_over(self, item: dict[str, Any] | TransitError, fatal: bool = False) -> None:
        if fatal:
            self.error = item  # type: ignore[assignment]
        self._pending.append(item)
        if not self._drain_scheduled:
            self._drain_scheduled = True
            try:
                self.loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # loop closed: stop() drains what is left
                self._drain_scheduled = False

    # -- event loop ------------------------------------------------------------------------

    def _drain(self) -> None:
        # Reset the flag before popping: an item appended after the last pop schedules anew.
        self._drain_scheduled = False
        pending = self._pending
        committed = self.commit is not None
        while pending:
            item = pending.popleft()
            if item.__class__ is dict:
                if not committed:
                    self._room.release()
                self.received += 1
                self.deliver(item)
            elif item is _COMMIT:
                try:
                    self.commit()
                    self._commit_ok = True
                except Exception as exc:  # the journal cannot be written: stop taking
                    self._commit_ok = False
                    self.error = TransitError(f"receiving from {self.queue.qname!r} stopped: "
                                              f"what it took could not be made safe: {exc}")
                    if self.on_error is not None:
                        self.on_error(self.error)
                self._batch_done.set()
            elif self.on_error is not None:
                self.on_error(item)

    async def stop(self) -> None:
        """Stop the worker thread and deliver every message it already took off the queue."""
        if self._thread is None:
            return
        self._stopping = True
        self._drain()  # in case the worker waits for a commit
        self._room.release()  # in case the thread waits for room
        self._resume.set()  # in case it waits for the backlog
        with self._exit_lock:
            if not self._exited and self._interrupter is None:
                self._interrupter = Interrupter(self._thread.ident, None)
                self._interrupter.fire_now()
        if not self._done.is_set():
            await asyncio.get_running_loop().run_in_executor(None, self._done.wait)
        self._thread.join()
        self._drain()
