"""Helpers for the runtime tests: a control daemon run as a real subprocess, task modules and
config files written into the test's tmp dir, mmctl, and bounded waits on output queues.

Use the ``mm`` fixture (import it into the test module: ``from helpers import mm``)::

    def test_x(mm, transit):
        mm.task("Echo", '''
            from multimodule import Task
            class Echo(Task):
                def message(self, message):
                    self.emit(message)
        ''')
        mm.config('''
            [Echo]
            [Router]
            routes = [ { match = { source = "Echo" }, forwards = [ { qname = "out" } ] } ]
        ''')
        daemon = mm.start()          # waits for "running (pid N)" on stdout
        transit.send("Echo", {"x": 1})
        assert transit.receive("out", timeout=10)["x"] == 1
        daemon.expect("stderr", "some error")   # bounded wait for a line on stderr

Every daemon still running at the end of the test gets SIGTERM and must exit with status 0.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Pattern

import pytest

from multimodule.supervise.base import LaunchSpec
from multimodule.supervise.detached import DetachedBackend

from multimodule.cli import mmctl as mmctl_cli
from multimodule.errors import Empty, QueueFull
from multimodule.transit import Transit

REPO = Path(__file__).resolve().parent.parent

#: Seconds to wait for the daemon's "running (pid N)" line.
READY_TIMEOUT = 20.0
#: Default bound on a wait for one line of output.
LINE_TIMEOUT = 10.0


def route(source: str, qname: str, **extra: str) -> str:
    """One TOML inline route table: messages from ``source`` forwarded to ``qname``."""
    more = "".join(f", {k} = {v}" for k, v in extra.items())
    return (f'{{ match = {{ source = "{source}" }}, forwards = [ {{ qname = "{qname}" }} ]'
            f"{more} }}")


def router_section(*routes: str) -> str:
    """A ``[Router]`` section with the given inline routes."""
    return "[Router]\nroutes = [\n" + "".join(f"  {r},\n" for r in routes) + "]\n"


class DaemonProcess:
    """A running ``multimodule`` daemon whose stdout and stderr are collected line by line
    by reader threads, so tests can wait (bounded) for a line to appear."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path, state_dir: Path):
        self.argv = argv
        self.state_dir = state_dir
        self.proc = subprocess.Popen(
            argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self.lines: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self.closed: dict[str, bool] = {"stdout": False, "stderr": False}
        self._cursor: dict[str, int] = {"stdout": 0, "stderr": 0}
        self._cond = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read, args=(name, stream), daemon=True,
                             name=f"daemon-{self.proc.pid}-{name}")
            for name, stream in (("stdout", self.proc.stdout), ("stderr", self.proc.stderr))
        ]
        for reader in self._readers:
            reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self, name: str, stream) -> None:
        for raw in iter(stream.readline, b""):
            with self._cond:
                self.lines[name].append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._cond.notify_all()
        stream.close()
        with self._cond:
            self.closed[name] = True
            self._cond.notify_all()

    # -- output ------------------------------------------------------------------------

    def output(self) -> str:
        """Everything the daemon wrote so far (for assertion messages)."""
        with self._cond:
            return ("--- stdout ---\n" + "\n".join(self.lines["stdout"])
                    + "\n--- stderr ---\n" + "\n".join(self.lines["stderr"]))

    def mark(self, stream: str = "stderr") -> int:
        """The number of lines on ``stream`` so far (a start for :meth:`wait_line`)."""
        with self._cond:
            return len(self.lines[stream])

    def lines_matching(self, stream: str, pattern: str | Pattern[str], start: int = 0
                       ) -> list[str]:
        """Lines of ``stream`` (from index ``start``) matching ``pattern`` so far."""
        match = _matcher(pattern)
        with self._cond:
            return [line for line in self.lines[stream][start:] if match(line)]

    def wait_line(self, stream: str, pattern: str | Pattern[str], *, start: int = 0,
                  timeout: float = LINE_TIMEOUT) -> tuple[int, str]:
        """Wait (at most ``timeout`` s) for a line of ``stream`` at index ``>= start`` that
        contains ``pattern`` (a substring, or a compiled regex searched); return
        ``(index, line)``. Fails with the daemon's output if none comes."""
        match = _matcher(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            index = start
            while True:
                lines = self.lines[stream]
                while index < len(lines):
                    if match(lines[index]):
                        return index, lines[index]
                    index += 1
                if self.closed[stream]:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
        state = "exited" if self.proc.poll() is not None else "still running"
        raise AssertionError(
            f"daemon {self.pid} ({state}, status {self.proc.returncode}): no line matching "
            f"{pattern!r} on {stream} within {timeout} s\n{self.output()}")

    def expect(self, stream: str, pattern: str | Pattern[str], timeout: float = LINE_TIMEOUT
               ) -> str:
        """Like :meth:`wait_line` from this stream's cursor; the cursor moves past the line
        found (so successive calls read the output in order)."""
        index, line = self.wait_line(stream, pattern, start=self._cursor[stream],
                                     timeout=timeout)
        self._cursor[stream] = index + 1
        return line

    # -- life cycle --------------------------------------------------------------------

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Wait for ``MultiModule: running (pid N)`` and check N is this process."""
        line = self.expect("stdout", "running (pid ", timeout)
        pid = int(re.search(r"running \(pid (\d+)\)", line).group(1))
        assert pid == self.pid, f"daemon announced pid {pid}, process is {self.pid}"

    def wait_exit(self, timeout: float = 15.0) -> int:
        """Wait for the process to exit (bounded) and for its output to be read."""
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"daemon {self.pid} still running after {timeout} s\n"
                                 f"{self.output()}") from None
        for reader in self._readers:
            reader.join(5)
        return status

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM; wait for the exit; return the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def stop_ok(self, timeout: float = 15.0) -> None:
        """SIGTERM and check the exit status is 0."""
        status = self.terminate(timeout)
        assert status == 0, f"daemon exited with {status}\n{self.output()}"


def _matcher(pattern: str | Pattern[str]) -> Callable[[str], bool]:
    if isinstance(pattern, str):
        return lambda line: pattern in line
    return lambda line: pattern.search(line) is not None


class Harness:
    """Per-test workspace: ``tasks/`` (task modules), ``config.toml``, ``state/``."""

    def __init__(self, tmp_path: Path, env: dict[str, str], transit_dir: Path):
        self.tmp = tmp_path
        self.env = env
        self.transit_dir = transit_dir
        self.task_dir = tmp_path / "tasks"
        self.task_dir.mkdir(exist_ok=True)
        self.state_dir = tmp_path / "state"
        self.config_path = tmp_path / "config.toml"
        self.daemons: list[DaemonProcess] = []

    # -- files -------------------------------------------------------------------------

    def task(self, name: str, source: str) -> Path:
        """Write task module ``NAME.py`` (``source`` is dedented) into the task dir."""
        path = self.task_dir / f"{name}.py"
        path.write_text(textwrap.dedent(source).lstrip("\n"))
        return path

    def config(self, text: str, *, atomic: bool = False, path: Path | None = None) -> Path:
        """Write the config file (dedented): in place, or with ``atomic`` through a temporary
        file renamed over it."""
        path = path or self.config_path
        text = textwrap.dedent(text).lstrip("\n")
        if atomic:
            tmp = path.with_name(f".{path.name}.new")
            tmp.write_text(text)
            os.replace(tmp, path)
        else:
            with open(path, "w") as f:
                f.write(text)
        return path

    def state_file(self, name: str) -> Path:
        return self.state_dir / f"{name}.state.json"

    # -- the daemon --------------------------------------------------------------------

    def argv(self, *extra: str, config: Path | None | bool = True,
             state_dir: Path | None = None) -> list[str]:
        args = [sys.executable, "-m", "multimodule.cli.daemon"]
        if config is True:
            args += ["-c", str(self.config_path)]
        elif config:
            args += ["-c", str(config)]
        args += ["--task-path", str(self.task_dir), "-s", str(state_dir or self.state_dir)]
        return args + list(extra)

    def start(self, *extra: str, config: Path | None | bool = True,
              state_dir: Path | None = None, wait: bool = True) -> DaemonProcess:
        """Start a daemon (``extra``: more command-line arguments); by default wait until it
        says it is running."""
        daemon = DaemonProcess(self.argv(*extra, config=config, state_dir=state_dir),
                               self.env, self.tmp, state_dir or self.state_dir)
        self.daemons.append(daemon)
        if wait:
            daemon.wait_ready()
        return daemon

    def run_daemon(self, *extra: str, config: Path | None | bool = True,
                   state_dir: Path | None = None, timeout: float = 20.0
                   ) -> subprocess.CompletedProcess:
        """Run a daemon expected to exit by itself (bounded); return its result."""
        return subprocess.run(self.argv(*extra, config=config, state_dir=state_dir),
                              env=self.env, cwd=self.tmp, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)

    # -- mmctl -------------------------------------------------------------------------

    def mmctl(self, *args: str) -> tuple[int, str, str]:
        """Run ``mmctl ARGS`` in this process (real queues, no interpreter start-up);
        return ``(status, stdout, stderr)``."""
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = mmctl_cli.main(list(args))
        return status, out.getvalue(), err.getvalue()

    def mmctl_proc(self, *args: str, timeout: float = 20.0) -> subprocess.CompletedProcess:
        """Run ``mmctl ARGS`` as its own process."""
        return subprocess.run([sys.executable, "-m", "multimodule.cli.mmctl", *args],
                              env=self.env, cwd=self.tmp, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)

    def close(self) -> list[str]:
        """Stop every daemon still running; return complaints about bad exits."""
        problems = []
        for daemon in self.daemons:
            if daemon.proc.poll() is not None:
                daemon.wait_exit()
                continue
            try:
                status = daemon.terminate(15.0)
            except AssertionError as exc:
                daemon.proc.kill()
                daemon.proc.wait(10)
                problems.append(str(exc))
                continue
            if status != 0:
                problems.append(f"daemon {daemon.pid} exited with {status} at teardown\n"
                                f"{daemon.output()}")
        # External tasks outlive their daemon by design: stop those the test left running.
        leftover = DetachedBackend(LaunchSpec(argv_prefix=(), state_dir=self.state_dir))
        for lock in sorted(self.state_dir.glob("task-*.lock")):
            leftover.stop(lock.name[len("task-"):-len(".lock")], timeout=10)
        return problems


@pytest.fixture
def mm(tmp_path: Path, child_env: dict[str, str], transit_dir: Path) -> Iterator[Harness]:
    """A :class:`Harness`; daemons still running at the end get SIGTERM and must exit 0."""
    harness = Harness(tmp_path, child_env, transit_dir)
    yield harness
    problems = harness.close()
    if problems:
        pytest.fail("\n\n".join(problems))


# -- queues ---------------------------------------------------------------------------------


def receive_until(transit: Transit, qname: str, predicate: Callable[[dict], bool], *,
                  timeout: float = 10.0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Receive from ``qname`` until a message satisfies ``predicate`` (total wait bounded by
    ``timeout``); return it and the messages skipped before it."""
    deadline = time.monotonic() + timeout
    skipped: list[dict[str, Any]] = []
    while True:
        remaining = deadline - time.monotonic()
        try:
            message = transit.receive(qname, timeout=max(0.0, remaining))
        except Empty:
            raise AssertionError(
                f"no matching message on {qname!r} within {timeout} s; "
                f"{len(skipped)} others received (last: {skipped[-3:]})") from None
        if predicate(message):
            return message, skipped
        skipped.append(message)


def receive_n(transit: Transit, qname: str, count: int, *, timeout: float = 10.0
              ) -> list[dict[str, Any]]:
    """Receive exactly ``count`` messages from ``qname`` (each waited for at most
    ``timeout`` s)."""
    got = []
    for _ in range(count):
        try:
            got.append(transit.receive(qname, timeout=timeout))
        except Empty:
            raise AssertionError(f"only {len(got)} of {count} messages on {qname!r} "
                                 f"(waited {timeout} s for the next)") from None
    return got


def strip_meta(message: dict[str, Any]) -> dict[str, Any]:
    """``message`` without the transit's ``.ipc_transit_meta`` and the Router's hop count."""
    return {k: v for k, v in message.items() if k not in (".ipc_transit_meta", ".router_hops")}


def wait_for_file(path: Path, predicate: Callable[[Path], bool] = Path.exists, *,
                  timeout: float = 10.0) -> None:
    """Wait (bounded) until ``predicate(path)`` holds for a file another process writes."""
    deadline = time.monotonic() + timeout
    while not predicate(path):
        if time.monotonic() > deadline:
            raise AssertionError(f"{path}: condition not met within {timeout} s")
        time.sleep(0.01)


def saved_state(path: Path) -> dict:
    """The task state a checkpoint file (``NAME.state.json``) holds."""
    from multimodule.state import Checkpoint
    return Checkpoint.from_json(json.loads(Path(path).read_text()), True).state


def drain(transit, qname: str) -> list[dict[str, Any]]:
    """Every message waiting on ``qname`` now."""
    out = []
    while True:
        try:
            out.append(transit.receive(qname, timeout=0))
        except Empty:
            return out


def fill(transit, qname: str) -> int:
    """Fill System V queue ``qname`` with small messages as another process would; return
    how many it took."""
    prefilled = 0
    while True:
        try:
            transit.send(qname, {"p": prefilled}, timeout=0)
        except QueueFull:
            return prefilled
        prefilled += 1
