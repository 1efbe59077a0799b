"""The resource monitor: per task figures over time, levels, and what is due when they change.

The daemon calls :meth:`Monitor.tick` every ``monitor_interval_s`` seconds with one
:class:`TaskView` per task (what it knows of the task now: counters of an internal task, the
pid or unit of an external one) and the fill of every queue. The monitor turns counters into
rates and gauges into means over a short window (default 1 minute) and a long one (5 times the
short), computes each metric's level with the task's thresholds, and returns the
:class:`~multimodule.monitor.levels.Alert` objects of the levels that changed. The daemon sends
those on the ``alert`` channel and to the Router, and puts a task whose level reached
``failsafe`` (on a metric that stops) in failsafe.

Where figures come from:

- internal task: CPU seconds and wall seconds spent in its handlers, messages in/out, handler
  failures, depth of its in-memory queue, and the memory attributed to it: the deep size of its
  instance (see :mod:`multimodule.monitor.deepsize`; its other process figures are the
  daemon's and are not charged to it);
- the daemon itself: its process's figures, except that its ``memory_bytes`` is its *own*
  memory, the process's less what is attributed to its internal tasks (the whole process's is
  ``process_memory_bytes`` in its row): so a leaking internal task reaches its memory levels
  and is put in failsafe, not the daemon, and the rows of the daemon and its internal tasks
  add up to the process;
- external task: its unit's cgroup under the systemd backend (memory, CPU, block I/O, pids),
  psutil figures of its main process (open descriptors, threads, and whatever the cgroup
  cannot give; the only source for detached processes, which have no cgroup of their own), and
  the counters its process writes to ``STATE_DIR/task-NAME.figures.json``; restarts from the
  backend (``NRestarts`` of the unit, or the detached backend's count);
- every System V queue: bytes waiting of its capacity, read from the kernel.
"""

from __future__ import annotations

import os
import time
from array import array
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil

from multimodule.monitor.levels import (
    METRICS,
    Alert,
    Clock,
    Increments,
    LevelTracker,
    Thresholds,
)
from multimodule.monitor.sources import CgroupSource, Figures, ProcessSource

#: How much longer the long window is than the short one.
LONG_WINDOW_FACTOR = 5

#: The Router's counters a status row carries as they are (see ``multimodule.tasks.Router``).
ROUTER_FIGURES = ("route_matches", "unrouted", "static_forwarded", "static_forwards_refused",
                  "forwards_refused", "loops_broken")

#: Metrics with levels for the daemon's own row: its threads and descriptors grow with the
#: number of tasks it hosts (a receiver thread each), so they say nothing about its health.
DAEMON_METRICS = ("cpu_cores", "memory_share", "disk_read_bytes_per_s",
                  "disk_write_bytes_per_s")


@dataclass
class TaskView:
    """What the daemon knows of one task at one tick.

    ``kind``: ``"internal"`` or ``"external"``. ``state``: ``running``, ``activating``,
    ``stopped``, ``failed`` or ``failsafe``. ``pid``: the external task's main process.
    ``where``: its unit name or lock file. ``cgroup``: read the pid's cgroup (systemd units:
    the cgroup is the task's own). ``counters``: the task's counters (``messages_in``,
    ``messages_out``, ``emitted``, ``task_message_failure``, ``handler_seconds``,
    ``handler_cpu_seconds``, ``queue_depth``, ``last_error``; the Router's ``route_matches``,
    one count per route), ``None`` if unknown. ``counters_since``: when the process
    holding those counters started (seconds since the epoch; counters restart with it).
    ``restarts``: restarts counted by the backend. ``queue_fill``: the fill of the task's
    own System V queue (0..1).
    """

    name: str
    kind: str
    state: str
    pid: int | None = None
    where: str = ""
    cgroup: bool = False
    counters: dict[str, Any] | None = None
    counters_since: float | None = None
    restarts: int | None = None
    queue_fill: float | None = None
    last_error: str | None = None


