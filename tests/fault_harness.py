"""The fault suite's instrument: what a ``kill -9`` loses, measured on real processes.

Shared by ``tests/test_faults.py`` (small counts, asserting the goals) and ``bench/faults.py``
(large counts, a table). Nothing here depends on pytest.

The pipeline of one run, every part a real process except the sink reader::

    producer process ──> System V queue "FaultCounter" ──> FaultCounter (stateful task, in the
    (a Stream)                                               daemon or its own process)
                                                               │ emit (via the Router) or
                                                               │ send (direct)
    sink reader thread <── System V queue "fault_sink" <───────┘
    (a Sink)

- :class:`Stream`: a producer process sending ``{"n": i, "stream": S}`` for i = 0, 1, 2, ...
  in order; a send that finds the queue full for ``send_timeout_s`` raises ``QueueFull``, is
  counted (backpressure) and retried with the same ``n``, so the producer itself never loses or
  repeats a number. It reports its progress on stdout.
- ``FaultCounter`` (:data:`COUNTER_SOURCE`, written into the run's ``--task-path`` directory):
  keeps ``state["streams"][S] = {"count": handled, "last_n": n}`` and forwards each message
  with its ``count``, its process id and ``forwarded_mono`` (``time.monotonic()``, one clock
  for every process of the machine) to the sink queue.
- :class:`Sink`: a thread reading the sink queue, recording every message with its arrival
  time; it can be paused (an unread queue, a full sink queue).
- :class:`Pipeline`: one run's directories, the daemon (:class:`DaemonProcess`), the stream,
  the sink, kills (``os.kill(pid, SIGKILL)``), restarts, migrations, the drain, the orderly
  stop and the clean-up (processes and System V queues, in ``finally``).
- :data:`SCENARIOS`: the fault plans, and :func:`run_scenario`, which returns a
  :class:`FaultResult`.

Figures (see :func:`sink_figures`), for the run's stream S with ``sent`` numbers sent:

- lost = sent - distinct numbers of S received;
- duplicates = messages of S received - distinct numbers received (as the sink sees them); of
  them, those whose copy carries the same transit id as the first copy (one send delivered
  twice: a resend) and those forwarded from an input with the same id as the first copy's
  (FaultCounter handled one input message twice: what ``dedupe`` is for), where ids exist;
- out of order = times a number, at its first arrival, is smaller than the number that
  arrived first before it (repeats of a number already seen are skipped);
- state consistent: after the drain and an orderly stop (which saves the state), the state file
  of FaultCounter parses (no ``.corrupt-*`` file was set aside), its
  ``streams[S]["count"]`` equals the distinct numbers the sink received, its
  ``streams[S]["last_n"]`` equals the number of the last message the sink received, and its
  ballast (scenario f) is whole. The counter counts and forwards in one handler, so a
  crash-safe pipeline keeps the two in step (each message's effect exactly once, the
  "exactly-once processing" of stream processors: state and output committed together). A
  checkpoint older than the forwards it covers shows as count < distinct; a forward that was
  counted and then lost shows as count > distinct;
- recovery time, per kill: from the kill (``time.monotonic()`` just before ``os.kill``) to the
  arrival at the sink of the first message forwarded after the kill (``forwarded_mono`` later
  than the kill);
- drained: after the producer finished, the sink went ``quiet_s`` seconds without a message
  and every queue of the pipeline was empty (the System V queues, the daemon's tasks' memory
  and its overflow per ``mmctl status``), within ``drain_timeout_s``.

The upcoming crash-safe delivery is used where it exists: a message id in
``message[".ipc_transit_meta"]["id"]`` (reported as ``ids``; duplicates that carry the same id
at the sink are resends of one send), the task key ``dedupe`` (``true`` or a window size; set
on FaultCounter when asked, and on the Router too once ``dedupe`` is a reserved config key),
and the daemon options ``--no-journal`` / ``--journal-fsync`` (passed only if the daemon's
``--help`` lists them; the result says which journal mode was in force).

Run as a script, this module is the producer: ``python fault_harness.py produce ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

#: The checkout this file belongs to: its ``multimodule`` is the one under test.
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import psutil  # noqa: E402

from multimodule.errors import Empty, MultiModuleError, QueueFull, TransitError  # noqa: E402
from multimodule.state import lock_holder  # noqa: E402
from multimodule.transit import META_KEY, Transit  # noqa: E402
from multimodule.transit.lowlevel import ENV_TRANSIT_DIR, ensure_handler  # noqa: E402

#: The stateful task of the pipeline, and the System V queue it reads.
COUNTER = "FaultCounter"
#: The queue the sink reads.
SINK_QUEUE = "fault_sink"
#: The Router's queue (an external FaultCounter's emits go there).
ROUTER = "Router"

#: Seconds a daemon may take to say ``running (pid N)``.
READY_TIMEOUT_S = 30.0
#: Daemon resident memory the unread-queue scenario must stay under (bytes).
RSS_LIMIT_BYTES = 100 * 1024 * 1024
#: Seconds between two samples of the daemon's resident memory.
RSS_SAMPLE_S = 0.1

COUNTER_SOURCE = '''
"""FaultCounter: the stateful task of the fault suite (see tests/fault_harness.py).

Counts the messages of each stream it handles and forwards each one, stamped with its count,
its process and the time it was forwarded, to the sink: through the Router (emit) or, with
``sink`` in its config, straight to that queue. ``ballast_bytes``: size of a filler string kept
in the state (a large state, for kills during saves).
"""

import os
import time

from multimodule import Task

META_KEY = ".ipc_transit_meta"


class FaultCounter(Task):
    is_stateful = True

    def set_config(self, config):
        self.sink = config.get("sink")
        ballast = int(config.get("ballast_bytes") or 0)
        if len(self.state.get("ballast", "")) != ballast:
            self.state["ballast"] = "b" * ballast

    def message(self, message):
        stream, n = message.get("stream"), message.get("n")
        if not isinstance(stream, str) or type(n) is not int:
            return
        mine = self.state.setdefault("streams", {}).setdefault(
            stream, {"count": 0, "last_n": None})
        mine["count"] += 1
        mine["last_n"] = n
        meta = message.get(META_KEY)
        out = {"n": n, "stream": stream, "count": mine["count"], "pid": os.getpid(),
               "forwarded_mono": time.monotonic(),
               "in_id": meta.get("id") if isinstance(meta, dict) else None}
        if self.sink:
            self.send(self.sink, out)
        else:
            self.emit(out)
'''


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    """Re-check ``predicate`` every ``interval`` seconds until it holds (``True``) or
    ``timeout`` seconds passed (``False``). Only for conditions no event tells of (a queue's
    fill, a lock taken by another process)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


# -- options and results ---------------------------------------------------------------------


