"""The handler watchdog: a thread that sees a task's handler hold the event loop, says so while
it happens, and interrupts it at the task's ``handler_timeout_s``.

A process that hosts tasks (the daemon, an external task's process) runs them all on one
asyncio loop on its main thread: a handler that blocks (``time.sleep(30)``, a loop that does
not end) freezes every other task, the timers and the control queue. Around each call of a
message handler or of scheduled work, and around each step of an ``async`` one (from one
``await`` to the next), the :class:`~multimodule.runtime.runner.TaskRunner` marks the
watchdog's slot: "task T's message handler began at t", with a new generation number per call
(:meth:`HandlerWatchdog.began`, :meth:`HandlerWatchdog.ended`). The watchdog's thread waits on
that slot: a condition variable notified when a call begins while the thread is idle, else a
timed wait to the next threshold of the call in hand. It never polls, and a stream of quick
calls costs it one wake-up per threshold at most.

- At ``slow_s`` (``--slow-handler-s``) into one call it writes a warning on the ``error``
  channel naming the task, the call and the main thread's current stack
  (:func:`sys._current_frames`), while the call still runs; from then on
  :meth:`HandlerWatchdog.blocked` says so, and the callbacks given to
  :meth:`HandlerWatchdog.when_blocked` are called (the control server then answers ``status``
  from its own thread).
- At the task's ``handler_timeout_s`` it sends :data:`CUT_SIGNAL` to the main thread
  (:func:`signal.pthread_kill`). The signal's Python handler runs on the main thread between
  two bytecodes; it raises :class:`~multimodule.errors.HandlerTimeout` only if the call the
  watchdog meant (its generation) is still the one running, and never in the runner's own
  code around the handler (:func:`exempt`): a signal that lands just after the handler
  returned does nothing. A blocking system call (``time.sleep``, ``select``) is interrupted
  and a pure-Python loop stops at its next bytecode. While the call goes on (it swallowed the
  exception with ``except Exception``), the signal is sent again every :data:`CUT_REPEAT_S`.

What it cannot cut: a C call that never comes back to the interpreter (an extension looping
without checking for signals), nor one that holds the GIL, which stops this thread too. That
is left to systemd's watchdog: ``WATCHDOG=1`` is sent from the event loop
(:mod:`multimodule.runtime.notify`), so a loop frozen for ``WatchdogSec=`` gets the service
restarted.

The idea of a watchdog thread that dumps the stuck thread's stack is faulthandler's
``dump_traceback_later``; that of a signal whose Python handler raises in the main thread is
CPython's own ``KeyboardInterrupt`` on SIGINT.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
import traceback
import types
from dataclasses import dataclass
from typing import Any, Callable, Coroutine, Generator, Protocol

from multimodule.errors import HandlerTimeout
from multimodule.oob import Channels

#: The signal that interrupts a handler on the main thread. Nothing else in multimodule uses it
#: (SIGURG is transit's interrupt of blocking System V calls; SIGINT, SIGTERM and SIGHUP are the
#: daemon's; SIGALRM is left to what may run around us: ``alarm()``, pytest-timeout). Sent by
#: anyone else, it does nothing: no cut is pending then.
CUT_SIGNAL = signal.SIGUSR2

#: Seconds between two signals while a call that was cut off goes on.
CUT_REPEAT_S = 1.0

#: Frames of the main thread's stack given in a report (the innermost ones).
STACK_FRAMES = 30

_clock = time.perf_counter  # looked up once: began() runs around every handler call

#: Code objects in whose frames the signal never raises (see :func:`exempt`).
_EXEMPT: set[types.CodeType] = set()


def exempt(*functions: Callable[..., Any]) -> None:
    """Never raise :class:`HandlerTimeout` while the main thread runs the code of
    ``functions`` itself (not what they call): the runner's code around a handler, which must
    always reach :meth:`HandlerWatchdog.ended`."""
    _EXEMPT.update(function.__code__ for function in functions)


class Watched(Protocol):
    """What the watchdog reads of the task whose handler runs (at each threshold, so a
    changed limit applies to the call in hand)."""

    name: str
    #: Seconds one call may hold the loop before it is interrupted.
    handler_timeout_s: float


@dataclass(frozen=True)
class Blocked:
    """A call holding the event loop past the slow threshold: task ``task``'s ``what``
    (``"message handler"``, ``"scheduled work 'tick'"``), running since ``since`` (seconds
    since the epoch)."""

    task: str
    what: str
    since: float

    def as_dict(self) -> dict[str, Any]:
        """``{"task", "what", "since", "held_s"}`` (``held_s``: seconds until now)."""
        return {"task": self.task, "what": self.what, "since": self.since,
                "held_s": round(time.time() - self.since, 3)}


#: The slot: ``(generation, watched, what, began)`` of the call in hand (``began``:
#: ``time.perf_counter()``), or ``None`` while no handler runs.
_Call = tuple[int, Watched, str, float]


class HandlerWatchdog:
    """The watchdog of one process; see the module docstring.

    ``channels``: where reports go (the ``error`` channel, written from the watchdog's
    thread). ``slow_s``: seconds one call may hold the loop before it is reported.
    :meth:`start` and :meth:`close` on the main thread, which runs the loop.
    """

    def __init__(self, channels: Channels, slow_s: float):
        self.channels = channels
        self.slow_s = slow_s
        self._generation = 0
        self._current: _Call | None = None
        self._latest: _Call | None = None  # the call that began last (kept after it ended)
        self._cond = threading.Condition(threading.Lock())
        self._idle = False  # the thread waits, without a timeout, for a call to begin
        self._cut = 0  # the generation the signal may interrupt (0: none)
        self._blocked: tuple[int, Blocked] | None = None
        self._listeners: list[Callable[[Blocked], None]] = []
        self._closing = False
        self._thread: threading.Thread | None = None
        self._main_id: int | None = None
        self._previous: Any = None

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Install the handler of :data:`CUT_SIGNAL` and start the thread. Raises
        ``ValueError`` off the main thread (where no signal handler can be installed)."""
        self._previous = signal.signal(CUT_SIGNAL, self._on_signal)
        self._main_id = threading.get_ident()
        self._thread = threading.Thread(target=self._run, name="mm-watchdog", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread and put the signal's previous handler back."""
        if self._thread is None:
            return
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()
        self._thread = None
        if self._previous is not None:  # None: not installed from Python; ours stays, inert
            signal.signal(CUT_SIGNAL, self._previous)

    def when_blocked(self, callback: Callable[[Blocked], None]) -> None:
        """Call ``callback(blocked)`` from the watchdog's thread each time a call has held
        the loop for ``slow_s`` (it must not block; what it raises is reported)."""
        self._listeners.append(callback)

    # -- the runner's side (on the loop) ---------------------------------------------------

    def began(self, who: Watched, what: str) -> int:
        """A call of ``who``'s ``what`` begins now on the loop; returns its generation, for
        :meth:`ended` (which must follow, in a ``finally``)."""
        generation = self._generation = self._generation + 1
        self._current = self._latest = (generation, who, what, _clock())
        if self._idle:  # the first call since the thread found none: wake it, once
            self._idle = False
            with self._cond:
                self._cond.notify()
        return generation

    def ended(self, generation: int) -> None:
        """The call :meth:`began` numbered ``generation`` is over (returned, raised or
        awaits): no signal interrupts it any more."""
        current = self._current
        if current is not None and current[0] == generation:
            self._current = None
        blocked = self._blocked
        if blocked is not None and blocked[0] == generation:
            # The thread waits for this slow call's next threshold (its cut, or the cut
            # again), which may come after the next call's first: let it look again now.
            with self._cond:
                self._cond.notify()

    @types.coroutine
    def steps(self, coroutine: Coroutine[Any, Any, Any], who: Watched, what: str
              ) -> Generator[Any, Any, Any]:
        """Await ``coroutine`` (an ``async`` handler's) with each of its steps watched as
        one call: the loop is held from one ``await`` to the next, not while it waits.
        Returns its result; raises what it raises."""
        value: Any = None
        error: BaseException | None = None
        while True:
            generation = self.began(who, what)
            try:
                future = coroutine.send(value) if error is None else coroutine.throw(error)
            except StopIteration as stop:
                return stop.value
            finally:
                self.ended(generation)
            try:
                value, error = (yield future), None
            except GeneratorExit:
                coroutine.close()
                raise
            except BaseException as exc:  # cancellation, thrown in by asyncio: pass it on
                value, error = None, exc

    def blocked(self) -> Blocked | None:
        """The call holding the loop now if it has been for ``slow_s`` (any thread)."""
        blocked, current = self._blocked, self._current
        if blocked is None or current is None or current[0] != blocked[0]:
            return None
        return blocked[1]

    # -- the main thread's signal handler --------------------------------------------------

    def _on_signal(self, signum: int, frame: types.FrameType | None) -> None:
        current = self._current
        if current is None or current[0] != self._cut:
            return  # that call is over (or the signal is not ours)
        if frame is not None and frame.f_code in _EXEMPT:
            return  # between the handler and ended(): it has returned, or not yet begun
        self._cut = 0
        _, who, what, began = current
        raise HandlerTimeout(
            f"{what} of task {who.name} held the event loop for "
            f"{time.perf_counter() - began:.3f} s, past its handler_timeout_s "
            f"({who.handler_timeout_s:g} s): interrupted")

    # -- the watchdog's thread -------------------------------------------------------------

    def _run(self) -> None:
        watching = 0
        reported = False
        cuts = 0
        cut_at = 0.0
        woken_by: _Call | None = None
        with self._cond:
            while not self._closing:
                current = self._current
                if current is None and woken_by is not None:
                    # The call that woke us has ended already: look again at its threshold,
                    # not at once (a stream of quick calls wakes this thread once per
                    # threshold, not once per call).
                    _, who, _, began = woken_by
                    woken_by = None
                    self._cond.wait(max(0.0, began + min(self.slow_s, who.handler_timeout_s)
                                        - time.perf_counter()))
                    continue
                if current is None:
                    self._idle = True
                    self._cond.wait()
                    self._idle = False
                    woken_by = self._latest
                    continue
                woken_by = None
                generation, who, what, began = current
                if generation != watching:  # a new call: its own thresholds
                    watching, reported, cuts = generation, False, 0
                timeout = who.handler_timeout_s
                now = time.perf_counter()
                if not reported and now - began >= min(self.slow_s, timeout):
                    reported = True
                    self._report(generation, who, what, now - began)
                if now - began >= timeout and (cuts == 0 or now - cut_at >= CUT_REPEAT_S):
                    cuts += 1
                    if cuts == 2:  # the first signal did not end it: said once per call
                        self._still_running(who, what, now - began)
                    cut_at = now
                    self._cut = generation
                    try:
                        signal.pthread_kill(self._main_id, CUT_SIGNAL)
                    except ProcessLookupError:  # the main thread is gone: we are exiting
                        return
                if not reported:
                    due = began + min(self.slow_s, timeout)
                elif cuts == 0:
                    due = began + timeout
                else:
                    due = cut_at + CUT_REPEAT_S
                self._cond.wait(max(0.0, due - time.perf_counter()))

    def _stack(self) -> tuple[str, str]:
        """The main thread's stack now (innermost last) and its innermost frame, as text."""
        frame = sys._current_frames().get(self._main_id)
        if frame is None:
            return "", "?"
        summary = traceback.extract_stack(frame, limit=STACK_FRAMES)
        last = summary[-1]
        return "".join(summary.format()), f"{last.name} at {last.filename}:{last.lineno}"

    def _report(self, generation: int, who: Watched, what: str, held: float) -> None:
        blocked = Blocked(who.name, what, time.time() - held)
        self._blocked = (generation, blocked)  # before the record: whoever saw it may ask
        stack, where = self._stack()
        self.channels.emit(
            "error", who.name,
            f"warning: {what} is holding the event loop ({held:.3f} s so far; threshold "
            f"{self.slow_s:g} s, interrupted at {who.handler_timeout_s:g} s), now in {where}",
            severity="warning", held_s=round(held, 3), stack=stack)
        for callback in self._listeners:
            try:
                callback(blocked)
            except Exception as exc:  # the watchdog must go on
                self.channels.emit("error", "MultiModule", f"handler watchdog: {callback!r} "
                                                           f"raised {type(exc).__name__}: {exc}")

    def _still_running(self, who: Watched, what: str, held: float) -> None:
        stack, where = self._stack()
        self.channels.emit(
            "error", who.name,
            f"{what} still holds the event loop {CUT_REPEAT_S:g} s after it was interrupted "
            f"({held:.1f} s in all), now in {where}: it swallowed HandlerTimeout, or a C call "
            "does not come back to the interpreter (systemd's watchdog then restarts the "
            f"process); interrupting it again every {CUT_REPEAT_S:g} s",
            held_s=round(held, 3), stack=stack)


exempt(HandlerWatchdog.began, HandlerWatchdog.ended, HandlerWatchdog.steps)
