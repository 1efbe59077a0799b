"""Persistent state of stateful tasks, status files, and the one-daemon-per-state-dir guard.

State files live in the state directory, one per task: ``NAME.state.json`` (a JSON object).
Writes are atomic and durable: a temporary file in the same directory, ``fsync``, ``rename``
over the old file, ``fsync`` of the directory (the sequence described in the ext4 and LWN
articles on ``rename``-based atomic updates). A file that cannot be read or parsed is moved
aside to ``NAME.state.json.corrupt-<unix time>`` and the task starts empty.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from multimodule.errors import AlreadyRunning, ConfigError, StateError


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically and durably (see the module docstring)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # the old file is intact; leave no debris
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class StateStore:
    """Loads and saves task state in ``state_dir`` (created 0700 if missing).

    Raises :class:`ConfigError` if the directory cannot be created.
    """

    def __init__(self, state_dir: str | os.PathLike[str]):
        self.path = Path(state_dir)
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create state directory {self.path}: {exc}") from exc
        self._last_saved: dict[str, bytes] = {}

    def file_for(self, task: str) -> Path:
        """The state file of ``task``."""
        return self.path / f"{task}.state.json"

    def load(self, task: str) -> tuple[dict[str, Any], str | None]:
        """``(state, problem)``: the saved state (``{}`` if none) and, if the file was unusable,
        a description of what happened to it (it was moved aside, not deleted)."""
        path = self.file_for(task)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return {}, None
        except OSError as exc:
            return {}, self._move_aside(path, f"unreadable ({exc})")
        try:
            state = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            return {}, self._move_aside(path, f"not valid JSON ({exc})")
        if not isinstance(state, dict):
            return {}, self._move_aside(path, f"a JSON {type(state).__name__}, not an object")
        self._last_saved[task] = data
        return state, None

    def saved(self, task: str) -> dict[str, Any]:
        """The state last saved for ``task``, as its file holds it (for tasks that do not run
        here). Raises :class:`StateError` if there is none or it cannot be read."""
        try:
            return orjson.loads(self.file_for(task).read_bytes())
        except FileNotFoundError:
            raise StateError(f"task {task} has no saved state") from None
        except (OSError, orjson.JSONDecodeError) as exc:
            raise StateError(f"cannot read the saved state of {task}: {exc}") from exc

    def _move_aside(self, path: Path, why: str) -> str:
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        try:
            os.replace(path, aside)
        except OSError as exc:
            return f"state file {path} is {why}; could not move it aside: {exc}"
        return f"state file {path} is {why}; moved aside to {aside.name}, starting empty"

    def save(self, task: str, state: dict[str, Any]) -> bool:
        """Save ``state`` if it changed since the last save; return whether it wrote.

        Raises :class:`StateError` (with the cause) if it cannot be serialised or written.
        """
        try:
            data = orjson.dumps(state)
        except TypeError as exc:
            raise StateError(f"state of {task} is not JSON-serialisable: {exc}") from exc
        if self._last_saved.get(task) == data:
            return False
        try:
            write_atomic(self.file_for(task), data)
        except OSError as exc:
            raise StateError(f"cannot save state of {task}: {exc}") from exc
        self._last_saved[task] = data
        return True


def lock_holder(lock_path: Path) -> int | None:
    """The pid of the process holding the ``flock`` on ``lock_path`` (an
    :class:`InstanceLock`'s file), or ``None`` if nobody holds it or the file is missing.

    Read from ``/proc/locks`` rather than by trying the lock: a trial lock, however brief,
    could make a process that is just starting believe another copy runs. Raises ``OSError``
    if ``/proc/locks`` cannot be read.
    """
    try:
        st = os.stat(lock_path)
    except FileNotFoundError:
        return None
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with open("/proc/locks") as locks:
        for line in locks:
            fields = line.split()
            # e.g. "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"
            if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == device:
                try:
                    return int(fields[4])
                except ValueError:
                    return None
    return None


class InstanceLock:
    """An exclusive ``flock`` on ``DIR/NAME.lock`` held for the life of the process, with a
    status file ``NAME.status.json`` (pid, start time, command line) beside it unless
    ``status_file=False``.

    :meth:`acquire` raises :class:`AlreadyRunning` naming the holder's pid.
    """

    def __init__(self, state_dir: Path, name: str, *, status_file: bool = True):
        self.lock_path = state_dir / f"{name}.lock"
        self.status_path = state_dir / f"{name}.status.json" if status_file else None
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock and write the status file."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).strip()
            os.close(fd)
            pid = int(holder) if holder.isdigit() else None
            raise AlreadyRunning(
                f"another multimodule process (pid {pid if pid else 'unknown'}) is running on "
                f"{self.lock_path.parent} (lock {self.lock_path.name})", pid
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, b"%d\n" % os.getpid(), 0)
        self._fd = fd
        if self.status_path is not None:
            status = {"pid": os.getpid(), "start_time": time.time(), "argv": sys.argv}
            write_atomic(self.status_path, orjson.dumps(status, option=orjson.OPT_INDENT_2))

    def release(self) -> None:
        """Remove the status file and drop the lock."""
        if self._fd is None:
            return
        try:
            if self.status_path is not None:
                self.status_path.unlink(missing_ok=True)
        except OSError:
            pass  # a state dir made read-only meanwhile: the stale file names a dead pid
        finally:
            os.close(self._fd)
            self._fd = None