@dataclass
class Options:
    """How one scenario runs.

    ``count``: numbers the stream sends (scenario e streams until its unread phase ends).
    ``kills``: faults injected (kills, or killed migrations). ``dedupe``: ``False`` (no key),
    ``True`` or a window size (the ``dedupe`` task key). ``journal``: ``"default"``, ``"off"``
    (``--no-journal``) or ``"fsync"`` (``--journal-fsync``). ``route``: ``"router"``
    (FaultCounter emits, the Router forwards to the sink) or ``"direct"`` (it sends to the
    sink). ``quiet_s``: seconds without a message at the sink that, with empty queues, mean
    drained; ``drain_timeout_s``: bound on the drain (seconds). ``recovery_timeout_s``: how long
    to wait for messages to flow after a kill before going on without. ``unread_s``: seconds
    the sink queue stays unread (scenario e). ``ballast_bytes``: state size (scenario f).
    ``save_state_s``: FaultCounter's ``intervals.save_state`` (``None``: the daemon's default;
    scenario f sets its own). ``send_timeout_s``: the producer's wait for room before a send
    counts as ``QueueFull`` and is retried. ``rate``: messages per second the producer sends
    at most (``0``: as fast as the queue takes them; ``None``: the scenario's pace, so that the
    stream outlasts its faults: each fault comes after a share of ``count`` was sent and needs
    its :attr:`Scenario.fault_s` seconds).
    ``rss_cap_bytes``: the unread phase of scenario e ends early once the daemon's resident
    memory passes this (the memory goal is missed by then; this keeps a run from taking the
    machine's memory). ``outbox_max_bytes``: the daemons' ``--outbox-max-bytes`` (``None``:
    their default); a short unread phase needs a small one to reach the backpressure.
    """

    count: int = 3000
    kills: int = 5
    dedupe: bool | int = False
    journal: str = "default"
    route: str = "router"
    quiet_s: float = 1.0
    drain_timeout_s: float = 60.0
    recovery_timeout_s: float = 60.0
    unread_s: float = 10.0
    ballast_bytes: int = 5_000_000
    save_state_s: float | None = None
    send_timeout_s: float = 0.5
    rate: float | None = None
    rss_cap_bytes: int = 5 * RSS_LIMIT_BYTES
    outbox_max_bytes: int | None = None

    def check(self, *, unbounded: bool = False) -> None:
        """Raise ``ValueError`` saying what is wrong with these options (``unbounded``: for a
        stream without a fixed count, scenario e)."""
        if not unbounded and self.count < max(1, self.kills + 1):
            raise ValueError(f"count must be at least kills + 1 ({self.kills + 1}), "
                             f"not {self.count}: every fault comes mid-stream")
        if self.kills < 0:
            raise ValueError(f"kills must be 0 or more, not {self.kills}")
        if self.journal not in ("default", "off", "fsync"):
            raise ValueError(f"journal must be default, off or fsync, not {self.journal!r}")
        if self.route not in ("router", "direct"):
            raise ValueError(f"route must be router or direct, not {self.route!r}")
        if type(self.dedupe) is int and self.dedupe < 1:
            raise ValueError(f"a dedupe window must be at least 1, not {self.dedupe}")
        for name in ("quiet_s", "drain_timeout_s", "recovery_timeout_s", "unread_s",
                     "send_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a positive number of seconds")
        if (self.rate is not None and self.rate < 0) or self.ballast_bytes < 0:
            raise ValueError("rate and ballast_bytes must not be negative")


@dataclass
class Kill:
    """One fault: ``what`` was killed (``"daemon"``, ``"external"``, ``"both"``), the pids,
    and when (``time.monotonic()`` just before the first ``os.kill``)."""

    what: str
    pids: tuple[int, ...]
    mono: float


@dataclass(slots=True)
class SinkRecord:
    """One message of the run's stream as the sink received it: its number, when it arrived
    and was forwarded (``time.monotonic()`` seconds), FaultCounter's count after handling it,
    the forwarding process, and the transit ids (``None`` where messages carry none)."""

    n: int
    arrived: float
    forwarded: float
    count: int
    pid: int
    id: Any
    in_id: Any


@dataclass
class FaultResult:
    """The figures of one scenario run (see the module docstring for their definitions).

    Times in seconds, memory in bytes; ``rate``: the stream's pace (messages per second, ``0``
    unpaced); ``recovery_s`` has one entry per kill (``None``: no
    message flowed within ``recovery_timeout_s``). ``problems``: what went wrong beyond the
    figures (no recovery, not drained, a daemon that would not restart or stop);
    ``leftovers``: processes or System V queues of the run still there after its clean-up;
    ``notes``: what is worth knowing but no failure. ``foreign``: messages at the sink of
    another stream or without a number (none is expected). ``cold_start_s`` (the baseline for
    recovery times): from the first daemon's spawn to its first message at the sink.
    """

    scenario: str
    title: str
    dedupe: str
    journal: str
    route: str
    rate: float = 0.0
    sent: int = 0
    received: int = 0
    distinct: int = 0
    lost: int = 0
    duplicates: int = 0
    duplicates_same_id: int = 0
    duplicates_same_input: int = 0
    out_of_order: int = 0
    unexpected: int = 0
    foreign: int = 0
    sink_last_n: int | None = None
    state_count: int | None = None
    state_last_n: int | None = None
    state_consistent: bool = False
    state_problem: str | None = None
    kills: list[Kill] = field(default_factory=list)
    recovery_s: list[float | None] = field(default_factory=list)
    cold_start_s: float | None = None
    rss_peak_bytes: int = 0
    queue_full: int = 0
    drained: bool = False
    ids_seen: bool = False
    memory_goal: bool = False
    stale_temp_files: int = 0
    elapsed_s: float = 0.0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)

    @property
    def recovered(self) -> list[float]:
        """The recovery times of the kills after which messages flowed again."""
        return [r for r in self.recovery_s if r is not None]

    @property
    def recovery_median_s(self) -> float | None:
        """The median of :attr:`recovered` (``None`` if empty)."""
        return statistics.median(self.recovered) if self.recovered else None

    @property
    def recovery_max_s(self) -> float | None:
        """The longest of :attr:`recovered` (``None`` if empty)."""
        return max(self.recovered) if self.recovered else None

    @property
    def duplicates_after_dedupe(self) -> int:
        """Copies a receiving task with ``dedupe`` would still take: those whose transit id
        differs from the first copy's (the sink is a plain queue and takes every copy; a
        copy with the first one's id is what such a task drops)."""
        return self.duplicates - self.duplicates_same_id

    def goals_missed(self, *, dedupe_goal: bool | None = None) -> list[str]:
        """The goals this run missed, one sentence each (empty: all met): 0 lost, state
        consistent, 0 duplicates when dedupe was on (``dedupe_goal`` overrides), daemon RSS
        under :data:`RSS_LIMIT_BYTES` with backpressure felt by the producer (the unread-queue
        scenario), and no problems or leftovers."""
        missed = []
        if self.lost:
            missed.append(f"{self.lost} of {self.sent} messages lost")
        if not self.state_consistent:
            missed.append(f"state inconsistent: {self.state_problem}")
        check_dupes = self.dedupe != "off" if dedupe_goal is None else dedupe_goal
        if check_dupes and self.duplicates_after_dedupe:
            missed.append(f"{self.duplicates_after_dedupe} duplicates a receiver with dedupe "
                          f"{self.dedupe} would take")
        if self.memory_goal:
            if self.rss_peak_bytes >= RSS_LIMIT_BYTES:
                missed.append(f"daemon RSS peaked at {self.rss_peak_bytes / 2**20:.0f} MB "
                              f"(limit {RSS_LIMIT_BYTES / 2**20:.0f} MB)")
            if not self.queue_full:
                missed.append("the producer was never held back (no QueueFull)")
        missed.extend(self.problems)
        missed.extend(f"left behind: {what}" for what in self.leftovers)
        return missed

    def summary(self) -> str:
        """A few lines with every figure (for assertion messages and logs)."""
        rec = ", ".join("-" if r is None else f"{r:.2f}" for r in self.recovery_s) or "-"
        pace = f"{self.rate:.0f}/s" if self.rate else "unpaced"
        return (f"scenario {self.scenario} ({self.title}); dedupe {self.dedupe}, journal "
                f"{self.journal}, route {self.route}, stream {pace}\n"
                f"  sent {self.sent}, received {self.received}, distinct {self.distinct}, lost "
                f"{self.lost}, duplicates {self.duplicates} (same id {self.duplicates_same_id},"
                f" same input id {self.duplicates_same_input}; after dedupe "
                f"{self.duplicates_after_dedupe}),"
                f" out of order {self.out_of_order}, unexpected {self.unexpected}, other "
                f"streams {self.foreign}\n"
                f"  state: count {self.state_count}, last_n {self.state_last_n}; sink last n "
                f"{self.sink_last_n}; consistent {self.state_consistent}"
                f"{'' if self.state_consistent else ' (' + str(self.state_problem) + ')'}\n"
                f"  kills {len(self.kills)}, recovery s [{rec}], cold start "
                f"{_fmt(self.cold_start_s, '{:.2f}')} s; daemon RSS peak "
                f"{self.rss_peak_bytes / 2**20:.1f} MB; producer QueueFull {self.queue_full}; "
                f"drained {self.drained}; ids {'yes' if self.ids_seen else 'no'}; stale temp "
                f"files {self.stale_temp_files}; {self.elapsed_s:.1f} s\n"
                + "".join(f"  problem: {p}\n" for p in self.problems)
                + "".join(f"  left behind: {w}\n" for w in self.leftovers)
                + "".join(f"  note: {n}\n" for n in self.notes))


