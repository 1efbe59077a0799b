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
        out = inproc.capture("out")        # sends to "out" stay in memory, for the test
        await inproc.start()
        inproc.send("Echo", {"x": 1})      # as a task in the daemon would
        await inproc.quiet()               # every queue empty, every handler idle
        assert inproc.taken("out") == [{"x": 1, "source": "Echo"}]

``quiet()`` returns once nothing is left to do: no message waiting or in hand in any task, no
control request or answer pending, no migration, start, unload or failsafe stop in progress
(like dramatiq's ``StubBroker.join()``). Records of the out-of-band channels are kept in
``inproc.records`` instead of being written anywhere.
"""

from __future__ import annotations

import asyncio
import itertools
import textwrap
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from multimodule.config import DaemonOptions
from multimodule.errors import BackendError, Empty
from multimodule.oob import Channels, parse_spec
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


class RecordingChannels(Channels):
    """Channels that keep every record (debug records of every level included)."""

    def __init__(self) -> None:
        super().__init__(parse_spec("log:1,error:2,alert:2,debug:2"), debug_level=99)
        self.records: list[Record] = []

    def emit(self, channel: str, task: str, text: str, /, **fields: Any) -> None:
        fields.pop("level", None)
        self.counts[channel] += 1
        self.records.append(Record(channel, task, str(text), fields))


class FakeBackend:
    """A task backend without processes, for the daemon's logic: ``start`` marks a task
    active (or raises ``fail_start``), ``stop`` inactive. ``calls`` records ``(method, task,
    thread id)``; ``status_gate``, when set, is awaited (at most ``WAIT_S``) by ``status``."""

    name = "fake"

    def __init__(self) -> None:
        self.active: dict[str, int] = {}
        self.calls: list[tuple[str, str, int]] = []
        self.fail_start: BackendError | None = None
        self.status_gate: threading.Event | None = None
        self.gate_timed_out = False
        self._pids = itertools.count(40000)

    def _call(self, method: str, task: str) -> None:
        self.calls.append((method, task, threading.get_ident()))

    def start(self, task: str, limits_dropin: str | None = None, limits=None) -> TaskProcess:
        self._call("start", task)
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
        return TaskProcess(task, state, pid, 0, f"fake:{task}")


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

    # -- set-up ----------------------------------------------------------------------------

    def task(self, name: str, source: str) -> None:
        """Write task module ``name`` (dedented)."""
        (self.tasks_dir / f"{name}.py").write_text(textwrap.dedent(source))

    def config(self, text: str) -> None:
        """Write the config file (dedented)."""
        self.config_path.write_text(textwrap.dedent(text))

    def capture(self, qname: str) -> None:
        """Keep what is sent to ``qname`` in this process for :meth:`taken` (call before
        :meth:`start`)."""
        self._captures.append(qname)

    @property
    def records(self) -> list[Record]:
        return self.channels.records

    def records_of(self, channel: str, contains: str = "") -> list[Record]:
        """Records of ``channel`` whose text contains ``contains``."""
        return [r for r in self.records if r.channel == channel and contains in r.text]

    async def start(self, **options: Any) -> Daemon:
        """Run the daemon on this loop and wait until its configured tasks are loaded.
        ``options``: :class:`DaemonOptions` fields over the harness's defaults (no monitor
        sampling to speak of: one sample at start, then hourly)."""
        opts = DaemonOptions(**{
            "config_file": self.config_path, "state_dir": self.state_dir,
            "task_path": [self.tasks_dir], "transit_dir": self.transit.path,
            "monitor_interval_s": 3600, "monitor_window_s": 7200, **options})
        for qname in self._captures:
            self.transit.declare_local(qname)
        self.daemon = Daemon(opts, transit=self.transit, channels=self.channels,
                             backend=self.backend)
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

    async def stop(self) -> int:
        """Stop the daemon as SIGTERM would; return its exit status."""
        self.daemon.request_stop()
        async with asyncio.timeout(WAIT_S * 3):
            return await self._run

    # -- talking to it ---------------------------------------------------------------------

    def send(self, qname: str, message: dict[str, Any]) -> None:
        """Send as a task in the daemon would (in memory to a task here)."""
        self.daemon.send(qname, message)

    def taken(self, qname: str) -> list[dict[str, Any]]:
        """What reached capture queue ``qname`` so far (without transit meta), oldest first."""
        messages = self.transit.local_queue(qname).drain()
        return [{k: v for k, v in m.items() if k != META_KEY} for m in messages]

    async def next(self, qname: str, timeout: float = WAIT_S) -> dict[str, Any]:
        """Await the next message on capture queue ``qname`` (without transit meta)."""
        async with asyncio.timeout(timeout):
            message = await self.transit.local_queue(qname).get_async()
        return {k: v for k, v in message.items() if k != META_KEY}

    async def control(self, **body: Any) -> dict[str, Any] | None:
        """Put ``{".multimodule": body}`` on the daemon's control queue with a reply queue,
        wait until quiet, and return the answer (``None`` if none came)."""
        reply_to = f"reply-{next(self._replies)}"
        self.transit.sysv_queue(reply_to)  # the daemon answers only to a queue that exists
        message = {".multimodule": {**body, "reply_to": reply_to}}
        self.transit.local_queue(self.daemon.options.control_queue).put(message)
        await self.quiet()
        try:
            reply = self.transit.receive(reply_to, timeout=0)
            reply.pop(META_KEY, None)
            return reply
        except Empty:
            return None
        finally:
            self.transit.remove(reply_to)

    # -- quiescence ------------------------------------------------------------------------

    def busy(self) -> list[str]:
        """What still has work to do (empty when quiet)."""
        d = self.daemon
        out = [f"task {n}" for n, r in d.runners.items() if not r.idle]
        out += [f"receiver {n}" for n, r in d.runners.items()
                if r.receiver is not None and r.receiver.pending]
        if d.control is not None and not d.control.idle:
            out.append("control")
        if d.migrations is not None:
            out += [f"migration {n}" for n in d.migrations.in_progress]
        if d.externals is not None:
            out += [f"start {n}" for n in d.externals.starting]
        if d.failsafe is not None:
            out += [f"failsafe {n}" for n in d.failsafe.entering]
        out += [f"unload {n}" for n in d.unloading]
        return out

    async def quiet(self, timeout: float = WAIT_S) -> None:
        """Wait until nothing is left to do (see the module docstring), checked on three
        turns of the loop in a row; fails naming what is still busy after ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        calm = 0
        while calm < 3:
            await asyncio.sleep(0)
            if self._run is not None and self._run.done():
                return
            busy = self.busy()
            if not busy:
                calm += 1
                continue
            calm = 0
            if loop.time() > deadline:
                raise AssertionError(f"not quiet after {timeout} s: {busy}")
            await asyncio.sleep(0.001)  # work in a worker thread: give it the CPU


def strip(messages: list[dict[str, Any]], *keys: str) -> list[dict[str, Any]]:
    """``messages`` without ``keys``."""
    return [{k: v for k, v in m.items() if k not in keys} for m in messages]


@pytest.fixture
async def inproc(tmp_path: Path, transit_dir: Path):
    """An :class:`InProcessDaemon`; a daemon still running at the end is stopped and must
    exit 0."""
    harness = InProcessDaemon(tmp_path, transit_dir)
    yield harness
    if harness._run is not None and not harness._run.done():
        status = await harness.stop()
        assert status == 0, harness.records_of("error")

