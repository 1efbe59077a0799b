"""Levels: turning figures into ``ok``/``warn``/``severe``/``failsafe`` and alerts.

Counters (CPU seconds, bytes read) become rates and gauges (memory, descriptors) become means
over sliding windows (1 and 5 minutes), measured with an injectable clock so that tests need
no waiting. Each metric has ordered thresholds; a task's level for a metric is the highest
level whose threshold the windowed value reaches. An alert is due only when that level
changes, in either direction (back to ``ok`` too), so a steady state is never repeated.

Default thresholds start from the original App::MultiModule's: CPU 1.4/1.6/1.9 cores, open
descriptors and threads 100/150/200, queue fill 0.6/0.8/0.95 of capacity without failsafe,
memory 0.1/0.15/0.3 of the machine; the disk rates are ours (the original's are not known to
us): 50/100/200 MB/s. Also ours: ``message_failures`` (handler failures in the short window:
warn at 1, severe at 10, no failsafe) and ``restarts`` (restarts in the long window: warn at
2, severe at 4, failsafe at 6, i.e. more than 5 restarts in 5 minutes is flapping, which
stops the task). ``memory_bytes`` has no default levels; a task may set some.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

LEVELS = ("ok", "warn", "severe", "failsafe")

Clock = Callable[[], float]


@dataclass(frozen=True)
class Thresholds:
    """Values at which ``warn``, ``severe`` and ``failsafe`` begin (``None``: no such level).
    Must not decrease from one level to the next. ``stops``: whether reaching ``failsafe``
    stops the task (not for queue fill: a full queue is the senders' backpressure, not a
    fault of the task; it only alerts)."""

    warn: float | None = None
    severe: float | None = None
    failsafe: float | None = None
    stops: bool = True

    def __post_init__(self) -> None:
        given = [v for v in (self.warn, self.severe, self.failsafe) if v is not None]
        if given != sorted(given):
            raise ValueError(f"thresholds must not decrease: {self}")

    def level(self, value: float | None) -> str:
        """The level of ``value`` (``ok`` for ``None``: an unknown figure alarms nobody)."""
        if value is None:
            return "ok"
        reached = "ok"
        for name, threshold in (("warn", self.warn), ("severe", self.severe),
                                ("failsafe", self.failsafe)):
            if threshold is not None and value >= threshold:
                reached = name
        return reached


MB = 1_000_000

DEFAULT_THRESHOLDS: dict[str, Thresholds] = {
    "cpu_cores": Thresholds(1.4, 1.6, 1.9),
    "open_fds": Thresholds(100, 150, 200),
    "threads": Thresholds(100, 150, 200),
    "queue_fill": Thresholds(0.6, 0.8, 0.95, stops=False),
    "memory_share": Thresholds(0.1, 0.15, 0.3),
    "disk_read_bytes_per_s": Thresholds(50 * MB, 100 * MB, 200 * MB),
    "disk_write_bytes_per_s": Thresholds(50 * MB, 100 * MB, 200 * MB),
    "memory_bytes": Thresholds(),
    "message_failures": Thresholds(1, 10, None),
    "restarts": Thresholds(2, 4, 6),
}

#: The metrics that have levels, in the order status shows them.
METRICS = tuple(DEFAULT_THRESHOLDS)


class Window:
    """Samples ``(time, value)`` of one figure over the last ``span_s`` seconds."""

    def __init__(self, span_s: float, clock: Clock = time.monotonic):
        self.span_s = span_s
        self.clock = clock
        self.samples: deque[tuple[float, float]] = deque()
        self._total = 0.0  # of the samples' values, kept as they come and go

    def add(self, value: float) -> None:
        """Record ``value`` now; drop samples older than the span."""
        now = self.clock()
        samples = self.samples
        samples.append((now, value))
        self._total += value
        cutoff = now - self.span_s
        while samples[0][0] < cutoff:
            self._total -= samples.popleft()[1]
        if len(samples) == 1:
            self._total = value  # no rounding left over from values gone

    def mean(self) -> float | None:
        """Mean of the samples in the window (a gauge), ``None`` if empty."""
        if not self.samples:
            return None
        return self._total / len(self.samples)

    def rate(self) -> float | None:
        """Increase per second across the window (a counter), ``None`` with fewer than two
        samples. A counter that went down (a restart) counts from its new value."""
        if len(self.samples) < 2:
            return None
        (t0, v0), (t1, v1) = self.samples[0], self.samples[-1]
        if t1 <= t0:
            return None
        return (v1 - v0 if v1 >= v0 else v1) / (t1 - t0)


class Increments:
    """Increments of a counter (failures, restarts) over the last ``span_s`` seconds:
    :meth:`add` a delta when it happens, :meth:`total` counts those still in the window."""

    def __init__(self, span_s: float, clock: Clock = time.monotonic):
        self.span_s = span_s
        self.clock = clock
        self.events: deque[tuple[float, float]] = deque()

    def add(self, delta: float) -> None:
        """Record an increase of ``delta`` now (0 or less records nothing)."""
        if delta > 0:
            self.events.append((self.clock(), delta))

    def total(self) -> float:
        """The sum of the increments made within the span."""
        cutoff = self.clock() - self.span_s
        while self.events and self.events[0][0] < cutoff:
            self.events.popleft()
        return float(sum(delta for _, delta in self.events))


@dataclass(frozen=True)
class Alert:
    """A change of ``task``'s level for ``metric`` from ``old`` to ``new`` at ``value``."""

    task: str
    metric: str
    old: str
    new: str
    value: float | None

    @property
    def text(self) -> str:
        """One line for the alert channel (the task is given beside it)."""
        shown = "unknown" if self.value is None else f"{self.value:.3g}"
        return f"{self.metric} {shown}: {self.old} -> {self.new}"


class LevelTracker:
    """Current level per (task, metric); :meth:`update` says when it changes.

    ``thresholds``: defaults per metric; ``overrides``: per task, per metric (a task's
    config). Raises ``KeyError`` for a metric without thresholds.
    """

    def __init__(self, thresholds: dict[str, Thresholds] | None = None):
        self.thresholds = dict(DEFAULT_THRESHOLDS if thresholds is None else thresholds)
        self.overrides: dict[str, dict[str, Thresholds]] = {}
        self.levels: dict[tuple[str, str], str] = {}

    def thresholds_for(self, task: str, metric: str) -> Thresholds:
        """The task's own thresholds for ``metric`` if it has some, else the default."""
        return self.overrides.get(task, {}).get(metric) or self.thresholds[metric]

    def update(self, task: str, metric: str, value: float | None) -> Alert | None:
        """Record ``value``; return an :class:`Alert` if the level changed, else ``None``."""
        new = self.thresholds_for(task, metric).level(value)
        old = self.levels.get((task, metric), "ok")
        self.levels[(task, metric)] = new
        if new == old:
            return None
        return Alert(task, metric, old, new, value)

    def forget(self, task: str) -> None:
        """Drop ``task``'s levels (after ``unfailsafe``: it starts again from ``ok``)."""
        for key in [key for key in self.levels if key[0] == task]:
            del self.levels[key]

    def level(self, task: str) -> str:
        """The task's highest level over all its metrics."""
        levels = self.levels
        return LEVELS[max(LEVELS.index(levels.get((task, metric), "ok"))
                          for metric in self.thresholds)]