def _fmt(value: float | None, fmt: str) -> str:
    """``value`` formatted with ``fmt``, or ``-`` for ``None``."""
    return "-" if value is None else fmt.format(value)


# -- the sink's figures (pure) ---------------------------------------------------------------


def sink_figures(records: list[SinkRecord], sent: int) -> dict[str, Any]:
    """Lost, duplicates, out of order (see the module docstring) of the ``records`` of one
    stream, in arrival order, for a stream that sent the numbers ``0 .. sent - 1``.

    Returns ``{"received", "distinct", "lost", "duplicates", "duplicates_same_id",
    "duplicates_same_input", "out_of_order", "unexpected", "last_n", "ids_seen"}``
    (``duplicates_same_id``: repeats carrying the first copy's transit id,
    ``duplicates_same_input``: repeats forwarded from an input with the first copy's input id);
    ``unexpected``: distinct numbers
    outside ``0 .. sent - 1`` (not counted as received for ``lost``), ``last_n``: the number
    of the last message received (``None`` if none), ``ids_seen``: whether any message
    carried a transit id.
    """
    seen: set[int] = set()
    first: dict[int, SinkRecord] = {}
    duplicates = same_id = same_input = out_of_order = 0
    previous: int | None = None
    for record in records:
        if record.n in seen:
            duplicates += 1
            original = first[record.n]
            if record.id is not None and original.id == record.id:
                same_id += 1
            if record.in_id is not None and original.in_id == record.in_id:
                same_input += 1
            continue
        seen.add(record.n)
        first[record.n] = record
        if previous is not None and record.n < previous:
            out_of_order += 1
        previous = record.n
    expected = sum(1 for n in seen if 0 <= n < sent)
    return {
        "received": len(records),
        "distinct": len(seen),
        "lost": sent - expected,
        "duplicates": duplicates,
        "duplicates_same_id": same_id,
        "duplicates_same_input": same_input,
        "out_of_order": out_of_order,
        "unexpected": len(seen) - expected,
        "last_n": records[-1].n if records else None,
        "ids_seen": any(r.id is not None for r in records),
    }


def state_consistency(state: dict[str, Any] | None, stream: str, distinct: int,
                      sink_last_n: int | None, ballast_bytes: int = 0
                      ) -> tuple[bool, str | None, int | None, int | None]:
    """Whether FaultCounter's saved ``state`` agrees with what the sink received (see the
    module docstring): ``(consistent, why not, count, last_n)``. ``state``: the parsed state
    file (``None``: there was none, or it was unusable)."""
    if state is None:
        return False, "no usable state file", None, None
    mine = (state.get("streams") or {}).get(stream)
    problems = []
    if not isinstance(mine, dict):
        count = last_n = None
        if distinct:
            problems.append(f"the state has no count for the stream ({distinct} distinct "
                            "received)")
    else:
        count, last_n = mine.get("count"), mine.get("last_n")
        if count != distinct:
            problems.append(f"count {count} != {distinct} distinct received")
        if last_n != sink_last_n:
            problems.append(f"last_n {last_n} != last received {sink_last_n}")
    if ballast_bytes and len(state.get("ballast") or "") != ballast_bytes:
        problems.append(f"ballast of {len(state.get('ballast') or '')} bytes, not "
                        f"{ballast_bytes}")
    return not problems, "; ".join(problems) or None, count, last_n


# -- processes -------------------------------------------------------------------------------


class DaemonProcess:
    """A ``multimodule`` daemon subprocess, its stdout and stderr read line by line (kept in
    memory and copied to ``log_path``) so that a line can be awaited."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path, log_path: Path):
        self.spawned = time.monotonic()
        self.log = open(log_path, "w")  # noqa: SIM115 - closed by the reader at EOF
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        self.closed = False
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True,
                                        name=f"daemon-{self.proc.pid}")
        self._reader.start()

    @property
    def pid(self) -> int:
        """The daemon's process id."""
        return self.proc.pid

    def _read(self) -> None:
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.log.write(line + "\n")
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        self.proc.stdout.close()
        self.log.close()
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def mark(self) -> int:
        """Lines so far (a start for :meth:`wait_line`)."""
        with self._cond:
            return len(self.lines)

    def wait_line(self, text: str, start: int = 0, timeout: float = READY_TIMEOUT_S
                  ) -> str | None:
        """The first line from index ``start`` containing ``text``, waiting at most
        ``timeout`` seconds; ``None`` if none came (or the output ended)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            index = start
            while True:
                while index < len(self.lines):
                    if text in self.lines[index]:
                        return self.lines[index]
                    index += 1
                remaining = deadline - time.monotonic()
                if self.closed or remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of output (for reports)."""
        with self._cond:
            return "\n".join(self.lines[-lines:])

    def alive(self) -> bool:
        """Whether the daemon still runs."""
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL (if still running) and reap."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self._reader.join(10)


