"""Calling a task's code: what it may raise, the ids of what it sends, and how often it may be
cut off.

While a handler (or a timer's tick) runs, :data:`cause` holds ``[id, sent]`` of the message (or
tick) in hand: the ``sent``-th message it sends gets the id ``ID.sent`` (:func:`derived_id`), so
a message made again after a crash, by handling the same input again, has the same id as the
first time and a receiver with a dedupe window drops it.
"""

from __future__ import annotations

import contextvars
import hashlib
import time
from collections import deque
from typing import Any

#: What a task's code may raise without taking the daemon down: everything but the
#: cancellation asyncio uses for its own control flow.
TASK_FAILURES = (Exception, KeyboardInterrupt, SystemExit)

#: Longest derived message id; a longer one is cut to a hash of itself (a loop of tasks
#: sending to each other would otherwise grow it without end).
MAX_DERIVED_ID_CHARS = 120

#: A task whose handlers are interrupted this many times within :data:`CUTOFF_WINDOW_S`
#: seconds is put in failsafe: a handler that hangs now and then is reported, one that hangs
#: on most messages would hold the loop for ``handler_timeout_s`` on each of them.
CUTOFFS_TO_FAILSAFE = 3
CUTOFF_WINDOW_S = 600.0

#: ``[id, sent]`` of the message (or timer tick) being handled, in the handler's context.
cause: contextvars.ContextVar[list | None] = contextvars.ContextVar("multimodule_cause",
                                                                   default=None)


def derived_id(cause_id: str, index: int) -> str:
    """The id of the ``index``-th message sent while handling message (or tick) ``cause_id``
    (at most :data:`MAX_DERIVED_ID_CHARS` characters)."""
    out = f"{cause_id}.{index}"
    if len(out) > MAX_DERIVED_ID_CHARS:
        out = "h" + hashlib.blake2b(out.encode(), digest_size=12).hexdigest()
    return out


def short(message: Any, limit: int = 300) -> str:
    """``repr(message)`` cut to ``limit`` characters, for error records."""
    text = repr(message)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Cutoffs:
    """The times (``time.monotonic()``) a task's calls were interrupted, within the last
    :data:`CUTOFF_WINDOW_S` seconds."""

    def __init__(self) -> None:
        self.times: deque[float] = deque()

    def add(self) -> bool:
        """Count one cut-off now; whether it is the :data:`CUTOFFS_TO_FAILSAFE`-th within the
        window (then the count starts again)."""
        now = time.monotonic()
        times = self.times
        times.append(now)
        while now - times[0] > CUTOFF_WINDOW_S:
            times.popleft()
        if len(times) < CUTOFFS_TO_FAILSAFE:
            return False
        times.clear()
        return True
