"""Interrupting a thread that is blocked in a System V call.

``msgsnd``/``msgrcv`` have no timeout and no file descriptor, and Linux never restarts them after
a signal handler ran (signal(7), "Interruption of system calls"): they fail with ``EINTR``, which
``sysv_ipc`` raises as ``sysv_ipc.Error("Signaled while waiting")``. So a timed wait is a blocking
call plus a signal sent to the waiting thread at the deadline (``pthread_kill``), and stopping a
receiver thread is the same signal. The signal is ``SIGURG``, whose default action is to ignore it
and which programs rarely use; the Go runtime interrupts its threads with it for the same reason.

A Python-level handler must be installed for the signal to interrupt anything (an ignored signal
is discarded without interrupting). :func:`ensure_handler` installs a no-op one when the
signal's disposition is still the default and we are on the main thread; where that is not
possible the callers fall back to a bounded backoff (documented where it applies).
"""

from __future__ import annotations

import heapq
import signal
import threading
import time

import sysv_ipc

INTERRUPT_SIGNAL = signal.SIGURG

#: After the first signal, how often it is repeated (seconds) until the waiter has noticed: closes
#: the window where the signal lands just before the thread enters the blocking call.
_REPEAT_S = 0.01


def _ignore(signum, frame):  # noqa: ARG001 - signal handler signature
    """No-op handler: its only job is to make the blocking call return EINTR."""


def ensure_handler() -> bool:
    """Make :data:`INTERRUPT_SIGNAL` able to interrupt blocking calls; return whether it can.

    Installs a no-op handler if the disposition is the default and this is the main thread.
    Returns ``False`` if the signal is ignored (``SIG_IGN``) or no handler can be installed.
    """
    handler = signal.getsignal(INTERRUPT_SIGNAL)
    if callable(handler):
        return True
    if handler == signal.SIG_IGN or handler is None:
        return False
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(INTERRUPT_SIGNAL, _ignore)
    return True


def is_eintr(exc: BaseException) -> bool:
    """Whether ``exc`` is ``sysv_ipc``'s report of ``EINTR``."""
    return type(exc) is sysv_ipc.Error and "Signaled" in str(exc)


class _AlarmClock:
    """One long-lived thread per process that sends the interrupt signal at deadlines.

    Arming and disarming cost a heap push and a condition notify (microseconds), where a
    thread per timed wait cost about 170 µs. Signals are sent with the clock's lock held, and
    :meth:`Interrupter.disarm` takes that lock, so no signal follows a disarm.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.heap: list[tuple[float, int, Interrupter]] = []
        self.seq = 0
        self.live = 0  # armed interrupters
        self.thread: threading.Thread | None = None

    def arm(self, interrupter: Interrupter, at: float) -> None:
        with self.cond:
            # The alarm thread only needs waking when this deadline comes before the one it
            # waits for (disarmed entries stay in the heap until due, so that is rare).
            wake = not self.heap or at < self.heap[0][0]
            if len(self.heap) > 1024 and len(self.heap) > 4 * self.live:
                # Mostly disarmed entries: drop them, so many timed waits cannot pile up.
                self.heap = [entry for entry in self.heap if entry[2].armed]
                heapq.heapify(self.heap)
            if not interrupter.counted:
                interrupter.counted = True
                self.live += 1
            self.seq += 1
            heapq.heappush(self.heap, (at, self.seq, interrupter))
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="mm-alarm", daemon=True)
                self.thread.start()
            if wake:
                self.cond.notify()

    def _run(self) -> None:
        with self.cond:
            while True:
                if not self.heap:
                    self.cond.wait()
                    continue
                at, _, interrupter = self.heap[0]
                delay = at - time.monotonic()
                if delay > 0:
                    self.cond.wait(delay)
                    continue
                heapq.heappop(self.heap)
                if not interrupter.armed:
                    continue
                try:
                    signal.pthread_kill(interrupter.thread_id, INTERRUPT_SIGNAL)
                except ProcessLookupError:
                    interrupter._disarm_locked()  # the thread is gone
                    continue
                self.seq += 1
                heapq.heappush(self.heap, (time.monotonic() + _REPEAT_S, self.seq, interrupter))


_clock = _AlarmClock()


class Interrupter:
    """Sends :data:`INTERRUPT_SIGNAL` to one thread at a deadline until disarmed.

    ``thread_id``: a ``threading.get_ident()`` value. ``at``: a ``time.monotonic()`` deadline, or
    ``None`` to wait for :meth:`fire_now`. The signal is repeated every 10 ms after the deadline
    until :meth:`disarm`, so a signal that lands between the caller's deadline check and its
    blocking call cannot be lost. The owner must disarm before the target thread exits.
    """

    __slots__ = ("thread_id", "armed", "counted")

    def __init__(self, thread_id: int, at: float | None):
        self.thread_id = thread_id
        self.armed = True
        self.counted = False
        if at is not None:
            _clock.arm(self, at)

    def fire_now(self) -> None:
        """Start signalling now instead of at the deadline."""
        _clock.arm(self, time.monotonic())

    def disarm(self) -> None:
        """Stop signalling; after this returns no further signal is sent."""
        with _clock.cond:
            self._disarm_locked()

    def _disarm_locked(self) -> None:
        if self.armed and self.counted:
            _clock.live -= 1
        self.armed = False
