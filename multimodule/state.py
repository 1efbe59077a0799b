"""Persistent state of stateful tasks, status files, and the one-daemon-per-state-dir guard.

Checkpoints live in the state directory, one per task: ``NAME.state.json`` for a stateful task
(its state, with the position in its input journal it was taken at: :class:`Checkpoint`),
``NAME.checkpoint.json`` for a stateless one (the position alone). Writes are atomic and durable: a temporary file in the same directory, ``fsync``, ``rename``
over the old file, ``fsync`` of the directory (the sequence described in the ext4 and LWN
articles on ``rename``-based atomic updates). A file that cannot be read or parsed is moved
aside to ``NAME.state.json.corrupt-<unix time>`` and the task starts empty.

Another local user must not be able to steer what the process writes or reads here: an
existing state directory must be this process's user's and not writable by others; no file is
opened for writing through a symbolic link (``O_NOFOLLOW``); temporary files are created
exclusively (``O_EXCL``) at unpredictable names; files get their mode with ``fchmod``, whatever
the umask; and a file read back (a state file, a kept outbox) must be a regular file of this
user's with no other hard link.

A process killed during a write (``kill -9``, a power cut) leaves its temporary file behind.
Temporary names carry their writer: ``.TARGET.tmp-OWNER-RANDOM``, where OWNER is 8 hex digits
naming the state directory lock the writing process holds (:func:`claim_temp_files`) and RANDOM
16 hex digits. A process that has taken its lock removes the temporary files of its own name
(:func:`remove_temp_files`): no other living process can be writing one, and the files of the
daemon and of external tasks' processes, which share the directory, are told apart.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import secrets
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from multimodule.errors import AlreadyRunning, ConfigError, StateError
from multimodule.files import make_private_dirs


def check_directory(path: Path, what: str) -> None:
    """Refuse (raise :class:`ConfigError` naming ``what`` and ``path``) a directory that is not
    this process's user's or that its group or others may write: they could plant links or
    files in it. A symbolic link to a directory is accepted only if it is this user's own, and
    then its target is checked."""
    euid = os.geteuid()
    try:
        link = os.lstat(path)
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"cannot use {what} {path}: {exc}") from exc
    if stat.S_ISLNK(link.st_mode) and link.st_uid != euid:
        raise ConfigError(f"{what} {path} is a symbolic link of uid {link.st_uid}, not of this "
                          f"process's user (uid {euid}): refusing it")
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{what} {path} is not a directory")
    if st.st_uid != euid:
        raise ConfigError(f"{what} {path} belongs to uid {st.st_uid}, not to this process's "
                          f"user (uid {euid}): refusing it (its owner could plant files in it)")
    if st.st_mode & 0o022:
        raise ConfigError(f"{what} {path} is writable by its group or others (mode "
                          f"{stat.S_IMODE(st.st_mode):04o}): refusing it (they could plant "
                          "files in it)")


def _check_own_file(fd: int) -> None:
    """Raise ``OSError`` (its text says why) unless ``fd`` is a regular file of this process's
    user with one link (a hard link could make it another file of the same owner)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise OSError("not a regular file")
    if st.st_uid != os.geteuid():
        raise OSError(f"it belongs to uid {st.st_uid}, not to this process's user "
                      f"(uid {os.geteuid()})")
    if st.st_nlink != 1:
        raise OSError(f"it has {st.st_nlink} hard links")


def _nofollow(exc: OSError) -> OSError:
    """``exc`` from an ``O_NOFOLLOW`` open, said plainly if the path was a symbolic link."""
    return OSError("a symbolic link, not a regular file") if exc.errno == errno.ELOOP else exc


