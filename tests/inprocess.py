"""An in-process daemon for logic tests: the real :class:`Daemon` on the test's own event loop
(real transit, real System V queues where a path needs them), with a wait-until-quiet
primitive instead of subprocesses, status polling and "nothing arrived within 0.5 s".

Use the ``inproc`` fixture in an ``async def`` test::

    async def test_x(inproc):
        inproc.task("Echo", '''
            from multimodule import Task
            class Echo(Task):
                def message(self, message):
                    self.emit(message)
        ''')
        inproc.config('[Echo]\\n' + router_section(route("Echo", "out")))
        inproc.capture("out")              # sends to "out" stay in memory, for the test
        await inproc.start()
        inproc.send("Echo", {"x": 1})      # as a task in the daemon would
        await inproc.quiet()               # every queue empty, every handler idle
        assert inproc.taken("out") == [{"x": 1, "source": "Echo"}]

``quiet()`` returns once nothing is left to do: no message waiting or in hand in any task (in
memory, or in the System V queue of a task or of the control queue), no control request or
answer pending, no migration, start, unload, failsafe stop or monitor sample in progress (like
dramatiq's ``StubBroker.join()``); ``quiet(ignoring=("Task",))`` leaves out a task the test
holds up on purpose (so does ``control(..., ignoring=...)``). Records of the out-of-band
channels are kept in ``inproc.records`` instead of being written anywhere (``inproc.lines()``
renders them as the daemon prints them); ``await inproc.record(channel, text)`` waits for one.

More: ``await inproc.raw_control(message, reply_to=None)`` puts any message on the control
queue (for malformed ones; with ``reply_to`` it returns the answer on that queue);
``await inproc.mmctl(*args)`` runs mmctl (in this process, in a worker thread, over the real
control queue) and gives ``(status, stdout, stderr)``;
``await inproc.restart()`` stops the daemon (it must exit 0) and starts a new one on the same
files, as a new process would; ``await inproc.start(clock=ManualClock())`` gives the monitor a
clock that moves only by ``clock.advance(seconds)`` (then ``await daemon.monitor.sample()``
takes one sample now); ``inproc.backend`` is a :class:`FakeBackend` for external tasks.

``inproc.transit`` is the daemon's own transit: a send there to a task's queue (or the control
queue) stays in memory. To send as another process does, over System V and through the
daemon's receiver thread, use a separate :class:`Transit` on the same directory (the
``transit`` fixture).

Task modules are imported in this process: each test gets its own ``sys.path`` and forgets the
modules of its task directory at the end, so a module name may be reused by another test.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import io
import itertools
import platform
import sys
import textwrap
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from multimodule.cli import mmctl as mmctl_cli
from multimodule.config import DaemonOptions
from multimodule.errors import BackendError, Empty
from multimodule.monitor.monitor import Monitor
from multimodule.oob import Channels, format_fields, parse_spec
from multimodule.runtime.daemon import Daemon
from multimodule.supervise.base import ActiveState, TaskProcess
from multimodule.transit import META_KEY, Transit

#: Seconds a harness wait may take before the test fails.
WAIT_S = 10.0


@dataclass
class Record:
    """One out-of-band record."""

    channel: str
    task: str
    text: str
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def line(self) -> str:
        """The record as the daemon prints it on standard output (``log``) or error."""
        prefix = f"{self.task}: " if self.channel == "log" else f"{self.channel}: {self.task}: "
        return prefix + self.text + format_fields(self.fields)


class RecordingChannels(Channels):
    """Channels that keep every record (debug records of every level included)."""

    def __init__(self) -> None:
        super().__init__(parse_spec("log:1,error:2,alert:2,debug:2"), debug_level=99)
        self.records: list[Record] = []
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []

    def emit(self, channel: str, task: str, text: str, /, **fields: Any) -> None:
        if channel == "debug":
            fields.pop("level", None)
        self.counts[channel] += 1
        self.records.append(Record(channel, task, str(text), fields))
        waiters, self._waiters = self._waiters, []
        for loop, future in waiters:  # emit may come from another thread
            try:
                loop.call_soon_threadsafe(_wake, future)
            except RuntimeError:  # that loop is closed: nobody waits any more
                pass

    def changed(self) -> asyncio.Future:
        """A future done at the next record (get it before looking at :attr:`records`)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._waiters.append((loop, future))
        return future