class _Pair:
    """The same figure over the short and the long window, from one series of samples (the
    short window is the end of the long one), times and values kept as machine floats in two
    arrays: 16 bytes a sample (two :class:`~multimodule.monitor.levels.Window` of tuples cost
    about 110 KiB a task when full; these, about 10). Means and rates as ``Window``'s."""

    __slots__ = ("short_s", "long_s", "clock", "times", "values", "start", "short_total",
                 "long_total")

    def __init__(self, short_s: float, clock: Clock):
        self.short_s = short_s
        self.long_s = short_s * LONG_WINDOW_FACTOR
        self.clock = clock
        self.times = array("d")
        self.values = array("d")
        self.start = 0  # index of the short window's first sample
        self.short_total = self.long_total = 0.0

    def add(self, value: float | None) -> None:
        if value is None:
            return
        now = self.clock()
        times, values = self.times, self.values
        times.append(now)
        values.append(value)
        self.short_total += value
        self.long_total += value
        start, cutoff = self.start, now - self.short_s
        while times[start] < cutoff:  # (never the sample just added)
            self.short_total -= values[start]
            start += 1
        drop, cutoff = 0, now - self.long_s
        while times[drop] < cutoff:  # older than the long window: out of the short one too
            drop += 1
        if drop:
            self.long_total -= sum(values[:drop])
            del times[:drop], values[:drop]
        self.start = start - drop
        if len(times) == 1:
            self.long_total = value  # no rounding left over from values gone
        if self.start == len(times) - 1:
            self.short_total = value

    def mean(self) -> tuple[float | None, float | None]:
        count = len(self.values)
        if not count:
            return None, None
        return self.short_total / (count - self.start), self.long_total / count

    def rate(self) -> tuple[float | None, float | None]:
        return self._rate(self.start), self._rate(0)

    def _rate(self, first: int) -> float | None:
        # Increase per second from sample ``first`` to the last; a counter that went down
        # (a restart) counts from its new value.
        times, values = self.times, self.values
        if len(times) - first < 2 or times[-1] <= times[first]:
            return None
        v0, v1 = values[first], values[-1]
        return (v1 - v0 if v1 >= v0 else v1) / (times[-1] - times[first])


class _Track:
    """Windows of one task's figures."""

    GAUGES = ("memory_bytes", "open_fds", "threads", "queue_fill", "queue_depth",
              "process_memory_bytes")
    COUNTERS = ("cpu_seconds", "io_read_bytes", "io_write_bytes", "messages_in",
                "messages_out", "emitted", "handler_seconds")

    def __init__(self, short_s: float, clock: Clock):
        self.short_s = short_s
        self.clock = clock
        self.pid: int | None = None
        self.kind: str | None = None
        self.running = False
        self.reset_figures()
        self.failures = Increments(short_s, clock)
        self.failures_long = Increments(short_s * LONG_WINDOW_FACTOR, clock)
        self.restarts = Increments(short_s * LONG_WINDOW_FACTOR, clock)
        self.counters_key: Any = None
        self.failures_seen = 0
        self.restarts_seen: int | None = None

    def reset_figures(self) -> None:
        """Start the windows of process figures and counters afresh."""
        self.pairs = {name: _Pair(self.short_s, self.clock)
                      for name in self.GAUGES + self.COUNTERS}
        #: The Router's messages matched per route, by position.
        self.routes: list[_Pair] = []

    def add_routes(self, matches: Any) -> None:
        """Record the Router's ``route_matches`` counters (a list in route order); a list of
        another length (the routes changed) starts the routes' windows afresh."""
        if not isinstance(matches, list):
            return
        if len(matches) != len(self.routes):
            self.routes = [_Pair(self.short_s, self.clock) for _ in matches]
        for pair, value in zip(self.routes, matches):
            pair.add(value)


def machine_memory_bytes() -> int:
    """Total memory of the machine, bytes."""
    return psutil.virtual_memory().total


