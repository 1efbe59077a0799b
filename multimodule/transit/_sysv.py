"""One System V message queue: timed send and receive, spilling, and the kernel's figures.

A message whose encoded size exceeds the queue's limit (the kernel's ``msgmax``, 8192 bytes by
default, or the queue's byte capacity if smaller) is written to a spill file in the transit
directory's private ``.spill/`` and the queue carries only the file's name; the receiver reads
and removes the file. So no size of message is refused or cut.

A spill reference is trusted no more than the bytes of a message: it must be a bare name
(letters and digits), it is opened relative to ``.spill/`` without following a symbolic link,
and only a regular file with one link, owned by a user allowed on the transit directory, is
read (see :meth:`SysvQueue.decode`). A refused or broken spill file never reaches an error
record: :class:`BadMessage` then holds the reference only.
"""

from __future__ import annotations

import ctypes
import errno
import os
import pwd
import stat as stat_mod
import threading
import time
import uuid
from dataclasses import dataclass

import orjson
import sysv_ipc

from multimodule.errors import (
    BadMessage,
    Cancelled,
    Empty,
    QueueFull,
    QueueRemoved,
    TransitBroken,
    UnserializableMessage,
)
from multimodule.transit import _wire

#: Bytes of JSON a message may hold at most (a spill file's size is checked before it is
#: read: a receiver never reads more than this into memory for one message).
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
from multimodule.transit._directory import TransitDirectory
from multimodule.transit._interrupt import Interrupter, ensure_handler, is_eintr

DIGIT_TABLE = _wire.DIGIT_TABLE
LONG_RUN = _wire.LONG_RUN

#: System V message type used for every multimodule message.
MTYPE = 1

#: ``msgrcv`` flags (``<sys/msg.h>``, Linux): copy the message at an index without taking it
#: (Linux 3.8+, kernels built with ``CONFIG_CHECKPOINT_RESTORE``, as Debian's are), do not
#: wait, cut a message longer than the buffer.
MSG_COPY = 0o40000
IPC_NOWAIT = 0o4000
MSG_NOERROR = 0o10000

_libc = ctypes.CDLL(None, use_errno=True)
_msgrcv = _libc.msgrcv
_msgrcv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_long, ctypes.c_int]
_msgrcv.restype = ctypes.c_ssize_t

#: Backoff bounds (seconds) for timed waits where no interrupt signal can be installed.
_POLL_MIN_S = 0.0005
_POLL_MAX_S = 0.02


def _removed(queue: sysv_ipc.MessageQueue, exc: BaseException) -> bool:
    """Whether ``exc`` means the queue is gone: ``msgsnd`` on a removed id fails with EINVAL
    (sysv_ipc raises a plain ``OSError``), a queue removed while waiting with EIDRM."""
    if isinstance(exc, sysv_ipc.ExistentialError):
        return True
    if isinstance(exc, OSError) and exc.errno in (errno.EINVAL, errno.EIDRM):
        try:
            queue.current_messages
        except sysv_ipc.ExistentialError:
            return True
    return False


def kernel_msgmax(default: int = 8192) -> int:
    """The largest System V message the kernel accepts, in bytes (``/proc/sys/kernel/msgmax``)."""
    try:
        with open("/proc/sys/kernel/msgmax") as f:
            return int(f.read())
    except (OSError, ValueError):
        return default


@dataclass(frozen=True)
class QueueStat:
    """Figures for one queue.

    ``kind``: ``"sysv"`` or ``"local"``. ``messages``: messages waiting. ``bytes``: bytes waiting
    (``None`` for a local queue, which holds objects). ``max_bytes``: the queue's capacity in
    bytes (``None`` for a local queue, which is unbounded). Times are seconds since the epoch,
    ``None`` when it never happened; pids are ``None`` likewise.
    """

    name: str
    kind: str
    messages: int
    bytes: int | None
    max_bytes: int | None
    last_send_pid: int | None
    last_send_time: float | None
    last_receive_pid: int | None
    last_receive_time: float | None
    key: int | None = None
    id: int | None = None

    @property
    def fill(self) -> float | None:
        """``bytes / max_bytes`` (0.0 to 1.0), or ``None`` where either is unknown."""
        if self.bytes is None or not self.max_bytes:
            return None
        return self.bytes / self.max_bytes