def _wake(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class ManualClock:
    """A monotonic clock for the monitor that moves only by :meth:`advance`."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeBackend:
    """A task backend without processes, for the daemon's logic: ``start`` marks a task
    active (or raises ``fail_start``), ``stop`` inactive. ``calls`` records ``(method, task,
    thread id)``; ``status_gate``, when set, is awaited (at most ``WAIT_S``) by ``status``;
    ``restarts[task]`` is the restart count ``status`` reports (a test sets it)."""

    name = "fake"

    def __init__(self) -> None:
        self.active: dict[str, int] = {}
        self.calls: list[tuple[str, str, int]] = []
        self.fail_start: BackendError | None = None
        self.status_gate: threading.Event | None = None
        self.gate_timed_out = False
        self.restarts: dict[str, int] = {}
        #: ``(task, limits_dropin)`` of every start, in order.
        self.dropins: list[tuple[str, str | None]] = []
        self._pids = itertools.count(40000)

    def _call(self, method: str, task: str) -> None:
        self.calls.append((method, task, threading.get_ident()))

    def start(self, task: str, limits_dropin: str | None = None, limits=None) -> TaskProcess:
        self._call("start", task)
        self.dropins.append((task, limits_dropin))
        if self.fail_start is not None:
            raise self.fail_start
        self.active.setdefault(task, next(self._pids))
        return self.status(task)

    def stop(self, task: str, timeout: float = 30.0) -> None:
        self._call("stop", task)
        self.active.pop(task, None)

    def status(self, task: str) -> TaskProcess:
        self._call("status", task)
        if self.status_gate is not None and not self.status_gate.wait(WAIT_S):
            self.gate_timed_out = True
        pid = self.active.get(task)
        state = ActiveState.ACTIVE if pid else ActiveState.INACTIVE
        return TaskProcess(task, state, pid, self.restarts.get(task, 0), f"fake:{task}")


class _Daemon(Daemon):
    """The real :class:`Daemon`; its monitor's samples (the first, at start, too) count as
    work in progress for :meth:`InProcessDaemon.quiet`."""

    sampling = 0

    def after_ready(self) -> None:
        sample = self.monitor.sample

        async def counted():
            self.sampling += 1
            try:
                return await sample()
            finally:
                self.sampling -= 1

        self.monitor.sample = counted
        super().after_ready()


class InProcessDaemon:
    """See the module docstring. Files live under ``root``: ``tasks/``, ``config.toml``,
    ``state/``; queues in ``transit_dir``."""

    def __init__(self, root: Path, transit_dir: Path):
        self.root = root
        self.tasks_dir = root / "tasks"
        self.tasks_dir.mkdir()
        self.config_path = root / "config.toml"
        self.config_path.write_text("")
        self.state_dir = root / "state"
        self.transit = Transit(transit_dir)
        self.channels = RecordingChannels()
        self.backend = FakeBackend()
        self.daemon: Daemon | None = None
        self._run: asyncio.Task | None = None
        self._captures: list[str] = []
        self._replies = itertools.count()
        self._options: dict[str, Any] = {}
        self._clock: ManualClock | None = None

    # -- set-up ----------------------------------------------------------------------------

    def task(self, name: str, source: str) -> None:
        """Write task module ``name`` (dedented)."""
        (self.tasks_dir / f"{name}.py").write_text(textwrap.dedent(source))
        importlib.invalidate_caches()

    def config(self, text: str, *, atomic: bool = False) -> None:
        """Write the config file (dedented): in place, or with ``atomic`` through a temporary
        file renamed over it."""
        if atomic:
            tmp = self.config_path.with_name(f".{self.config_path.name}.new")
            tmp.write_text(textwrap.dedent(text))
            tmp.replace(self.config_path)
        else:
            self.config_path.write_text(textwrap.dedent(text))

    def capture(self, qname: str) -> None:
        """Keep what is sent to ``qname`` in this process for :meth:`taken` (call before
        :meth:`start`)."""
        self._captures.append(qname)

    @property
    def records(self) -> list[Record]:
        return self.channels.records

    def journaled(self, name: str, stateful: bool = False) -> list[dict[str, Any]]:
        """The messages task ``name``'s journal holds past its checkpoint: what it will be
        given first when it starts again (read as a new process would)."""
        from multimodule.journal import Journal
        from multimodule.state import StateStore
        store = StateStore(self.state_dir)
        checkpoint, _ = store.load(name, stateful)
        return Journal(store.journal_dir(name)).recover(checkpoint.position)

    def records_of(self, channel: str, contains: str = "") -> list[Record]:
        """Records of ``channel`` whose text contains ``contains``."""
        return [r for r in self.records if r.channel == channel and contains in r.text]

    def lines(self, *channels: str) -> list[str]:
        """The records of ``channels`` (default: all) as the daemon prints them (see
        :attr:`Record.line`)."""
        return [r.line for r in self.records if not channels or r.channel in channels]

    async def start(self, *, clock: ManualClock | None = None, **options: Any) -> Daemon:
        """Run the daemon on this loop and wait until its configured tasks are loaded (and
        quiet). ``options``: :class:`DaemonOptions` fields over the harness's defaults (no
        monitor sampling to speak of: one sample at start, then hourly). ``clock``: the
        monitor's clock (default: the real one)."""
        self._options, self._clock = options, clock
        opts = DaemonOptions(**{
            "config_file": self.config_path, "state_dir": self.state_dir,
            "task_path": [self.tasks_dir], "transit_dir": self.transit.path,
            "monitor_interval_s": 3600, "monitor_window_s": 7200, **options})
        for qname in self._captures:
            self.transit.declare_local(qname)
        monitor = Monitor(window_s=opts.monitor_window_s, clock=clock) if clock else None
        self.daemon = _Daemon(opts, transit=self.transit, channels=self.channels,
                              backend=self.backend, monitor=monitor)
        self._run = asyncio.get_running_loop().create_task(self.daemon.run())
        ready = asyncio.get_running_loop().create_task(self._ready())
        await asyncio.wait([self._run, ready], timeout=WAIT_S,
                           return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            status = self._run.result() if self._run.done() else "still starting"
            raise AssertionError(f"the daemon did not become ready ({status}): "
                                 f"{self.records_of('error')}")
        await self.quiet()
        return self.daemon

    async def _ready(self) -> None:
        while self.daemon.ready is None:
            await asyncio.sleep(0)
        await self.daemon.ready.wait()

    @property
    def running(self) -> bool:
        """Whether the daemon was started and has not exited."""
        return self._run is not None and not self._run.done()

    async def stop(self) -> int:
        """Stop the daemon as SIGTERM would; return its exit status."""
        self.daemon.request_stop()
        async with asyncio.timeout(WAIT_S * 3):
            return await self._run

    async def restart(self) -> Daemon:
        """Stop the daemon (it must exit 0) and start a new one with the same options and
        files, as a new process would (the same clock, if one was given)."""
        status = await self.stop()
        assert status == 0, self.records_of("error")
        return await self.start(clock=self._clock, **self._options)

    # -- talking to it ---------------------------------------------------------------------

    def send(self, qname: str, message: dict[str, Any]) -> None:
        """Send as a task in the daemon would (in memory to a task here)."""
        self.daemon.send(qname, message)

    def taken(self, qname: str) -> list[dict[str, Any]]:
        """What reached capture queue ``qname`` so far (without transit meta), oldest first."""
        messages = self.transit.local_queue(qname).drain()
        return [{k: v for k, v in m.items() if k != META_KEY} for m in messages]

    async def next(self, qname: str, timeout: float = WAIT_S, *, meta: bool = False
                   ) -> dict[str, Any]:
        """Await the next message on capture queue ``qname`` (without transit meta, unless
        ``meta``)."""
        async with asyncio.timeout(timeout):
            message = await self.transit.local_queue(qname).get_async()
        return message if meta else {k: v for k, v in message.items() if k != META_KEY}

    async def control(self, *, ignoring: tuple[str, ...] = (), **body: Any
                      ) -> dict[str, Any] | None:
        """Put ``{".multimodule": body}`` on the daemon's control queue with a reply queue,
        wait until quiet (``ignoring``: see :meth:`quiet`), and return the answer (``None``
        if none came)."""
        reply_to = f"reply-{next(self._replies)}"
        return await self._ask({".multimodule": {**body, "reply_to": reply_to}}, reply_to,
                               ignoring)

    async def raw_control(self, message: Any, reply_to: str | None = None
                          ) -> dict[str, Any] | None:
        """Put ``message`` as it is on the daemon's control queue and wait until quiet; with
        ``reply_to`` (the name the message gives), that queue is made first and the answer
        on it returned (``None`` if none came)."""
        if reply_to is None:
            self.transit.local_queue(self.daemon.options.control_queue).put(message)
            await self.quiet()
            return None
        return await self._ask(message, reply_to)

    async def _ask(self, message: Any, reply_to: str, ignoring: tuple[str, ...] = ()
                   ) -> dict[str, Any] | None:
        self.transit.sysv_queue(reply_to)  # the daemon answers only to a queue that exists
        self.transit.local_queue(self.daemon.options.control_queue).put(message)
        await self.quiet(ignoring=ignoring)
        try:
            reply = self.transit.receive(reply_to, timeout=0)
            reply.pop(META_KEY, None)
            return reply
        except Empty:
            return None
        finally:
            self.transit.remove(reply_to)

    async def mmctl(self, *args: str, timeout: float = WAIT_S * 2) -> tuple[int, str, str]:
        """Run ``mmctl ARGS`` (this process, a worker thread, the real control queue) while
        the daemon runs on this loop; return ``(status, stdout, stderr)``."""
        def run() -> tuple[int, str, str]:
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                status = mmctl_cli.main(list(args))
            return status, out.getvalue(), err.getvalue()

        async with asyncio.timeout(timeout):
            return await asyncio.get_running_loop().run_in_executor(None, run)

    async def record(self, channel: str, contains: str = "", *, since: int = 0,
                     timeout: float = WAIT_S) -> Record:
        """Await the first record of ``channel`` whose text contains ``contains``, among
        the records from index ``since`` of :attr:`records` on (one already there counts);
        fails after ``timeout``."""
        def found() -> list[Record]:
            return [r for r in self.records[since:]
                    if r.channel == channel and contains in r.text]

        try:
            async with asyncio.timeout(timeout):
                while True:
                    changed = self.channels.changed()
                    if found():
                        return found()[0]
                    await changed
        except TimeoutError:
            raise AssertionError(f"no {channel} record with {contains!r} within {timeout} s; "
                                 f"records: {self.lines()}") from None

    # -- quiescence ------------------------------------------------------------------------

    def busy(self) -> list[str]:
        """What still has work to do (empty when quiet)."""
        d = self.daemon
        out = [f"task {n}" for n, r in d.runners.items() if not r.idle]
        receivers = [(n, r.receiver) for n, r in d.runners.items() if r.receiver is not None]
        if d.control is not None and d.control.receiver is not None:
            receivers.append(("control", d.control.receiver))
        for n, receiver in receivers:
            if receiver.pending:
                out.append(f"receiver {n}")
            elif receiver.running and (receiver.queue.stat().messages
                                       or not _blocked_in_msgrcv(receiver)):
                # Messages in the kernel queue, or the worker between msgrcv and the hand-over
                out.append(f"System V queue {n}")
        if d.control is not None and not d.control.idle:
            out.append("control")
        if d.sampling:
            out.append("monitor sample")
        if d.migrations is not None:
            out += [f"migration {n}" for n in d.migrations.in_progress]
        if d.externals is not None:
            out += [f"start {n}" for n in d.externals.starting]
        if d.failsafe is not None:
            out += [f"failsafe {n}" for n in d.failsafe.entering]
        if getattr(d, "tasks", None) is not None:
            out += [f"stop, start or restart {n}" for n in d.tasks.busy]
        return out

    async def quiet(self, timeout: float = WAIT_S, *, ignoring: tuple[str, ...] = ()) -> None:
        """Wait until nothing is left to do (see the module docstring), checked on three
        turns of the loop in a row; fails naming what is still busy after ``timeout``.
        ``ignoring``: names of tasks held up on purpose (a handler waiting for the test),
        whose work does not count."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        calm = 0
        while calm < 3:
            await asyncio.sleep(0)
            if self._run is not None and self._run.done():
                return
            busy = [b for b in self.busy() if b.rsplit(" ", 1)[-1] not in ignoring]
            if not busy:
                calm += 1
                continue
            calm = 0
            if loop.time() > deadline:
                raise AssertionError(f"not quiet after {timeout} s: {busy}")
            await asyncio.sleep(0.001)  # work in a worker thread: give it the CPU


#: msgrcv's system call number by machine (as /proc/PID/task/TID/syscall shows it).
_MSGRCV = {"x86_64": "70", "aarch64": "188"}


def _blocked_in_msgrcv(receiver) -> bool:
    """Whether a receiver's worker thread sleeps in ``msgrcv`` now: only then has it handed
    over everything it took (between ``msgrcv`` returning and the hand-over, the kernel queue
    is already empty). Unknown machine or no /proc: assume so (the old, racy check)."""
    number = _MSGRCV.get(platform.machine())
    if number is None or receiver.native_id is None:
        return True
    try:
        with open(f"/proc/self/task/{receiver.native_id}/syscall") as f:
            return f.read().split(" ", 1)[0] == number
    except OSError:
        return True


def strip(messages: list[dict[str, Any]], *keys: str) -> list[dict[str, Any]]:
    """``messages`` without ``keys``."""
    return [{k: v for k, v in m.items() if k not in keys} for m in messages]


@pytest.fixture
async def inproc(tmp_path: Path, transit_dir: Path):
    """An :class:`InProcessDaemon`; a daemon still running at the end is stopped and must
    exit 0. ``sys.path`` is restored after, and the task modules imported are forgotten."""
    harness = InProcessDaemon(tmp_path, transit_dir)
    saved_path = list(sys.path)
    try:
        yield harness
        if harness.running:
            status = await harness.stop()
            assert status == 0, harness.records_of("error")
    finally:
        sys.path[:] = saved_path
        for name, module in list(sys.modules.items()):
            origin = getattr(module, "__file__", None)
            if origin and Path(origin).is_relative_to(harness.tasks_dir):
                del sys.modules[name]
        importlib.invalidate_caches()