class Stream:
    """The producer: a process sending ``{"n": i, "stream": name}`` to FaultCounter's queue
    for ``i = 0 .. count - 1`` (``count = 0``: until :meth:`stop`), in order, none lost or
    repeated (see the module docstring). ``sent`` and ``queue_full`` follow its progress
    reports; :meth:`wait_sent` and :meth:`wait_done` await them."""

    def __init__(self, pipeline: Pipeline, name: str, count: int, send_timeout_s: float,
                 rate: float = 0.0):
        self.name = name
        self.count = count
        self.sent = 0
        self.queue_full = 0
        self.done = False
        self.started: float | None = None
        every = max(1, min(200, count // 200)) if count else 200
        self.stderr_path = pipeline.base / "producer.stderr"
        self._argv = [sys.executable, str(Path(__file__).resolve()), "produce",
                      "--transit-dir", str(pipeline.transit_dir), "--qname", COUNTER,
                      "--stream", name, "--count", str(count), "--progress-every", str(every),
                      "--send-timeout", str(send_timeout_s), "--rate", str(rate)]
        self._env = pipeline.env
        self._cond = threading.Condition()
        self.proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        """Start the producer process."""
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self._argv, env=self._env, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=err)
        self.started = time.monotonic()
        self._reader = threading.Thread(target=self._read, daemon=True, name="producer")
        self._reader.start()

    def _read(self) -> None:
        for raw in iter(self.proc.stdout.readline, b""):
            fields = raw.split()
            if len(fields) == 3 and fields[0] in (b"sent", b"done"):
                with self._cond:
                    self.sent, self.queue_full = int(fields[1]), int(fields[2])
                    self.done = fields[0] == b"done"
                    self._cond.notify_all()
        self.proc.stdout.close()
        with self._cond:
            self._cond.notify_all()

    def _failed(self) -> str:
        code = self.proc.poll()
        err = self.stderr_path.read_text(errors="replace")[-2000:]
        return f"producer exited with {code} after {self.sent} messages: {err}"

    def wait_sent(self, count: int, timeout: float) -> bool:
        """Wait until ``count`` numbers are sent (or the stream is done); ``False`` after
        ``timeout`` seconds. Raises ``RuntimeError`` if the producer died."""
        with self._cond:
            ok = self._cond.wait_for(lambda: self.sent >= count or self.done
                                     or self.proc.poll() is not None, timeout)
            if self.proc.poll() is not None and not self.done and self.sent < count:
                raise RuntimeError(self._failed())
            return bool(ok)

    def wait_done(self, timeout: float) -> bool:
        """Wait until the producer reported its last number; ``False`` after ``timeout`` s.
        Raises ``RuntimeError`` if it died without reporting."""
        with self._cond:
            ok = self._cond.wait_for(lambda: self.done or self.proc.poll() is not None,
                                     timeout)
        if ok and not self.done:
            self.proc.wait(10)
            self._reader.join(10)
            if not self.done:
                raise RuntimeError(self._failed())
        return self.done

    def stop(self) -> None:
        """Ask the producer to stop after the number in hand (it then reports ``done``)."""
        if self.proc is not None and self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()

    def kill(self) -> None:
        """SIGKILL the producer if it still runs, and reap it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        if self._reader is not None:
            self._reader.join(10)


class Sink:
    """Reads ``qname`` in a thread, keeping a :class:`SinkRecord` for each message of
    ``stream`` (others count in ``foreign``). Starts paused if ``paused``."""

    def __init__(self, transit: Transit, qname: str, stream: str, *, paused: bool = False):
        self.transit = transit
        self.qname = qname
        self.stream = stream
        self.records: list[SinkRecord] = []
        self.foreign = 0
        self.bad = 0
        self.last_arrival = time.monotonic()
        self.latest_forwarded = float("-inf")
        self._reading = threading.Event()
        if not paused:
            self._reading.set()
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True, name="sink")

    def start(self) -> None:
        """Start the reader thread."""
        self._thread.start()

    def pause(self) -> None:
        """Stop reading (the message being taken, if any, is still recorded)."""
        self._reading.clear()

    def resume(self) -> None:
        """Read again."""
        self._reading.set()

    def stop(self) -> None:
        """Stop the reader thread (within its 0.1 s receive timeout)."""
        self._stop.set()
        self._reading.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def _run(self) -> None:
        receive = self.transit.receive
        while not self._stop.is_set():
            if not self._reading.is_set():
                self._reading.wait()
                continue
            try:
                message = receive(self.qname, timeout=0.1)
            except Empty:
                continue
            except TransitError:
                with self._cond:
                    self.bad += 1
                continue
            arrived = time.monotonic()
            meta = message.get(META_KEY)
            with self._cond:
                self.last_arrival = arrived
                if message.get("stream") != self.stream or type(message.get("n")) is not int:
                    self.foreign += 1
                else:
                    forwarded = float(message.get("forwarded_mono") or 0.0)
                    self.records.append(SinkRecord(
                        message["n"], arrived, forwarded, message.get("count") or 0,
                        message.get("pid") or 0,
                        meta.get("id") if isinstance(meta, dict) else None,
                        message.get("in_id")))
                    if forwarded > self.latest_forwarded:
                        self.latest_forwarded = forwarded
                self._cond.notify_all()

    def wait_forwarded_after(self, mono: float, timeout: float) -> bool:
        """Wait until a message forwarded after ``mono`` (``time.monotonic()``) arrives;
        ``False`` after ``timeout`` seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: self.latest_forwarded > mono, timeout)

    def wait_received(self, count: int, timeout: float) -> bool:
        """Wait until ``count`` messages of the stream arrived; ``False`` after ``timeout``."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self.records) >= count, timeout)

    def wait_quiet(self, quiet_s: float, deadline: float) -> bool:
        """Wait until no message arrived for ``quiet_s`` seconds; ``False`` if
        ``deadline`` (``time.monotonic()``) comes first."""
        with self._cond:
            while True:
                now = time.monotonic()
                idle = now - self.last_arrival
                if idle >= quiet_s:
                    return True
                if now >= deadline:
                    return False
                self._cond.wait(min(quiet_s - idle, deadline - now))

    def wait_any(self, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) for the next message."""
        with self._cond:
            before = self.last_arrival
            self._cond.wait_for(lambda: self.last_arrival != before, timeout)

    def snapshot(self) -> list[SinkRecord]:
        """The records so far, in arrival order (a copy)."""
        with self._cond:
            return list(self.records)


# -- one run ---------------------------------------------------------------------------------


def daemon_supports(flag: str) -> bool:
    """Whether this checkout's ``multimodule`` accepts ``flag`` (from its ``--help``)."""
    from multimodule.cli.daemon import build_parser

    return flag in build_parser().format_help()


def dedupe_is_reserved() -> bool:
    """Whether ``dedupe`` is a reserved task key (the framework's, valid for every task)."""
    from multimodule.config import RESERVED_KEYS

    return "dedupe" in RESERVED_KEYS