def proc_queue_table() -> dict[int, tuple[int, int]]:
    """Key -> (queue id, bytes waiting), for every System V queue of this IPC namespace, in
    one read of ``/proc/sysvipc/msg`` (empty if it cannot be read)."""
    out = {}
    try:
        with open("/proc/sysvipc/msg") as f:
            next(f)
            for line in f:
                fields = line.split()
                out[int(fields[0])] = (int(fields[1]), int(fields[3]))
    except (OSError, ValueError, IndexError, StopIteration):
        return {}
    return out


def _proc_cbytes(queue_id: int) -> int | None:
    """Bytes waiting on the queue with id ``queue_id``, from ``/proc/sysvipc/msg``."""
    try:
        with open("/proc/sysvipc/msg") as f:
            next(f)
            for line in f:
                fields = line.split()
                if int(fields[1]) == queue_id:
                    return int(fields[3])
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return None


def _unlink_at(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)  # removes a link itself, never its target
    except OSError:
        pass


#: Seconds a user's right to a shared transit directory is remembered (the group database is
#: read again after that, so a user removed from the group is refused soon after).
OWNER_CACHE_S = 10.0
_owner_cache: dict[tuple[int, int], tuple[float, bool]] = {}


def owner_allowed(uid: int, directory: TransitDirectory) -> bool:
    """Whether a spill file owned by ``uid`` may be read from ``directory``'s ``.spill/``:
    a file of root, of this process's user or of the directory's owner; for a directory shared
    with a group, also of a user whose primary or supplementary groups include that group."""
    if uid == 0 or uid == os.geteuid():
        return True
    try:
        if uid == os.stat(directory.path).st_uid:
            return True
    except OSError:
        return False
    gid = directory.gid
    if gid is None:
        return False
    now = time.monotonic()
    cached = _owner_cache.get((uid, gid))
    if cached is not None and cached[0] > now:
        return cached[1]
    try:
        pw = pwd.getpwuid(uid)
        member = pw.pw_gid == gid or gid in os.getgrouplist(pw.pw_name, pw.pw_gid)
    except (KeyError, OSError):  # no such user (any more)
        member = False
    if len(_owner_cache) > 1024:
        _owner_cache.clear()
    _owner_cache[(uid, gid)] = (now + OWNER_CACHE_S, member)
    return member


