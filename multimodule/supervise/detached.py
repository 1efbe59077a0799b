"""External tasks as detached processes: the backend used without systemd.

Each task runs ``multimodule -m NAME`` in a new session (``setsid``), so it outlives the daemon
that started it. The task process holds an exclusive lock on ``STATE_DIR/task-NAME.lock`` for
its life and writes its pid to ``task-NAME.status.json``; whether a task runs is decided by that
lock (immune to pid reuse), so a new daemon adopts a running task instead of starting another.

Exits are noticed without polling: a pidfd (``os.pidfd_open``, Linux 5.3) becomes readable
when the process ends, and the event loop watches it. An exit that was not asked for is a crash:
the task is started again after a backoff that doubles from 1 s up to 30 s, and goes back to
1 s once the task has run for 60 s.
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

from multimodule.errors import DetachedProcessError
from multimodule.files import make_private_dirs
from multimodule.state import lock_holder, open_for_append
from multimodule.supervise.base import ActiveState, LaunchSpec, TaskProcess

BACKOFF_MIN_S = 1.0
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0

OnEvent = Callable[[str, str], None]


def _child_env() -> dict[str, str]:
    # A detached task is no part of the daemon's service: it must not notify or feed the
    # daemon's watchdog, nor pass for a systemd service itself.
    env = dict(os.environ)
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "INVOCATION_ID"):
        env.pop(name, None)
    return env


class DetachedBackend:
    """Runs external tasks as detached processes (see the module docstring).

    ``spec``: how to launch ``multimodule -m NAME``. ``loop``: the event loop that watches
    exits and restarts crashed tasks (``None``: no watching, e.g. in ``mmctl``). ``on_event``:
    called as ``on_event(task, text)`` on the loop for starts, adoptions, exits and restarts.
    Output of each task goes to ``STATE_DIR/task-NAME.log`` (created 0600).
    """

    name = "detached"

    def __init__(self, spec: LaunchSpec, *, loop: asyncio.AbstractEventLoop | None = None,
                 on_event: OnEvent | None = None):
        self.spec = spec
        self.loop = loop
        self.on_event = on_event or (lambda task, text: None)
        self.restarts: dict[str, int] = {}
        self._children: dict[str, subprocess.Popen] = {}
        self._watched: dict[str, int] = {}  # task -> pidfd
        self._wanted: set[str] = set()
        self._started_at: dict[str, float] = {}
        self._backoff: dict[str, float] = {}
        self._pending_restart: dict[str, asyncio.TimerHandle] = {}
        self._watched_pids: dict[str, int] = {}  # task -> the pid its pidfd watches
        self._holding: dict[str, int] = {}  # task -> watched pid seen holding the lock

    # -- files -----------------------------------------------------------------------------

    def _lock_path(self, task: str) -> Path:
        return self.spec.state_dir / f"task-{task}.lock"

    def _status_path(self, task: str) -> Path:
        return self.spec.state_dir / f"task-{task}.status.json"

    def _log_path(self, task: str) -> Path:
        return self.spec.state_dir / f"task-{task}.log"

    def _holder_pid(self, task: str) -> int | None:
        """The pid of the process holding the task's lock, or ``None`` if nobody holds it."""
        try:
            return lock_holder(self._lock_path(task))
        except OSError:
            raise DetachedProcessError("cannot read /proc/locks") from None

    # -- the interface ---------------------------------------------------------------------

    def status(self, task: str) -> TaskProcess:
        """The task's state: ``active`` while its process holds the lock. A process this
        backend watches (its pidfd) and once saw holding the lock is known to hold it until
        it exits: only other tasks cost a read of ``/proc/locks`` (which grows with the number
        of tasks: reading it per task per sample made monitoring quadratic)."""
        held = self._holding.get(task)
        if held is not None and self._watched_pids.get(task) == held:
            return TaskProcess(task, ActiveState.ACTIVE, held, self.restarts.get(task, 0),
                               str(self._lock_path(task)))
        pid = self._holder_pid(task)
        if pid is not None and self._watched_pids.get(task) == pid:
            self._holding[task] = pid
        child = self._children.get(task)
        if pid is None and child is not None and child.poll() is None:
            state = ActiveState.ACTIVATING  # started, lock not taken yet
            pid = child.pid
        elif pid is None:
            state = ActiveState.INACTIVE
        else:
            state = ActiveState.ACTIVE
        return TaskProcess(task, state, pid, self.restarts.get(task, 0),
                           str(self._lock_path(task)))

    def start(self, task: str, limits_dropin: str | None = None,
              limits=None) -> TaskProcess:
        """Start ``task`` as a detached process, or adopt it if it runs already. A start asked
        for (not a restart after a crash) begins with the shortest backoff again."""
        self._backoff.pop(task, None)
        return self._start(task)

    def _start(self, task: str) -> TaskProcess:
        self._wanted.add(task)
        current = self.status(task)
        if current.running:
            self._watch(task, current.main_pid)
            self.on_event(task, f"adopted running process {current.main_pid}")
            return current
        try:
            make_private_dirs(self.spec.state_dir)
            # 0600, never through a symlink, and only a file of this user's
            log = open(open_for_append(self._log_path(task)), "ab")  # noqa: SIM115 - to the child
        except OSError as exc:
            raise DetachedProcessError(f"cannot open the log of task {task}: {exc}") from exc
        with log:
            try:
                child = subprocess.Popen(
                    self.spec.argv(task), stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
                    env=_child_env())
            except OSError as exc:
                raise DetachedProcessError(f"cannot start task {task}: {exc}") from exc
        self._children[task] = child
        self._started_at[task] = time.monotonic()
        self._watch(task, child.pid)
        self.on_event(task, f"started process {child.pid}")
        return TaskProcess(task, ActiveState.ACTIVATING, child.pid,
                           self.restarts.get(task, 0), str(self._lock_path(task)))

    def stop(self, task: str, timeout: float = 30.0) -> None:
        """SIGTERM the task's process (it saves state and exits 0), SIGKILL after
        ``timeout`` seconds; returns once it is gone. Not restarted afterwards."""
        self._wanted.discard(task)
        handle = self._pending_restart.pop(task, None)
        if handle is not None:
            handle.cancel()
        self._unwatch(task)
        pid = self.status(task).main_pid
        if pid is None:
            self._reap(task)
            return
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._reap(task)
            return
        try:
            os.kill(pid, signal.SIGTERM)
            if not select.select([pidfd], [], [], timeout)[0]:
                os.kill(pid, signal.SIGKILL)
                select.select([pidfd], [], [], 10.0)
        except ProcessLookupError:
            pass
        finally:
            os.close(pidfd)
        self._reap(task)

    # -- watching and restarting -----------------------------------------------------------

    def _reap(self, task: str) -> int | None:
        child = self._children.get(task)
        if child is None:
            return None
        code = child.poll()
        if code is not None:
            del self._children[task]
        return code

    def _on_loop(self, function, *args) -> None:
        """Call ``function(*args)`` on the loop's thread (now if this is it): the backend
        is also called from worker threads, and asyncio's readers belong to the loop."""
        try:
            here = asyncio.get_running_loop() is self.loop
        except RuntimeError:
            here = False
        if here:
            function(*args)
        else:
            self.loop.call_soon_threadsafe(function, *args)

    def _watch(self, task: str, pid: int | None) -> None:
        if self.loop is not None and pid is not None:
            self._on_loop(self._watch_now, task, pid)

    def _watch_now(self, task: str, pid: int) -> None:
        if task in self._watched:
            return
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self.loop.call_soon(self._exited, task)
            return
        self._watched[task] = pidfd
        self._watched_pids[task] = pid
        self.loop.add_reader(pidfd, self._exited, task)

    def _unwatch(self, task: str) -> None:
        if self.loop is not None and task in self._watched:
            self._on_loop(self._unwatch_now, task)

    def _unwatch_now(self, task: str) -> None:
        self._watched_pids.pop(task, None)
        self._holding.pop(task, None)
        pidfd = self._watched.pop(task, None)
        if pidfd is not None and self.loop is not None:
            self.loop.remove_reader(pidfd)
            os.close(pidfd)

    def _exited(self, task: str) -> None:
        self._unwatch(task)
        code = self._reap(task)
        if task not in self._wanted:
            return
        ran = time.monotonic() - self._started_at.get(task, 0.0)
        backoff = self._backoff.get(task, BACKOFF_MIN_S)
        if ran >= STABLE_AFTER_S:
            backoff = BACKOFF_MIN_S
        self._backoff[task] = min(backoff * 2, BACKOFF_MAX_S)
        self.on_event(task, f"process exited (status {code if code is not None else 'unknown'})"
                            f"; restarting in {backoff:.0f} s")
        self._pending_restart[task] = self.loop.call_later(backoff, self._restart, task)

    def _restart(self, task: str) -> None:
        self._pending_restart.pop(task, None)
        if task not in self._wanted:
            return
        self.restarts[task] = self.restarts.get(task, 0) + 1
        try:
            self._start(task)
        except DetachedProcessError as exc:
            self.on_event(task, f"restart failed: {exc}")

    def close(self) -> None:
        """Stop watching (the processes go on running: they outlive the daemon)."""
        for task in list(self._watched):
            self._unwatch_now(task)
        for handle in self._pending_restart.values():
            handle.cancel()
        self._pending_restart.clear()