@dataclass
class Monitor:
    """Keeps windows and levels per task; see the module docstring.

    ``window_s``: the short window, seconds (the long one is 5 times longer).
    ``clock``: monotonic seconds (injectable for tests). ``started_at``: wall-clock start;
    counters of a process that started before it are taken as a baseline, not as news.
    """

    window_s: float = 60.0
    clock: Clock = time.monotonic
    cgroups: CgroupSource = field(default_factory=CgroupSource)
    processes: ProcessSource = field(default_factory=ProcessSource)
    memory_total: int = field(default_factory=machine_memory_bytes)
    started_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.tracker = LevelTracker()
        self.tracks: dict[str, _Track] = {}
        self._latest: dict[str, tuple[TaskView, dict[str, float | None]]] = {}
        self.queue_rows: dict[str, dict[str, Any]] = {}

    # -- thresholds ------------------------------------------------------------------------

    def set_overrides(self, task: str, overrides: dict[str, Thresholds]) -> None:
        """Per-task thresholds (from the task's ``monitor`` config table)."""
        if overrides:
            self.tracker.overrides[task] = dict(overrides)
        else:
            self.tracker.overrides.pop(task, None)

    def forget(self, task: str) -> None:
        """Forget ``task``'s windows and levels (it starts again from ``ok``)."""
        self.tracks.pop(task, None)
        self._latest.pop(task, None)  # its row goes with its windows
        self.tracker.forget(task)

    # -- reading ---------------------------------------------------------------------------

    def read_process(self, view: TaskView) -> Figures:
        """Figures of an external task's process (cgroup first, then psutil); blocking
        reads of /proc and /sys, so the daemon calls this off the event loop."""
        if view.pid is None:
            return Figures()
        own = self.processes.read(view.pid)
        if view.cgroup:
            group = self.cgroups.read(view.pid, unit=view.where or None)
            # threads: the process's own (a cgroup's pids.current counts every process)
            return Figures(cpu_seconds=group.cpu_seconds, memory_bytes=group.memory_bytes,
                           io_read_bytes=group.io_read_bytes,
                           io_write_bytes=group.io_write_bytes,
                           tasks=own.tasks, open_fds=own.open_fds).merged(own)
        return own

    # -- one tick --------------------------------------------------------------------------

    def tick(self, views: list[TaskView], process_figures: dict[str, Figures],
             queue_fill: dict[str, float | None]) -> list[Alert]:
        """Take one sample of every task and queue; return the alerts due (level changes).

        ``process_figures``: :meth:`read_process` of each external task and of the daemon,
        and the attributed memory of each internal task (``Figures(memory_bytes=...)``), by
        name. ``queue_fill``: fill (0..1) of every System V queue, by name (a task's own queue
        is in its row; other queues get rows of their own, see :attr:`queue_rows`).
        """
        alerts: list[Alert] = []
        seen = set()
        attributed = sum(process_figures[view.name].memory_bytes or 0 for view in views
                         if view.kind == "internal" and view.state == "running"
                         and view.name in process_figures)
        for view in views:
            seen.add(view.name)
            if view.queue_fill is None:
                view.queue_fill = queue_fill.get(view.name)
            figures = process_figures.get(view.name, Figures())
            alerts.extend(self._tick_task(view, own_memory(figures, attributed)
                                          if view.kind == "daemon" else figures,
                                          figures.memory_bytes))
        for name in list(self.tracks):
            if name not in seen:  # unloaded: its history is of no use any more
                self.forget(name)
        task_queues = {view.name for view in views}
        for qname in list(self.queue_rows):
            if qname not in queue_fill:
                del self.queue_rows[qname]
                self.tracker.forget(f"queue:{qname}")
        for qname, fill in sorted(queue_fill.items()):
            if qname in task_queues:
                continue  # a task's own queue: in the task's row and levels
            alert = self.tracker.update(f"queue:{qname}", "queue_fill", fill)
            if alert is not None:
                alerts.append(Alert(qname, "queue_fill", alert.old, alert.new, fill))
            self.queue_rows[qname] = {"name": qname, "queue_fill": fill,
                                      "level": self.tracker.level(f"queue:{qname}")}
        return alerts

    def _tick_task(self, view: TaskView, figures: Figures,
                   process_memory: int | None) -> list[Alert]:
        track = self.tracks.get(view.name)
        if track is None:
            track = self.tracks[view.name] = _Track(self.window_s, self.clock)
        counters = view.counters or {}
        running = view.state in ("running", "activating")
        if view.kind != track.kind:
            # Moved between the daemon and its own process: the other side's memory, fds
            # and threads say nothing of this side.
            track.reset_figures()
            track.kind = view.kind
        if view.kind == "external":
            # Figures of an external task count once its process runs the task (it has
            # written its counters): the interpreter's start-up is not the task's doing.
            running = running and view.counters is not None
            if running and view.pid != track.pid:
                track.reset_figures()  # a new process: its figures start afresh
            track.pid = view.pid
        if not running and track.running:
            track.reset_figures()  # stopped: no rates from before it stopped
        track.running = running
        pairs = track.pairs
        if running:
            if view.kind == "internal":
                cpu = counters.get("handler_cpu_seconds")
            else:
                cpu = figures.cpu_seconds
            for name, value in (("cpu_seconds", cpu),
                                ("memory_bytes", figures.memory_bytes),
                                ("process_memory_bytes",
                                 process_memory if view.kind == "daemon" else None),
                                ("open_fds", figures.open_fds),
                                ("threads", figures.tasks),
                                ("io_read_bytes", figures.io_read_bytes),
                                ("io_write_bytes", figures.io_write_bytes),
                                ("queue_fill", view.queue_fill),
                                ("queue_depth", counters.get("queue_depth")),
                                ("messages_in", counters.get("messages_in")),
                                ("messages_out", counters.get("messages_out")),
                                ("emitted", counters.get("emitted")),
                                ("handler_seconds", counters.get("handler_seconds"))):
                pairs[name].add(value)
            track.add_routes(counters.get("route_matches"))
            self._count_failures(track, view, counters)
        else:
            pairs["queue_fill"].add(view.queue_fill)  # its queue still fills while stopped
        if view.restarts is not None:
            if track.restarts_seen is not None:
                delta = view.restarts - track.restarts_seen
                track.restarts.add(delta if delta >= 0 else view.restarts)
            track.restarts_seen = view.restarts

        memory = pairs["memory_bytes"].mean()[0]
        values = {
            "cpu_cores": pairs["cpu_seconds"].rate()[0],
            "open_fds": pairs["open_fds"].mean()[0],
            "threads": pairs["threads"].mean()[0],
            "queue_fill": pairs["queue_fill"].mean()[0],
            "memory_share": memory / self.memory_total if memory is not None else None,
            "memory_bytes": memory,
            "disk_read_bytes_per_s": pairs["io_read_bytes"].rate()[0],
            "disk_write_bytes_per_s": pairs["io_write_bytes"].rate()[0],
            "message_failures": track.failures.total(),
            "restarts": track.restarts.total(),
        }
        alerts = []
        for metric in METRICS:
            if view.kind == "daemon" and metric not in DAEMON_METRICS:
                continue
            # A stopped task keeps its levels (they tell why), except its queue's fill and,
            # for an external one, its restarts.
            if running or metric == "queue_fill" or (metric == "restarts"
                                                     and view.kind == "external"):
                alert = self.tracker.update(view.name, metric, values[metric])
                if alert is not None:
                    alerts.append(alert)
        self._latest[view.name] = (view, values)
        return alerts

    @property
    def rows(self) -> dict[str, dict[str, Any]]:
        """Task name -> the status row of its last sample (built when asked: a sample
        itself only updates windows and levels). Not thread-safe: call it from the thread
        that calls :meth:`tick`."""
        return {name: self._row(view, self.tracks[name], values)
                for name, (view, values) in self._latest.items()}

    def empty_row(self, view: TaskView) -> dict[str, Any]:
        """The row of a task no sample has seen yet (figures unknown)."""
        return self._row(view, _Track(self.window_s, self.clock),
                         dict.fromkeys(METRICS, 0.0) | {"memory_bytes": None})

    def _count_failures(self, track: _Track, view: TaskView, counters: dict[str, Any]) -> None:
        failures = counters.get("task_message_failure")
        if failures is None:
            return
        key = (view.pid, view.counters_since)
        if key != track.counters_key:
            # New counters (a new process or runner): they count from its start, unless it
            # started before the monitor did (adopted): then they are a baseline.
            fresh = view.counters_since is None or view.counters_since >= self.started_at
            track.counters_key = key
            track.failures_seen = 0 if fresh else failures
        delta = failures - track.failures_seen
        track.failures_seen = failures
        track.failures.add(delta)
        track.failures_long.add(delta)

    def _row(self, view: TaskView, track: _Track, values: dict[str, float | None]
             ) -> dict[str, Any]:
        pairs = track.pairs
        counters = view.counters or {}
        cpu_short, cpu_long = pairs["cpu_seconds"].rate()

        def windows(kind: str, name: str) -> dict[str, float | None]:
            short, long = getattr(pairs[name], kind)()
            return {"short": _round(short), "long": _round(long)}

        return {
            "name": view.name,
            "kind": view.kind,
            "state": view.state,
            "pid": view.pid,
            "where": view.where,
            "level": self.tracker.level(view.name),
            "levels": {m: self.tracker.levels.get((view.name, m), "ok") for m in METRICS},
            "messages_in_per_s": _round(pairs["messages_in"].rate()[0]),
            "messages_out_per_s": _round(pairs["messages_out"].rate()[0]),
            "cpu_percent": _round(cpu_short * 100) if cpu_short is not None else None,
            "memory_bytes": _int(values["memory_bytes"]),
            "process_memory_bytes": _int(pairs["process_memory_bytes"].mean()[0]),
            "open_fds": _int(values["open_fds"]),
            "threads": _int(values["threads"]),
            "queue_fill": _round(view.queue_fill),
            "queue_depth": counters.get("queue_depth"),
            "restarts": view.restarts,
            "restarts_in_window": int(values["restarts"]),
            "message_failures": counters.get("task_message_failure"),
            "message_failures_in_window": int(values["message_failures"]),
            "messages_in": counters.get("messages_in"),
            "messages_out": counters.get("messages_out"),
            "emitted": counters.get("emitted"),
            "emitted_per_s": _round(pairs["emitted"].rate()[0]),
            "last_error": view.last_error or counters.get("last_error"),
            # The Bridge's own figures (published, delivered, lag...), as its counters give.
            **{key: value for key, value in counters.items() if key.startswith("bridge_")},
            # The Router's own figures, and its messages matched per second per route.
            **{key: counters[key] for key in ROUTER_FIGURES if key in counters},
            **({"route_matches_per_s": [_round(pair.rate()[0]) for pair in track.routes]}
               if "route_matches" in counters else {}),
            "windows": {
                "cpu_percent": {"short": _round(cpu_short * 100) if cpu_short is not None
                                else None,
                                "long": _round(cpu_long * 100) if cpu_long is not None
                                else None},
                "memory_bytes": windows("mean", "memory_bytes"),
                "open_fds": windows("mean", "open_fds"),
                "threads": windows("mean", "threads"),
                "queue_fill": windows("mean", "queue_fill"),
                "messages_in_per_s": windows("rate", "messages_in"),
                "messages_out_per_s": windows("rate", "messages_out"),
                "disk_read_bytes_per_s": windows("rate", "io_read_bytes"),
                "disk_write_bytes_per_s": windows("rate", "io_write_bytes"),
                "message_failures": {"short": int(track.failures.total()),
                                     "long": int(track.failures_long.total())},
            },
        }


def own_memory(figures: Figures, attributed: int) -> Figures:
    """The daemon's ``figures`` with its memory less ``attributed`` bytes (its internal tasks'
    figures), never below 0."""
    if figures.memory_bytes is None:
        return figures
    return replace(figures, memory_bytes=max(0, figures.memory_bytes - attributed))


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _int(value: float | None) -> int | None:
    return None if value is None else int(round(value))


def read_figures_file(path: os.PathLike[str] | str) -> dict[str, Any] | None:
    """The counters an external task's process last wrote, or ``None`` if unreadable or not
    a regular file of this process's user (never read through a link)."""
    import orjson

    from multimodule.state import read_own_file

    try:
        data = orjson.loads(read_own_file(Path(path)))
    except (OSError, orjson.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None