class SysvQueue:
    """The System V queue behind one name in a :class:`TransitDirectory`.

    Thread-safe: several threads may send and receive at once (the kernel orders them).
    ``existing``: an already open queue to wrap instead of opening (or creating) the name.
    Raises :class:`TransitBroken` if the queue cannot be opened or created.
    """

    def __init__(self, directory: TransitDirectory, qname: str, msgmax: int,
                 existing: sysv_ipc.MessageQueue | None = None):
        self.directory = directory
        self.qname = qname
        self.msgmax = msgmax
        self._open(existing)

    def _open(self, existing: sysv_ipc.MessageQueue | None = None) -> None:
        self.queue = existing or self.directory.open_queue(self.qname, self.msgmax)
        # A message must fit both the kernel's per-message limit and the queue's capacity.
        self.limit = min(self.msgmax, self.queue.max_size)

    def reopen(self) -> None:
        """Open the name again (after the queue was removed under us); creates a new queue."""
        self._open()

    # -- sending ---------------------------------------------------------------------------

    def send_body(self, body: bytes, timeout: float | None) -> None:
        """Send one encoded JSON body, spilling it if too large.

        ``timeout``: seconds to wait for room; ``None`` waits for ever, ``0`` does not wait.
        Raises :class:`QueueFull` (nothing was sent), :class:`QueueRemoved`,
        :class:`TransitBroken`.
        """
        payload = _wire.HEADER_JSON + body
        if len(payload) <= self.limit:
            self._send_payload(payload, timeout)
            return
        if len(body) > MAX_MESSAGE_BYTES:
            raise UnserializableMessage(f"a message of {len(body)} bytes is larger than a "
                                        f"message may be ({MAX_MESSAGE_BYTES} bytes)")
        spill_name = self._write_spill(body)
        try:
            self._send_payload(_wire.HEADER_SPILL + spill_name.encode("ascii"), timeout)
        except BaseException:
            self._remove_spill(spill_name)
            raise

    def send_raw(self, payload: bytes, timeout: float | None = None) -> None:
        """Put ``payload`` on the queue as it is (no header added): for tests and tools."""
        self._send_payload(payload, timeout)

    def _send_payload(self, payload: bytes, timeout: float | None) -> None:
        queue = self.queue
        try:
            queue.send(payload, False, MTYPE)
            return
        except sysv_ipc.BusyError:
            if timeout is not None and timeout <= 0:
                raise QueueFull(f"queue {self.qname!r} is full") from None
        except (sysv_ipc.Error, OSError, ValueError) as exc:
            self._raise_unless_eintr(exc, "send to")

        def attempt(block: bool) -> None:
            queue.send(payload, block, MTYPE)

        self._wait(attempt, timeout, lambda: QueueFull(
            f"queue {self.qname!r} stayed full for {timeout} s; the message was not sent"
        ))

    def _write_spill(self, body: bytes) -> str:
        name = uuid.uuid4().hex
        path = self.directory.spill_path / name
        dir_fd = self.directory.open_spill_dir()  # never through a swapped-in link
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                         | os.O_NOFOLLOW, self.directory.file_mode, dir_fd=dir_fd)
            try:
                os.fchmod(fd, self.directory.file_mode)  # the umask must not narrow it
                if self.directory.gid is not None:
                    os.fchown(fd, -1, self.directory.gid)
                view = memoryview(body)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
        except OSError as exc:
            raise TransitBroken(f"cannot write spill file {path}: {exc}") from exc
        finally:
            os.close(dir_fd)
        return name

    def _remove_spill(self, name: str) -> None:
        try:
            os.unlink(self.directory.spill_path / name)
        except OSError:
            pass

    # -- receiving -------------------------------------------------------------------------

    def receive_payload(self, timeout: float | None, cancelled=None) -> bytes:
        """Take the next raw message off the queue.

        ``timeout``: seconds; ``None`` waits for ever; ``0`` does not wait. ``cancelled``: a
        callable checked after each interruption; when it returns true, :class:`Cancelled` is
        raised. Raises :class:`Empty`, :class:`QueueRemoved`, :class:`TransitBroken`.
        """
        queue = self.queue

        def attempt(block: bool) -> bytes:
            return queue.receive(block, MTYPE)[0]

        if timeout is None:
            # Block at once: trying a non-blocking receive first would cost a failed system
            # call on every empty-queue wait. EINTR and the rest are handled in _wait.
            return self._wait(attempt, None, None, cancelled)
        try:
            return attempt(False)
        except sysv_ipc.BusyError:
            if timeout <= 0:
                raise Empty(f"queue {self.qname!r} is empty") from None
        except (sysv_ipc.Error, OSError) as exc:
            self._raise_unless_eintr(exc, "receive from")

        return self._wait(attempt, timeout, lambda: Empty(
            f"no message on queue {self.qname!r} within {timeout} s"
        ), cancelled)

    # -- receiving without taking (for a receiver that journals before it takes) ----------

    def _msgrcv_error(self, doing: str) -> int:
        """The errno of the last ``msgrcv``; raises :class:`QueueRemoved` or
        :class:`TransitBroken` unless it is ``EINTR``, ``E2BIG`` or ``ENOMSG``."""
        err = ctypes.get_errno()
        if err in (errno.EINTR, errno.E2BIG, errno.ENOMSG):
            return err
        if err in (errno.EIDRM, errno.EINVAL):
            try:
                self.queue.current_messages
            except sysv_ipc.ExistentialError:
                raise QueueRemoved(f"queue {self.qname!r} was removed") from None
        raise TransitBroken(f"cannot {doing} queue {self.qname!r}: {os.strerror(err)}")

    def wait_for_message(self, cancelled) -> None:
        """Block until the queue holds a message, and leave it there: ``msgrcv`` with room for
        0 bytes fails with ``E2BIG`` instead of taking a longer message (every message of ours
        is longer). Interrupted like :meth:`receive_payload` (``cancelled`` is checked after
        each ``EINTR``; :class:`Cancelled` when true). An empty message from a foreign sender
        is taken and raises :class:`BadMessage`. Raises :class:`QueueRemoved`,
        :class:`TransitBroken`."""
        buf = ctypes.create_string_buffer(ctypes.sizeof(ctypes.c_long))
        while True:
            if _msgrcv(self.queue.id, buf, 0, 0, 0) == 0:
                raise BadMessage("empty message", qname=self.qname, raw=b"")
            if self._msgrcv_error("wait on") == errno.E2BIG:
                return
            if cancelled is not None and cancelled():
                raise Cancelled(f"receive on {self.qname!r} cancelled")

    def copy_payloads(self, limit: int) -> list[bytes] | None:
        """Copies of the first ``limit`` (or fewer) raw messages, left on the queue
        (``MSG_COPY``); ``None`` if this kernel cannot copy a message. A message whose type
        is not ours is copied as ``b""`` (refused by :meth:`decode`). Raises
        :class:`QueueRemoved`, :class:`TransitBroken`."""
        size = max(self.msgmax, self.limit)
        buf = ctypes.create_string_buffer(ctypes.sizeof(ctypes.c_long) + size)
        head = ctypes.sizeof(ctypes.c_long)
        out = []
        for index in range(limit):
            n = _msgrcv(self.queue.id, buf, size, index, MSG_COPY | IPC_NOWAIT | MSG_NOERROR)
            if n < 0:
                err = ctypes.get_errno()
                if err == errno.ENOSYS or (err == errno.EINVAL and index == 0 and not out
                                           and self._alive()):
                    return None
                if self._msgrcv_error("copy from") in (errno.ENOMSG, errno.EINTR):
                    break
                continue
            mtype = ctypes.c_long.from_buffer(buf).value
            out.append(buf.raw[head:head + n] if mtype == MTYPE else b"")
        return out

    def _alive(self) -> bool:
        try:
            self.queue.current_messages
            return True
        except sysv_ipc.ExistentialError:
            return False

    def discard(self, count: int) -> int:
        """Take the first ``count`` messages off the queue without reading them (after they
        were copied and journaled); return how many were taken (fewer if another reader took
        some). Raises :class:`QueueRemoved`, :class:`TransitBroken`."""
        buf = ctypes.create_string_buffer(ctypes.sizeof(ctypes.c_long))
        taken = 0
        while taken < count:
            if _msgrcv(self.queue.id, buf, 0, 0, IPC_NOWAIT | MSG_NOERROR) >= 0:
                taken += 1
                continue
            if self._msgrcv_error("take from") == errno.ENOMSG:
                break
        return taken

    def remove_spill_of(self, payload: bytes) -> None:
        """Remove the spill file a raw spill reference names (after :meth:`decode` with
        ``keep_spill=True`` and :meth:`discard`); nothing for other messages."""
        if payload[:4] == _wire.HEADER_SPILL:
            name = payload[4:].decode("ascii", "replace")
            if name.isascii() and name.isalnum():
                try:
                    dir_fd = self.directory.open_spill_dir()
                except TransitBroken:
                    return
                try:
                    _unlink_at(dir_fd, name)
                finally:
                    os.close(dir_fd)

    def decode(self, payload: bytes, keep_spill: bool = False) -> dict:
        """Turn a raw message into the message dict; reads and removes a spill file (reads
        only, with ``keep_spill``: see :meth:`remove_spill_of`).

        Raises :class:`BadMessage` for anything that is not a valid message, including a
        spill reference that is not a bare name of a regular file in ``.spill/`` owned by a
        user allowed on the transit directory (see :func:`owner_allowed`); the file's content
        never reaches the error (``raw`` is the reference).
        """
        if payload[:4] == _wire.HEADER_JSON:  # the common case, without memoryviews
            try:
                message = orjson.loads(payload[4:])
            except orjson.JSONDecodeError:
                message = None
            if type(message) is dict:
                if payload.translate(DIGIT_TABLE).find(LONG_RUN) != -1:  # rare: look closer
                    _wire.check_integers(payload[4:], self.qname)
                return message
        kind, body = _wire.split_header(payload, self.qname)
        if kind == _wire.KIND_JSON:
            return _wire.decode_body(body, self.qname)
        return self._decode_spill(payload, bytes(body), keep_spill)

    def _decode_spill(self, payload: bytes, reference: bytes, keep: bool) -> dict:
        name = reference.decode("ascii", "replace")
        if not (name.isascii() and name.isalnum()):
            raise BadMessage(f"bad spill file name {name!r}", qname=self.qname, raw=payload)
        data = self._read_spill(name, payload, keep)
        return _wire.decode_body(data, self.qname, raw=payload,
                                 what=f"spill file {name} (content not shown)")

    def _read_spill(self, name: str, payload: bytes, keep: bool = False) -> bytes:
        """The bytes of spill file ``name``, which is then removed (unless ``keep``); raises
        :class:`BadMessage`
        (whose ``raw`` is ``payload``, the reference) if it is not one to read."""
        try:
            dir_fd = self.directory.open_spill_dir()
        except TransitBroken as exc:
            raise BadMessage(str(exc), qname=self.qname, raw=payload) from None
        try:
            try:
                # O_NONBLOCK: a FIFO put there must not block the open; fstat refuses it.
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
                             | os.O_CLOEXEC, dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    self._refuse_spill(dir_fd, name, payload, "is a symbolic link")
                raise BadMessage(f"spill file {self.directory.spill_path / name} unreadable: "
                                 f"{exc.strerror}", qname=self.qname, raw=payload) from None
            try:
                st = os.fstat(fd)
                if not stat_mod.S_ISREG(st.st_mode):
                    self._refuse_spill(dir_fd, name, payload, "is not a regular file")
                if st.st_nlink != 1:
                    self._refuse_spill(dir_fd, name, payload,
                                       f"has {st.st_nlink} links (a hard link to a file "
                                       "elsewhere?)")
                if not owner_allowed(st.st_uid, self.directory):
                    self._refuse_spill(dir_fd, name, payload,
                                       f"is owned by uid {st.st_uid}, which may not use the "
                                       f"transit directory {self.directory.path}")
                if st.st_size > MAX_MESSAGE_BYTES:
                    self._refuse_spill(dir_fd, name, payload,
                                       f"holds {st.st_size} bytes, more than a message may "
                                       f"({MAX_MESSAGE_BYTES})")
                with os.fdopen(fd, "rb", closefd=False) as f:
                    data = f.read()
            except OSError as exc:
                raise BadMessage(f"spill file {self.directory.spill_path / name} unreadable: "
                                 f"{exc.strerror}", qname=self.qname, raw=payload) from None
            finally:
                os.close(fd)
            if not keep:
                _unlink_at(dir_fd, name)
            return data
        finally:
            os.close(dir_fd)

    def _refuse_spill(self, dir_fd: int, name: str, payload: bytes, why: str):
        """Remove the entry ``name`` of ``.spill/`` (never what it points at) and raise
        :class:`BadMessage` saying ``why`` it was refused."""
        _unlink_at(dir_fd, name)
        raise BadMessage(f"spill file {self.directory.spill_path / name} refused: it {why}",
                         qname=self.qname, raw=payload)

    # -- waiting ---------------------------------------------------------------------------

    def _raise_unless_eintr(self, exc: BaseException, doing: str) -> None:
        """Turn a ``sysv_ipc``/``OSError`` failure into our error tree; return only for
        ``EINTR``, which the caller retries."""
        if _removed(self.queue, exc):
            raise QueueRemoved(f"queue {self.qname!r} was removed") from exc
        if not is_eintr(exc):
            raise TransitBroken(f"cannot {doing} queue {self.qname!r}: {exc}") from exc

    def _wait(self, attempt, timeout: float | None, timed_out, cancelled=None):
        """Run ``attempt(block=True)`` until it succeeds or ``timeout`` seconds pass.

        The blocking call is interrupted at the deadline by a signal (see ``_interrupt``);
        ``EINTR`` from any other signal is retried. Without an interrupt handler (a non-main
        thread before the main thread installed it) a timed wait backs off from 0.5 ms to 20 ms
        between non-blocking attempts instead.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        interrupter = None
        if deadline is not None:
            if not ensure_handler():
                return self._poll(attempt, deadline, timed_out)
            interrupter = Interrupter(threading.get_ident(), deadline)
        try:
            while True:
                try:
                    return attempt(True)
                except (sysv_ipc.Error, OSError) as exc:
                    self._raise_unless_eintr(exc, "wait on")
                if cancelled is not None and cancelled():
                    raise Cancelled(f"receive on {self.qname!r} cancelled")
                if deadline is not None and time.monotonic() >= deadline:
                    raise timed_out()
        finally:
            if interrupter is not None:
                interrupter.disarm()

    def _poll(self, attempt, deadline: float, timed_out):
        delay = _POLL_MIN_S
        while True:
            try:
                return attempt(False)
            except sysv_ipc.BusyError:
                pass
            except (sysv_ipc.Error, OSError) as exc:
                self._raise_unless_eintr(exc, "wait on")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise timed_out()
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, _POLL_MAX_S)

    # -- figures ---------------------------------------------------------------------------

    def stat(self) -> QueueStat:
        """The kernel's figures for this queue. Raises :class:`QueueRemoved`."""
        q = self.queue
        try:
            return QueueStat(
                name=self.qname,
                kind="sysv",
                messages=q.current_messages,
                bytes=_proc_cbytes(q.id),
                max_bytes=q.max_size,
                last_send_pid=q.last_send_pid or None,
                last_send_time=float(q.last_send_time) or None,
                last_receive_pid=q.last_receive_pid or None,
                last_receive_time=float(q.last_receive_time) or None,
                key=q.key,
                id=q.id,
            )
        except sysv_ipc.ExistentialError as exc:
            raise QueueRemoved(f"queue {self.qname!r} was removed") from exc
