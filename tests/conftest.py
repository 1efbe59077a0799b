"""Shared fixtures: a private transit directory per test, with its System V queues removed after."""

from __future__ import annotations

import os
import platform
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from multimodule.transit import Transit

#: The ``mm`` fixture (a daemon in a subprocess) and its helpers live in tests/helpers.py; the
#: ``inproc`` fixture (a daemon on the test's own loop, for logic tests) in tests/inprocess.py.
pytest_plugins = ("helpers", "inprocess")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def transit_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh transit directory; also exported as $MULTIMODULE_TRANSIT_DIR for children."""
    path = tmp_path / "transit"
    monkeypatch.setenv("MULTIMODULE_TRANSIT_DIR", str(path))
    yield path
    # Kernel objects outlive the test: remove every queue the test registered.
    if path.exists():
        Transit(path).remove_all()


@pytest.fixture
def transit(transit_dir: Path) -> Transit:
    """A :class:`Transit` over :func:`transit_dir`."""
    return Transit(transit_dir)


@pytest.fixture
def child_env(transit_dir: Path) -> dict[str, str]:
    """Environment for child processes: same transit dir, this checkout importable."""
    env = dict(os.environ)
    env["MULTIMODULE_TRANSIT_DIR"] = str(transit_dir)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    return env


PYTHON = sys.executable


# -- child processes ----------------------------------------------------------------------------

#: System call numbers, for telling that a child is blocked inside msgsnd/msgrcv.
_SYSCALL_NR = {
    "x86_64": {"msgsnd": 69, "msgrcv": 70},
    "aarch64": {"msgsnd": 189, "msgrcv": 188},
}


class Child:
    """A ``python -c CODE`` child whose standard output is read line by line, with deadlines.

    Standard error goes to a file (so it can never fill a pipe and block the child); it is
    quoted in every assertion message about the child.
    """

    def __init__(self, code: str, args, env, stderr_path: Path, *, stdin: bool = False,
                 pass_fds=()):
        self.stderr_path = stderr_path
        with open(stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code, *[str(a) for a in args]],
                env=env,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                pass_fds=tuple(pass_fds),
            )
        self._buf = b""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def readline(self, timeout: float = 15.0) -> str:
        """The next line of output (without the newline); fails after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"child {self.pid}: no complete line within {timeout} s "
                    f"(partial {self._buf!r}); stderr:\n{self.stderr()}"
                )
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    self.proc.wait(5)
                    raise AssertionError(
                        f"child {self.pid} exited with {self.proc.returncode} before a "
                        f"complete line (partial {self._buf!r}); stderr:\n{self.stderr()}"
                    )
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    def expect(self, expected: str, timeout: float = 15.0) -> None:
        """Read one line and check it is ``expected``."""
        line = self.readline(timeout)
        assert line == expected, f"child {self.pid} said {line!r}, expected {expected!r}; " \
                                 f"stderr:\n{self.stderr()}"

    def finish(self, timeout: float = 15.0) -> int:
        """Wait for the child to exit; return its status."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"child {self.pid} still running after {timeout} s; stderr:\n{self.stderr()}"
            ) from None

    def wait_blocked_in(self, syscall: str, timeout: float = 10.0) -> None:
        """Wait until the child's main thread sleeps inside ``syscall`` (msgsnd or msgrcv).

        There is no event for "the child has entered the kernel call", so this re-reads
        /proc/PID/syscall until it shows the call (bounded by ``timeout``).
        """
        numbers = _SYSCALL_NR.get(platform.machine())
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"child {self.pid} exited ({self.proc.returncode}) "
                                     f"instead of blocking in {syscall}; stderr:\n{self.stderr()}")
            try:
                if numbers is not None:
                    last = Path(f"/proc/{self.pid}/syscall").read_text().split()[0]
                    if last == str(numbers[syscall]):
                        return
                else:  # unknown architecture: settle for "sleeping"
                    last = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                    if last == "S":
                        return
            except (OSError, IndexError):
                pass
            time.sleep(0.002)
        raise AssertionError(f"child {self.pid} not blocked in {syscall} within {timeout} s "
                             f"(last seen {last!r}); stderr:\n{self.stderr()}")


@pytest.fixture
def spawn(child_env: dict[str, str], tmp_path: Path):
    """``spawn(code, *args, stdin=False, pass_fds=())`` starts a :class:`Child` with
    ``child_env``; children still running at the end of the test are killed."""
    children: list[Child] = []

    def _spawn(code: str, *args, stdin: bool = False, pass_fds=()) -> Child:
        child = Child(code, args, child_env, tmp_path / f"child-{len(children)}.stderr",
                      stdin=stdin, pass_fds=pass_fds)
        children.append(child)
        return child

    yield _spawn
    for child in children:
        if child.proc.poll() is None:
            child.proc.kill()
        child.proc.wait(10)
        child.proc.stdout.close()
        if child.proc.stdin:
            child.proc.stdin.close()


@pytest.fixture
def other_transit_dir(tmp_path: Path) -> Path:
    """A second transit directory (not the one children get by default), cleaned up after."""
    path = tmp_path / "other-transit"
    yield path
    if path.exists():
        Transit(path).remove_all()


@pytest.fixture
def umask():
    """``umask(value)`` sets the process umask for the rest of the test; restored after."""
    saved = os.umask(0o022)
    os.umask(saved)

    def _set(value: int) -> None:
        os.umask(value)

    yield _set
    os.umask(saved)