def read_own_file(path: Path) -> bytes:
    """The content of ``path``, which must be a regular file of this process's user with one
    link; a symbolic link is not followed. Raises ``FileNotFoundError`` if there is none, and
    ``OSError`` saying what is wrong otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise _nofollow(exc) from None
    try:
        _check_own_file(fd)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def open_own_file(path: Path) -> int:
    """Open ``path`` to read and write in place (``pread``/``pwrite``), creating it 0600 if
    there is none; return the descriptor. The file must be a regular file of this process's
    user with one link, and a symbolic link is never followed: what another user planted at
    ``path`` is refused, never read, written or chmodded. Raises ``OSError`` saying why."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise _nofollow(exc) from None
    try:
        _check_own_file(fd)
        os.fchmod(fd, 0o600)  # the umask must not narrow or widen it
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_for_append(path: Path, mode: int = 0o600) -> int:
    """Open ``path`` to append to it, never through a symbolic link; return the descriptor.

    A file made here gets ``mode`` whatever the umask; an existing regular file or FIFO must
    be this process's user's (its mode is left as its owner set it; a FIFO is opened without
    waiting for a reader: none there is an error, not a hang). A device (``/dev/null``) is
    opened as it is. Raises ``OSError`` saying what is wrong.
    """
    flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(3):  # the file may come or go between the tries
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        except OSError as exc:
            raise _nofollow(exc) from None
        else:
            try:
                os.fchmod(fd, mode)
            except BaseException:
                os.close(fd)
                raise
            return fd
        try:
            fd = os.open(path, flags | os.O_NONBLOCK)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise _nofollow(exc) from None
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode):
                _check_own_file(fd)
            elif stat.S_ISFIFO(st.st_mode) and st.st_uid != os.geteuid():
                raise OSError(f"a FIFO of uid {st.st_uid}, not of this process's user "
                              f"(uid {os.geteuid()})")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd
    raise OSError(f"{path} keeps appearing and disappearing")


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically and durably (see the module docstring); the
    file gets ``mode`` whatever the umask. The temporary file (``.NAME.tmp-OWNER-RANDOM``
    beside it, see :func:`claim_temp_files`) is created exclusively, never through a symbolic link; a symbolic link at ``path`` is
    replaced, not followed. Raises ``OSError``."""
    tmp = _temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        try:
            os.fchmod(fd, mode)
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


#: The owner tag of this process's temporary files (:func:`claim_temp_files`), if claimed.
_temp_owner: str | None = None


def temp_owner_tag(owner: str) -> str:
    """The 8 hex digits that stand for ``owner`` (a state directory lock's name, such as
    ``multimodule`` or ``task-NAME``) in temporary file names: the start of its SHA-256. A
    task name may hold any character but ``/``, so the name itself could not be told apart
    from the rest of a file name."""
    return hashlib.sha256(owner.encode("utf-8", "surrogatepass")).hexdigest()[:8]


def claim_temp_files(owner: str | None) -> None:
    """Name the temporary files :func:`write_atomic` makes in this process after ``owner``,
    the name of the state directory lock the process holds (call it before taking the lock:
    the lock's status file is the first such file). Without a claim (tools, tests; ``None``
    drops one), temporary files are named ``.TARGET.tmp-RANDOM`` and nobody removes them."""
    global _temp_owner
    _temp_owner = None if owner is None else temp_owner_tag(owner)


def _temp_path(path: Path) -> Path:
    """A fresh temporary name beside ``path`` (see the module docstring)."""
    owner = f"{_temp_owner}-" if _temp_owner is not None else ""
    return path.with_name(f".{path.name}.tmp-{owner}{secrets.token_hex(8)}")


def remove_temp_files(directory: Path, owner: str) -> tuple[list[str], int]:
    """Remove from ``directory`` the temporary files that a process holding the lock named
    ``owner`` left there (killed while it wrote one); call it once this process holds that
    lock, so that none of them is being written. Returns the names removed and their bytes.

    Only entries whose whole name is ``.TARGET.tmp-TAG-RANDOM`` (TAG
    ``temp_owner_tag(owner)``, RANDOM 16 lower-case hex digits) are removed, and only regular
    files of this process's user: a symbolic link, a directory, a file of another user or of
    another owner (an external task's process, or a writer that claimed none) stays. Links
    are never followed. Raises ``OSError`` if the directory cannot be read or a file cannot
    be removed (those removed before it stay removed)."""
    pattern = re.compile(r"\..+\.tmp-" + temp_owner_tag(owner) + r"-[0-9a-f]{16}", re.DOTALL)
    euid = os.geteuid()
    removed, total = [], 0
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in os.listdir(dir_fd):
            if not pattern.fullmatch(name):
                continue
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode) or st.st_uid != euid:
                continue
            os.unlink(name, dir_fd=dir_fd)
            removed.append(name)
            total += st.st_size
    finally:
        os.close(dir_fd)
    return removed, total


#: The key that marks a saved file as a checkpoint (a state file from before checkpoints is
#: the bare state object, and loads as a checkpoint at position 0).
CHECKPOINT_KEY = "multimodule.checkpoint"


@dataclass
class Checkpoint:
    """What a task's process saves for it, in one file, atomically (see
    :mod:`multimodule.journal`).

    ``state``: the task's state (``None`` for a stateless task); ``position``: the sequence
    number of the last journal record the task had handled when it was taken;
    ``incarnation``: a random id made when the task first ran with this state directory
    (message ids derived from timer ticks start with it); ``ticks``: schedule name -> ticks
    run; ``recent_ids``: the ids of the last messages handled, oldest first, for a task that
    drops duplicates (its ``dedupe`` window).
    """

    state: dict[str, Any] | None = None
    position: int = 0
    incarnation: str = field(default_factory=lambda: os.urandom(6).hex())
    ticks: dict[str, int] = field(default_factory=dict)
    recent_ids: list[str] = field(default_factory=list)

    def to_json(self) -> bytes:
        """The file's content (raises ``TypeError`` if the state is not JSON-serialisable)."""
        out: dict[str, Any] = {CHECKPOINT_KEY: 1, "position": self.position,
                               "incarnation": self.incarnation, "ticks": self.ticks,
                               "recent_ids": self.recent_ids}
        if self.state is not None:
            out["state"] = self.state
        return orjson.dumps(out)

    @classmethod
    def from_json(cls, data: dict[str, Any], stateful: bool) -> Checkpoint:
        """Read a checkpoint (or a bare state from before checkpoints). Raises ``ValueError``
        naming the field that is wrong."""
        if CHECKPOINT_KEY not in data:
            return cls(state=data if stateful else None)
        if data[CHECKPOINT_KEY] != 1:
            raise ValueError(f"unknown checkpoint version {data[CHECKPOINT_KEY]!r} (this "
                             "version reads 1)")
        state = data.get("state", {}) if stateful else None
        if stateful and not isinstance(state, dict):
            raise ValueError("'state' is not an object")
        position = data.get("position")
        if type(position) is not int or position < 0:
            raise ValueError("'position' is not a non-negative integer")
        incarnation = data.get("incarnation")
        if not isinstance(incarnation, str) or not incarnation:
            raise ValueError("'incarnation' is not a string")
        ticks = data.get("ticks")
        if not isinstance(ticks, dict) or not all(type(v) is int for v in ticks.values()):
            raise ValueError("'ticks' is not an object of integers")
        recent = data.get("recent_ids")
        if not isinstance(recent, list) or not all(isinstance(v, str) for v in recent):
            raise ValueError("'recent_ids' is not a list of strings")
        return cls(state=state, position=position, incarnation=incarnation, ticks=ticks,
                   recent_ids=recent)