class Pipeline:
    """One run's workspace and processes (see the module docstring): ``base`` holds
    ``tasks/``, ``state/``, ``config.toml`` and the logs; ``transit_dir`` its queues.

    Use as a context manager: leaving it kills what still runs (the producer, the daemon,
    external tasks holding a lock in the state directory) and removes every System V queue
    of ``transit_dir``.
    """

    def __init__(self, base: Path, transit_dir: Path, options: Options, *, external: bool,
                 stream: str, sink_paused: bool = False):
        self.base = base
        self.transit_dir = transit_dir
        self.options = options
        self.external = external
        self.task_dir = base / "tasks"
        self.state_dir = base / "state"
        self.config_path = base / "config.toml"
        self.env = dict(os.environ)
        self.env[ENV_TRANSIT_DIR] = str(transit_dir)
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        self.env["PYTHONUNBUFFERED"] = "1"
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            self.env.pop(name, None)
        self.transit = Transit(transit_dir)
        self.daemon: DaemonProcess | None = None
        self.daemons: list[DaemonProcess] = []
        self.kills: list[Kill] = []
        self.problems: list[str] = []
        self.notes: list[str] = []
        #: Every process of the run (daemons, FaultCounter's processes, the producer, mmctl).
        self.pids: set[int] = set()
        #: What :meth:`cleanup` found still there after removing it (processes, queues).
        self.leftovers: list[str] = []
        self.journal = self._journal_mode()
        self.stream = Stream(self, stream, options.count, options.send_timeout_s,
                             options.rate)
        self.sink = Sink(self.transit, SINK_QUEUE, stream, paused=sink_paused)
        self.rss_peak = 0
        #: Set once the daemon's resident memory passed ``options.rss_cap_bytes``.
        self.rss_over_cap = threading.Event()
        self._sampling = threading.Event()
        self._sampler = threading.Thread(target=self._sample_rss, daemon=True, name="rss")
        self._mmctl_procs: list[subprocess.Popen] = []

    # -- set-up ----------------------------------------------------------------------------

    def _journal_mode(self) -> str:
        wanted = self.options.journal
        if wanted == "default":
            return "default"
        flag = {"off": "--no-journal", "fsync": "--journal-fsync"}[wanted]
        return wanted if daemon_supports(flag) else f"{wanted} (not supported: {flag} absent)"

    def daemon_flags(self) -> list[str]:
        """The daemon's journal options for the mode in force (none when unsupported), and
        its outbox bound if the options give one."""
        flags = []
        if self.options.outbox_max_bytes is not None:
            flags += ["--outbox-max-bytes", str(self.options.outbox_max_bytes)]
        if self.journal == "off":
            return flags + ["--no-journal"]
        if self.journal == "fsync":
            return flags + ["--journal-fsync"]
        return flags

    def write_files(self, *, ballast_bytes: int = 0, save_state_s: float | None = None) -> None:
        """FaultCounter's module and the config: FaultCounter (external or not, its sink,
        dedupe, ballast, save interval) and the Router's route to the sink."""
        self.task_dir.mkdir(parents=True, exist_ok=True)
        (self.task_dir / f"{COUNTER}.py").write_text(COUNTER_SOURCE.lstrip("\n"))
        dedupe = self.options.dedupe
        dedupe_line = ("" if dedupe is False else
                       f"dedupe = {'true' if dedupe is True else int(dedupe)}\n")
        lines = [f"[{COUNTER}]", f"is_external = {'true' if self.external else 'false'}"]
        if self.options.route == "direct":
            lines.append(f'sink = "{SINK_QUEUE}"')
        if ballast_bytes:
            lines.append(f"ballast_bytes = {ballast_bytes}")
        if save_state_s is not None:
            lines.append(f"intervals = {{ save_state = {save_state_s} }}")
        text = "\n".join(lines) + "\n" + dedupe_line + "\n[Router]\n"
        if dedupe is not False and dedupe_is_reserved():
            text += dedupe_line
        text += (f'routes = [ {{ match = {{ source = "{COUNTER}" }}, '
                 f'forwards = [ {{ qname = "{SINK_QUEUE}" }} ] }} ]\n')
        self.config_path.write_text(text)

    # -- the daemon ------------------------------------------------------------------------

    def start_daemon(self) -> DaemonProcess:
        """Start a daemon and wait until it runs; raises ``RuntimeError`` (with its output)
        if it does not say so within :data:`READY_TIMEOUT_S`."""
        argv = [sys.executable, "-m", "multimodule.cli.daemon", "-c", str(self.config_path),
                "--task-path", str(self.task_dir), "-s", str(self.state_dir),
                "-T", str(self.transit_dir), "--task-backend", "detached",
                *self.daemon_flags()]
        daemon = DaemonProcess(argv, self.env, self.base,
                               self.base / f"daemon-{len(self.daemons)}.log")
        self.daemons.append(daemon)
        self.daemon = daemon
        self.pids.add(daemon.pid)
        if daemon.wait_line(f"running (pid {daemon.pid})", timeout=READY_TIMEOUT_S) is None:
            daemon.kill()
            raise RuntimeError(f"daemon {daemon.pid} did not start within "
                               f"{READY_TIMEOUT_S:g} s:\n{daemon.tail()}")
        return daemon

    def kill_daemon(self) -> Kill:
        """``kill -9`` the daemon (recorded) and reap it."""
        daemon = self.daemon
        kill = Kill("daemon", (daemon.pid,), time.monotonic())
        os.kill(daemon.pid, signal.SIGKILL)
        self.kills.append(kill)
        daemon.kill()
        return kill

    def external_pid(self) -> int | None:
        """The pid of FaultCounter's own process (holding its lock), or ``None``."""
        try:
            return lock_holder(self.state_dir / f"task-{COUNTER}.lock")
        except OSError:
            return None

    def wait_external(self, not_pid: int | None = None, timeout: float = 30.0) -> int | None:
        """Wait for FaultCounter's own process (other than ``not_pid``); its pid or ``None``."""
        found: list[int] = []

        def running() -> bool:
            pid = self.external_pid()
            if pid is not None and pid != not_pid:
                found.append(pid)
                self.pids.add(pid)
                return True
            return False

        return found[-1] if wait_until(running, timeout) else None

    def kill_external(self, pid: int) -> Kill:
        """``kill -9`` FaultCounter's own process ``pid`` (recorded)."""
        kill = Kill("external", (pid,), time.monotonic())
        os.kill(pid, signal.SIGKILL)
        self.kills.append(kill)
        return kill

    def kill_both(self, external_pid: int) -> Kill:
        """``kill -9`` FaultCounter's process and the daemon, one right after the other."""
        daemon = self.daemon
        kill = Kill("both", (external_pid, daemon.pid), time.monotonic())
        os.kill(external_pid, signal.SIGKILL)
        os.kill(daemon.pid, signal.SIGKILL)
        self.kills.append(kill)
        daemon.kill()
        return kill

    def wait_recovered(self, kill: Kill) -> bool:
        """Wait until a message forwarded after ``kill`` reaches the sink (bounded by
        ``recovery_timeout_s``); a timeout is recorded as a problem, and so is a kill after
        which nothing was left to flow (the stream ended and the pipeline is idle)."""
        deadline = time.monotonic() + self.options.recovery_timeout_s
        while time.monotonic() < deadline:
            slice_s = min(0.5, max(0.0, deadline - time.monotonic()))
            if self.sink.wait_forwarded_after(kill.mono, slice_s):
                return True
            if self.stream.done and self.idle():
                self.problems.append(f"nothing was left to flow after the kill of {kill.what} "
                                     f"{kill.pids}: the stream had ended (pace it: a lower "
                                     "rate or a larger count)")
                return False
        self.problems.append(f"no message flowed within {self.options.recovery_timeout_s:g} s "
                             f"of the kill of {kill.what} {kill.pids}")
        return False

    def mmctl(self, *args: str, wait: float = 10.0) -> tuple[int, str, str]:
        """``mmctl ARGS`` in this process against the run's transit directory;
        ``(status, stdout, stderr)``."""
        from multimodule.cli import mmctl

        out, err = io.StringIO(), io.StringIO()
        argv = [args[0], "-T", str(self.transit_dir), "--wait", str(wait), *args[1:]]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = mmctl.main(argv)
        return status, out.getvalue(), err.getvalue()

    def mmctl_background(self, *args: str) -> subprocess.Popen:
        """``mmctl ARGS`` as a process of its own, not waited for (reaped at the end)."""
        proc = subprocess.Popen([sys.executable, "-m", "multimodule.cli.mmctl", *args],
                                env=self.env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._mmctl_procs.append(proc)
        self.pids.add(proc.pid)
        return proc

    def status(self) -> dict[str, Any] | None:
        """The daemon's ``mmctl status --json``, or ``None`` if it does not answer."""
        if self.daemon is None or not self.daemon.alive():
            return None
        code, out, _ = self.mmctl("status", "--json", wait=5.0)
        return json.loads(out) if code == 0 else None

    def counter_runs_outside(self) -> bool | None:
        """Whether the daemon runs FaultCounter in its own process (``None``: no answer)."""
        status = self.status()
        return None if status is None else COUNTER in status["externals"]

    # -- memory ----------------------------------------------------------------------------

    def _sample_rss(self) -> None:
        while not self._sampling.wait(RSS_SAMPLE_S):
            daemon = self.daemon
            if daemon is None:
                continue
            try:
                rss = psutil.Process(daemon.pid).memory_info().rss
            except psutil.Error:
                continue
            self.rss_peak = max(self.rss_peak, rss)
            if rss > self.options.rss_cap_bytes:
                self.rss_over_cap.set()

    # -- the end of a run ------------------------------------------------------------------

    def idle(self) -> bool:
        """Whether every queue of the pipeline is empty: the System V queues, and (asked of
        the daemon) its tasks' memory and its overflow; and FaultCounter's own process, if it
        has one, runs (while it is down its journal holds what it has not handled)."""
        for qname in (COUNTER, ROUTER, SINK_QUEUE):
            try:
                if self.transit.stat(qname).messages:
                    return False
            except TransitError:
                continue  # never used
        status = self.status()
        if status is None:
            return False
        if any(status.get("outboxes", {}).values()):
            return False
        external = (status.get("externals") or {}).get(COUNTER)
        if external is not None and external.get("state") != "active":
            return False  # down (restart backoff): what it has not handled is in its journal
        return not any(t.get("queue_depth") for t in status["tasks"].values())

    def drain(self) -> bool:
        """After the stream ended: wait until the sink was quiet for ``quiet_s`` and the
        pipeline is idle, within ``drain_timeout_s``; whether it drained."""
        deadline = time.monotonic() + self.options.drain_timeout_s
        while time.monotonic() < deadline:
            if not self.sink.wait_quiet(self.options.quiet_s, deadline):
                break
            if self.idle():
                return True
            self.sink.wait_any(min(0.25, max(0.0, deadline - time.monotonic())))
        self.problems.append(f"not drained within {self.options.drain_timeout_s:g} s")
        return False

    def stop_orderly(self) -> None:
        """``mmctl stop --externals``: the daemon and FaultCounter's own process save their
        state and exit. A daemon that does not exit cleanly is a problem (and killed)."""
        daemon = self.daemon
        if daemon is None or not daemon.alive():
            self.problems.append("no daemon running at the end of the stream")
            return
        code, _, err = self.mmctl("stop", "--externals", wait=30.0)
        if code != 0:
            self.problems.append(f"mmctl stop failed ({code}): {err.strip()}")
        try:
            status = daemon.proc.wait(40)
        except subprocess.TimeoutExpired:
            self.problems.append(f"daemon {daemon.pid} still running 40 s after mmctl stop")
            daemon.kill()
            return
        daemon.kill()  # reaps, joins the reader
        if status != 0:
            self.problems.append(f"daemon exited with {status} after mmctl stop:\n"
                                 f"{daemon.tail()}")
        pid = self.external_pid()
        if pid is not None:
            self.problems.append(f"{COUNTER}'s process {pid} still runs after mmctl stop "
                                 "--externals")

    def saved_state(self) -> tuple[dict[str, Any] | None, str | None]:
        """FaultCounter's state file, parsed, and why it is unusable (``None`` if usable)."""
        aside = sorted(self.state_dir.glob(f"{COUNTER}.state.json.corrupt-*"))
        from multimodule.state import Checkpoint
        try:
            saved = json.loads((self.state_dir / f"{COUNTER}.state.json").read_bytes())
            state = Checkpoint.from_json(saved, True).state  # the state in its checkpoint
        except FileNotFoundError:
            return None, "no state file"
        except (OSError, ValueError, TypeError) as exc:
            return None, f"state file unreadable: {exc}"
        if aside:
            return state, f"a state file was set aside as corrupt ({aside[0].name})"
        return state, None

    def stale_temp_files(self) -> int:
        """Temporary files of interrupted state saves left in the state directory."""
        return len(list(self.state_dir.glob(f".{COUNTER}.state.json.tmp-*")))

    # -- context -----------------------------------------------------------------------------

    def __enter__(self) -> Pipeline:
        self.base.mkdir(parents=True, exist_ok=True)
        ensure_handler()  # timed System V waits in threads need it installed on this thread
        self._sampler.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.cleanup()

    def cleanup(self) -> None:
        """Kill what still runs, remove every queue; never raises for what is already gone."""
        self._sampling.set()
        if self.stream.proc is not None:
            self.pids.add(self.stream.proc.pid)
        self.stream.kill()
        self.sink.stop()
        for daemon in self.daemons:
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                daemon.kill()
        for lock in self.state_dir.glob("task-*.lock"):
            try:
                pid = lock_holder(lock)
            except OSError:
                continue
            if pid is not None:
                self.pids.add(pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(psutil.Error):
                    psutil.Process(pid).wait(10)
        for proc in self._mmctl_procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        if self._sampler.is_alive():
            self._sampler.join(5)
        queues = []
        with contextlib.suppress(MultiModuleError, OSError):
            queues = self.transit.queues()
            self.transit.remove_all()
        self.leftovers = [f"process {pid} ({_describe(pid)})" for pid in sorted(self.pids)
                          if _alive(pid)]
        self.leftovers += [f"System V queue {q.name!r} (id {q.id})" for q in queues
                           if _queue_exists(q.id)]


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not count)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _describe(pid: int) -> str:
    """``pid``'s command line, shortened (for reports)."""
    try:
        return " ".join(psutil.Process(pid).cmdline())[:120]
    except psutil.Error:
        return "gone"


def _queue_exists(queue_id: int | None) -> bool:
    """Whether the System V queue ``queue_id`` still exists (``/proc/sysvipc/msg``)."""
    if queue_id is None:
        return False
    try:
        with open("/proc/sysvipc/msg") as table:
            next(table)
            return any(line.split()[1] == str(queue_id) for line in table)
    except (OSError, StopIteration, IndexError):
        return False


# -- the scenarios ---------------------------------------------------------------------------


def kill_thresholds(count: int, kills: int) -> list[int]:
    """When each kill comes: after ``(i + 1) * count / (kills + 1)`` numbers are sent, so
    every kill falls mid-stream with messages still to come after it."""
    return [(i + 1) * count // (kills + 1) for i in range(kills)]


def _wait_sent(pipe: Pipeline, threshold: int, fault: int) -> bool:
    """Wait until ``threshold`` numbers are sent, for fault number ``fault`` (from 1);
    whether the fault can still come mid-stream (else a problem is recorded: the stream ended
    first, or stopped moving)."""
    if not pipe.stream.wait_sent(threshold, pipe.options.recovery_timeout_s * 2):
        pipe.problems.append(f"fault {fault}: the producer did not reach {threshold} messages "
                             f"(sent {pipe.stream.sent}): the pipeline stopped taking them")
        return False
    if pipe.stream.done:
        pipe.problems.append(f"fault {fault}: the stream ended before it (pace it: a lower "
                             "rate or a larger count); the remaining faults are skipped")
        return False
    return True


def plan_none(pipe: Pipeline) -> None:
    """No fault: the baseline that shows the instrument itself loses nothing."""


def plan_daemon_kills(pipe: Pipeline) -> None:
    """(a) ``kill -9`` the daemon ``kills`` times mid-stream, restarting it each time; before
    every other kill the sink stops reading until its queue is full (the kill then finds
    messages waiting for room), and reads again once the daemon is killed."""
    for i, threshold in enumerate(kill_thresholds(pipe.options.count, pipe.options.kills)):
        if not _wait_sent(pipe, threshold, i + 1):
            return
        if i % 2 == 1:
            pipe.sink.pause()
            if not wait_until(lambda: _fill(pipe.transit, SINK_QUEUE) >= 0.9, 10.0):
                pipe.problems.append(f"kill {i + 1}: the paused sink's queue did not fill")
        kill = pipe.kill_daemon()
        pipe.sink.resume()
        pipe.start_daemon()
        pipe.wait_recovered(kill)


def _fill(transit: Transit, qname: str) -> float:
    """How full the System V queue ``qname`` is (0.0 to 1.0; 0.0 if it does not exist)."""
    try:
        return transit.stat(qname).fill or 0.0
    except TransitError:
        return 0.0


def plan_external_kills(pipe: Pipeline) -> None:
    """(b) ``kill -9`` FaultCounter's own process ``kills`` times mid-stream; the daemon
    restarts it (after its backoff: 1 s, doubling). More than 5 kills within 5 minutes put the
    task in failsafe, by design (the monitor's ``restarts`` metric): it then stays stopped."""
    killed: int | None = None
    for i, threshold in enumerate(kill_thresholds(pipe.options.count, pipe.options.kills)):
        if not _wait_sent(pipe, threshold, i + 1):
            return
        pid = pipe.wait_external(not_pid=killed)
        if pid is None:
            pipe.problems.append(f"{COUNTER}'s process did not come back")
            return
        kill = pipe.kill_external(pid)
        killed = pid
        pipe.wait_recovered(kill)


def plan_both_kills(pipe: Pipeline) -> None:
    """(c) ``kill -9`` FaultCounter's own process and the daemon together, ``kills`` times;
    the restarted daemon starts FaultCounter again."""
    killed: int | None = None
    for i, threshold in enumerate(kill_thresholds(pipe.options.count, pipe.options.kills)):
        if not _wait_sent(pipe, threshold, i + 1):
            return
        pid = pipe.wait_external(not_pid=killed)
        if pid is None:
            pipe.problems.append(f"{COUNTER}'s process did not come back")
            return
        kill = pipe.kill_both(pid)
        killed = pid
        pipe.start_daemon()
        pipe.wait_recovered(kill)


#: Where in a migration scenario d kills the daemon, in turn: as it begins, and as it ends.
MIGRATION_KILL_POINTS = ("migrating task {name} to", "task {name} now runs in")


def plan_killed_migrations(pipe: Pipeline) -> None:
    """(d) ``kills`` times: ``mmctl migrate FaultCounter`` to the other side while the stream
    flows, and ``kill -9`` of the daemon during the move (in turn at the daemon's line saying
    the migration begins, and at the one saying it is done); restart, and go on from wherever
    the restarted daemon runs FaultCounter."""
    for i, threshold in enumerate(kill_thresholds(pipe.options.count, pipe.options.kills)):
        if not _wait_sent(pipe, threshold, i + 1):
            return
        outside = pipe.counter_runs_outside()
        if outside is None:
            pipe.problems.append("the daemon did not answer mmctl status")
            return
        mark = pipe.daemon.mark()
        pipe.mmctl_background("migrate", COUNTER, "--internal" if outside else "--external",
                              "-T", str(pipe.transit_dir), "--wait", "30")
        point = MIGRATION_KILL_POINTS[i % len(MIGRATION_KILL_POINTS)].format(name=COUNTER)
        if pipe.daemon.wait_line(point, start=mark, timeout=30.0) is None:
            pipe.problems.append(f"migration {i + 1}: no line {point!r} within 30 s")
        kill = pipe.kill_daemon()
        pipe.start_daemon()
        pipe.wait_recovered(kill)


def plan_unread_queue(pipe: Pipeline) -> None:
    """(e) The sink queue stays unread for ``unread_s`` seconds while the producer sends as
    fast as it may (its stream has no fixed count); then the producer stops and the sink
    reads again. The daemon's memory is sampled throughout; the phase ends early if it passes
    ``rss_cap_bytes``."""
    began = time.monotonic()
    if pipe.rss_over_cap.wait(pipe.options.unread_s):  # else the phase ran its full length
        pipe.notes.append(f"unread phase ended after {time.monotonic() - began:.1f} of "
                          f"{pipe.options.unread_s:g} s: the daemon's RSS passed the cap of "
                          f"{pipe.options.rss_cap_bytes / 2**20:.0f} MB")
    pipe.stream.stop()
    if not pipe.stream.wait_done(pipe.options.recovery_timeout_s):
        pipe.problems.append("the producer did not stop")
    pipe.sink.resume()


def plan_kills_during_saves(pipe: Pipeline) -> None:
    """(f) FaultCounter keeps ``ballast_bytes`` (5 MB) in its state and saves it every
    0.5 s; ``kills`` times the daemon is killed the moment a save creates its temporary
    file (inotify), i.e. while the 5 MB are being written and synced."""
    from inotify_simple import INotify, flags

    prefix = f".{COUNTER}.state.json.tmp-"
    with INotify() as watcher:
        watcher.add_watch(str(pipe.state_dir), flags.CREATE)
        for i, threshold in enumerate(kill_thresholds(pipe.options.count, pipe.options.kills)):
            if not _wait_sent(pipe, threshold, i + 1):
                return
            watcher.read(timeout=0)  # forget saves before this point
            deadline = time.monotonic() + 10.0
            saving = False
            while not saving and time.monotonic() < deadline:
                events = watcher.read(timeout=int(1000 * (deadline - time.monotonic())) or 1)
                saving = any(e.name.startswith(prefix) for e in events)
            if not saving:
                pipe.problems.append(f"kill {i + 1}: no state save began within 10 s")
            kill = pipe.kill_daemon()
            pipe.start_daemon()
            pipe.wait_recovered(kill)


@dataclass(frozen=True)
class Scenario:
    """One fault plan: ``key`` (``a``..``f``, ``0`` for none), a short ``name``, a
    ``title``, whether FaultCounter runs in its own process, the ``plan`` (called with the
    pipeline running and the stream flowing), and what it needs: a sink paused from the start
    and a stream without a fixed count (``unread``), a 5 MB state (``ballast``), the memory
    goal (``memory_goal``), and ``fault_s``, the seconds one fault takes at least (a kill,
    a restart, messages flowing again; a migration too in d), from which the stream's pace is
    set unless the options give a rate (see :meth:`pace`)."""

    key: str
    name: str
    title: str
    external: bool
    plan: Callable[[Pipeline], None]
    unread: bool = False
    ballast: bool = False
    memory_goal: bool = False
    fault_s: float = 0.0

    def pace(self, options: Options) -> float:
        """Messages per second for the stream: ``options.rate`` if given, else one that
        makes the ``count`` messages last ``(kills + 1) * fault_s`` seconds at least, so that
        every fault comes mid-stream (``0``: no limit)."""
        if options.rate is not None:
            return options.rate
        if self.fault_s <= 0 or options.kills <= 0 or self.unread:
            return 0.0
        return options.count / ((options.kills + 1) * self.fault_s)


SCENARIOS: dict[str, Scenario] = {s.key: s for s in (
    Scenario("0", "baseline", "no fault", False, plan_none),
    Scenario("a", "daemon-kill", "kill -9 of the daemon, sink full at times", False,
             plan_daemon_kills, fault_s=1.0),
    Scenario("b", "external-kill", "kill -9 of the external task", True,
             plan_external_kills, fault_s=1.0),
    Scenario("c", "both-kill", "kill -9 of the daemon and the external task", True,
             plan_both_kills, fault_s=1.0),
    Scenario("d", "migration-kill", "kill -9 of the daemon during mmctl migrate", False,
             plan_killed_migrations, fault_s=3.0),
    Scenario("e", "unread-queue", "sink queue unread", False, plan_unread_queue,
             unread=True, memory_goal=True),
    Scenario("f", "save-kill", "kill -9 during saves of a 5 MB state", False,
             plan_kills_during_saves, ballast=True, fault_s=1.5),
)}


def scenario(key_or_name: str) -> Scenario:
    """The scenario with this key (``a``) or name (``daemon-kill``); ``KeyError`` if none."""
    for s in SCENARIOS.values():
        if key_or_name in (s.key, s.name):
            return s
    raise KeyError(f"no scenario {key_or_name!r} (known: "
                   f"{', '.join(f'{s.key}/{s.name}' for s in SCENARIOS.values())})")


def run_scenario(key_or_name: str, options: Options, base: Path,
                 transit_dir: Path | None = None) -> FaultResult:
    """Run one scenario in ``base`` (made if missing; queues in ``transit_dir``, default
    ``base/transit``) and return its figures. Faults the system does not survive (no
    recovery, no drain, a failed restart) are recorded in ``problems``. Raises ``KeyError``
    for an unknown scenario, ``ValueError`` for bad ``options`` (see :meth:`Options.check`)
    and ``RuntimeError`` when the first daemon cannot start, the harness's own precondition."""
    spec = scenario(key_or_name)
    options.check(unbounded=spec.unread)
    transit_dir = transit_dir or base / "transit"
    dedupe = "off" if options.dedupe is False else (
        "on" if options.dedupe is True else f"window {options.dedupe}")
    stream_name = f"{spec.name}-{os.getpid()}-{time.time_ns()}"
    run_options = dataclasses.replace(options, count=0 if spec.unread else options.count,
                                      rate=spec.pace(options))
    started = time.monotonic()
    with Pipeline(base, transit_dir, run_options, external=spec.external, stream=stream_name,
                  sink_paused=spec.unread) as pipe:
        result = FaultResult(spec.key, spec.title, dedupe, pipe.journal, options.route,
                             rate=run_options.rate, memory_goal=spec.memory_goal)
        pipe.write_files(ballast_bytes=options.ballast_bytes if spec.ballast else 0,
                         save_state_s=0.5 if spec.ballast else options.save_state_s)
        first = pipe.start_daemon()
        pipe.sink.start()
        pipe.stream.start()
        try:
            if not spec.unread and pipe.sink.wait_received(1, READY_TIMEOUT_S):
                result.cold_start_s = pipe.sink.snapshot()[0].arrived - first.spawned
            spec.plan(pipe)
            if not pipe.stream.wait_done(max(60.0, options.recovery_timeout_s * 2)):
                pipe.problems.append(f"the producer did not finish (sent {pipe.stream.sent})")
                pipe.stream.stop()
                pipe.stream.wait_done(30.0)
        except RuntimeError as exc:  # a daemon that would not restart, a dead producer
            pipe.problems.append(f"run cut short: {exc}")
        result.drained = pipe.drain() if pipe.daemon and pipe.daemon.alive() else False
        pipe.stop_orderly()
        pipe.sink.stop()
        records = pipe.sink.snapshot()
        figures = sink_figures(records, pipe.stream.sent)
        state, state_problem = pipe.saved_state()
        consistent, why, count, last_n = state_consistency(
            state, stream_name, figures["distinct"], figures["last_n"],
            options.ballast_bytes if spec.ballast else 0)
        result.sent = pipe.stream.sent
        result.queue_full = pipe.stream.queue_full
        for key in ("received", "distinct", "lost", "duplicates", "duplicates_same_id",
                    "duplicates_same_input", "out_of_order", "unexpected", "ids_seen"):
            setattr(result, key, figures[key])
        result.sink_last_n = figures["last_n"]
        result.foreign = pipe.sink.foreign
        if pipe.sink.bad:
            pipe.problems.append(f"{pipe.sink.bad} messages at the sink could not be read")
        result.state_count, result.state_last_n = count, last_n
        result.state_consistent = consistent and state_problem is None
        result.state_problem = state_problem or why
        result.kills = list(pipe.kills)
        result.recovery_s = [recovery_time(records, kill) for kill in pipe.kills]
        result.rss_peak_bytes = pipe.rss_peak
        result.stale_temp_files = pipe.stale_temp_files()
    result.problems = list(pipe.problems)
    result.leftovers = list(pipe.leftovers)
    result.notes = list(pipe.notes)
    if result.stale_temp_files:
        result.notes.append(f"{result.stale_temp_files} temporary files of interrupted state "
                            "saves left in the state directory")
    result.elapsed_s = time.monotonic() - started
    return result


def recovery_time(records: list[SinkRecord], kill: Kill) -> float | None:
    """Seconds from ``kill`` to the arrival of the first message forwarded after it
    (``None`` if none came)."""
    after = [r.arrived for r in records if r.forwarded > kill.mono]
    return min(after) - kill.mono if after else None


# -- reporting -------------------------------------------------------------------------------

TABLE_HEADERS = ("SCENARIO", "DEDUPE", "SENT", "LOST", "DUP", "SAME ID/INPUT", "AFTER DEDUPE",
                 "OOO", "STATE",
                 "KILLS", "RECOVERY MED/MAX S", "x COLD START", "RSS MB", "FULL", "DRAINED",
                 "GOALS")


def table_row(result: FaultResult) -> tuple[str, ...]:
    """One line of the table (see :data:`TABLE_HEADERS`): recovery times also as a multiple
    of the run's cold start (daemon spawn to first message at the sink), the baseline measured
    in the same run."""
    cold = result.cold_start_s
    med, top = result.recovery_median_s, result.recovery_max_s
    ratio = "-" if not cold or med is None else f"{med / cold:.1f}/{top / cold:.1f}"
    missed = result.goals_missed()
    return (f"{result.scenario} {result.title}"[:46], result.dedupe, str(result.sent),
            str(result.lost), str(result.duplicates),
            f"{result.duplicates_same_id}/{result.duplicates_same_input}",
            str(result.duplicates_after_dedupe), str(result.out_of_order), "ok" if result.state_consistent else "BAD",
            str(len(result.kills)),
            "-" if med is None else f"{med:.2f}/{top:.2f}"
            + ("" if len(result.recovered) == len(result.kills) else
               f" ({len(result.kills) - len(result.recovered)} none)"),
            ratio, f"{result.rss_peak_bytes / 2**20:.0f}", str(result.queue_full),
            "yes" if result.drained else "NO", "met" if not missed else f"{len(missed)} missed")


def format_table(results: list[FaultResult]) -> str:
    """The results as an aligned text table."""
    rows = [TABLE_HEADERS, *(table_row(r) for r in results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_HEADERS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                     for row in rows)


# -- the producer process --------------------------------------------------------------------


def produce(argv: list[str]) -> int:
    """The producer's main (see :class:`Stream`): sends, reports ``sent N FULL`` every
    ``--progress-every`` numbers and ``done N FULL`` at the end, on stdout. Standard input
    closed means stop after the number in hand."""
    parser = argparse.ArgumentParser(prog="fault_harness.py produce")
    parser.add_argument("--transit-dir", required=True)
    parser.add_argument("--qname", required=True)
    parser.add_argument("--stream", required=True)
    parser.add_argument("--count", type=int, required=True, help="0: until stdin closes")
    parser.add_argument("--progress-every", type=int, default=100)
    parser.add_argument("--send-timeout", type=float, default=0.5)
    parser.add_argument("--rate", type=float, default=0.0, help="messages/s at most (0: no "
                        "limit)")
    args = parser.parse_args(argv)
    ensure_handler()
    transit = Transit(args.transit_dir)
    stop = threading.Event()

    def watch_stdin() -> None:
        sys.stdin.buffer.read()
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    n = full = 0
    out = sys.stdout
    began = time.monotonic()
    while not stop.is_set() and (args.count == 0 or n < args.count):
        if args.rate > 0:
            ahead = began + n / args.rate - time.monotonic()
            if ahead > 0:
                stop.wait(ahead)  # pacing the stream, not waiting for an event
        try:
            transit.send(args.qname, {"n": n, "stream": args.stream},
                         timeout=args.send_timeout)
        except QueueFull:
            full += 1
            continue
        n += 1
        if n % args.progress_every == 0:
            out.write(f"sent {n} {full}\n")
            out.flush()
    out.write(f"done {n} {full}\n")
    out.flush()
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["produce"]:
        sys.exit("usage: fault_harness.py produce --transit-dir DIR --qname Q --stream S "
                 "--count N (the producer of the fault suite; see bench/faults.py)")
    sys.exit(produce(sys.argv[2:]))
