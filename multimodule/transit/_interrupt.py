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


class Interrupter:
    """Sends :data:`INTERRUPT_SIGNAL` to one thread at a deadline until disarmed.

    ``thread_id``: a ``threading.get_ident()`` value. ``at``: a ``time.monotonic()`` deadline, or
    ``None`` to wait for :meth:`fire_now`. The signal is repeated every 10 ms after the deadline
    until :meth:`disarm`, so a signal that lands between the caller's deadline check and its
    blocking call cannot be lost.
    """

    def __init__(self, thread_id: int, at: float | None):
        self._thread_id = thread_id
        self._at = at
        self._armed = True
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mm-interrupter", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if self._at is not None:
            delay = self._at - time.monotonic()
            if delay > 0 and self._wake.wait(delay):
                if not self._armed:
                    return
        else:
            self._wake.wait()
        while True:
            with self._lock:
                if not self._armed:
                    return
                try:
                    signal.pthread_kill(self._thread_id, INTERRUPT_SIGNAL)
                except ProcessLookupError:
                    return  # the thread is gone
            self._wake.clear()
            if self._wake.wait(_REPEAT_S) and not self._armed:
                return

    def fire_now(self) -> None:
        """Start signalling now instead of at the deadline."""
        self._at = time.monotonic()
        self._wake.set()

    def disarm(self) -> None:
        """Stop signalling; after this returns no further signal is sent."""
        with self._lock:
            self._armed = False
        self._wake.set()