class StateStore:
    """Loads and saves tasks' checkpoints in ``state_dir`` (created 0700, with its missing
    parents, if missing): ``NAME.state.json`` for a stateful task (its state with its
    checkpoint), ``NAME.checkpoint.json`` for a stateless one (its journal position alone).

    Raises :class:`ConfigError` if the directory cannot be created, or if it is not this
    process's user's or is writable by others (see :func:`check_directory`).
    """

    def __init__(self, state_dir: str | os.PathLike[str]):
        self.path = Path(state_dir)
        try:
            make_private_dirs(self.path)
        except OSError as exc:
            raise ConfigError(f"cannot create state directory {self.path}: {exc}") from exc
        check_directory(self.path, "state directory")
        self._last_saved: dict[str, bytes] = {}

    def file_for(self, task: str, stateful: bool = True) -> Path:
        """The checkpoint file of ``task``."""
        return self.path / (f"{task}.state.json" if stateful else f"{task}.checkpoint.json")

    def journal_dir(self, task: str) -> Path:
        """The directory of ``task``'s input journal."""
        return self.path / "journal" / task

    def load(self, task: str, stateful: bool = True) -> tuple[Checkpoint, str | None]:
        """``(checkpoint, problem)``: the saved checkpoint (a new one if none) and, if the file
        was unusable, a description of what happened to it (moved aside, not deleted; left
        where it is if it is not this user's, such as a file or link another user planted)."""
        path = self.file_for(task, stateful)
        empty = Checkpoint(state={} if stateful else None)
        try:
            data = read_own_file(path)
        except FileNotFoundError:
            return empty, None
        except OSError as exc:
            return empty, self._move_aside(path, f"unreadable ({exc})")
        try:
            parsed = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            return empty, self._move_aside(path, f"not valid JSON ({exc})")
        if not isinstance(parsed, dict):
            return empty, self._move_aside(path, f"a JSON {type(parsed).__name__}, not an "
                                                 "object")
        try:
            checkpoint = Checkpoint.from_json(parsed, stateful)
        except ValueError as exc:
            return empty, self._move_aside(path, f"not a checkpoint ({exc})")
        self._last_saved[task] = data
        return checkpoint, None

    def saved(self, task: str) -> dict[str, Any]:
        """The state last saved for ``task``, as its file holds it (for tasks that do not run
        here). Raises :class:`StateError` if there is none or it cannot be read (it is not a
        regular file of this user's, as :meth:`load` requires)."""
        try:
            parsed = orjson.loads(read_own_file(self.file_for(task)))
            return Checkpoint.from_json(parsed, True).state
        except FileNotFoundError:
            raise StateError(f"task {task} has no saved state") from None
        except (OSError, orjson.JSONDecodeError, ValueError, TypeError) as exc:
            raise StateError(f"cannot read the saved state of {task}: {exc}") from exc

    def _move_aside(self, path: Path, why: str) -> str:
        try:
            owner = os.lstat(path).st_uid
        except OSError:
            owner = os.geteuid()  # gone meanwhile: the replace below says so
        if owner != os.geteuid():
            return (f"state file {path} is {why}; left where it is (it belongs to uid {owner}, "
                    "not to this process's user), starting empty")
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        try:
            os.replace(path, aside)
        except OSError as exc:
            return f"state file {path} is {why}; could not move it aside: {exc}"
        return f"state file {path} is {why}; moved aside to {aside.name}, starting empty"

    def save(self, task: str, checkpoint: Checkpoint) -> bool:
        """Save ``checkpoint`` if it changed since the last save; return whether it wrote.

        Raises :class:`StateError` (with the cause) if it cannot be serialised or written.
        """
        try:
            data = checkpoint.to_json()
        except TypeError as exc:
            raise StateError(f"state of {task} is not JSON-serialisable: {exc}") from exc
        if self._last_saved.get(task) == data:
            return False
        try:
            write_atomic(self.file_for(task, checkpoint.state is not None), data)
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
        st = os.lstat(lock_path)  # a symbolic link is nobody's lock
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

    :meth:`acquire` raises :class:`AlreadyRunning` naming the holder's pid, and
    :class:`StateError` if the lock file cannot be opened or is not a regular file of this
    process's user (a symbolic link is never followed).
    """

    def __init__(self, state_dir: Path, name: str, *, status_file: bool = True):
        self.lock_path = state_dir / f"{name}.lock"
        self.status_path = state_dir / f"{name}.status.json" if status_file else None
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock and write the status file."""
        try:
            fd = os.open(self.lock_path,
                         os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         0o600)
        except OSError as exc:
            raise StateError(f"cannot open lock file {self.lock_path}: {_nofollow(exc)}"
                             ) from None
        try:
            _check_own_file(fd)
            os.fchmod(fd, 0o600)
        except OSError as exc:
            os.close(fd)
            raise StateError(f"refusing lock file {self.lock_path}: {exc}") from None
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


def figures_path(state_dir: Path, task: str) -> Path:
    """Where the process of external task ``task`` writes its counters for the daemon's
    monitor (``STATE_DIR/task-NAME.figures.json``)."""
    return Path(state_dir) / f"task-{task}.figures.json"
