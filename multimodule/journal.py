"""The input journal of one task: what reached the task, written before it is handled.

Every message put on a task's in-memory queue (taken off its System V queue, or sent to it in
memory by a task of the same process) is appended to the task's journal, one JSON line per
message, in the order of the queue. A record's *sequence number* (``seq``, from 1) is its
position in that order: the task handles messages in the same order, so "handled up to
``seq``" is one integer, saved with the task's state in its checkpoint
(:class:`multimodule.state.Checkpoint`). After a crash, the records past the checkpoint are
delivered again before anything new (:meth:`Journal.recover`).

Appends are buffered and written with one ``write`` per :meth:`Journal.flush` (the host flushes
once per turn of its event loop, at once for messages taken off a System V queue, and before
every checkpoint); a written record survives a kill of the process (it is in the page cache).
``fsync=True`` also syncs each flush to the disk, for power loss, at a cost the runtime
benchmark prints. A record written only in part (the process killed inside ``write``) is cut
off at recovery: its message was never handed to the task.

On disk: ``DIR/<first seq, 20 digits>.journal`` segments, made 0600 without following links
in a private directory. A segment whose records are all checkpointed is deleted, except the newest; the one
being written is closed and a new one begun when it passes :data:`SEGMENT_BYTES`, or when everything
in it is checkpointed and it holds more than :data:`ROTATE_IDLE_BYTES`.

The idea is the write-ahead log of databases and of brokers such as Kafka (an append-only log
of segments, an offset committed with the consumer's state, at-least-once redelivery).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import orjson

from multimodule.errors import StateError
from multimodule.files import make_private_dirs
from multimodule.state import check_directory, read_own_file
from multimodule.transit import META_KEY

#: A segment is closed and a new one begun past this many bytes.
SEGMENT_BYTES = 4 * 1024 * 1024
#: A segment whose records are all checkpointed is replaced by a new one past this many bytes
#: (so an idle journal takes no room, and a busy one is not re-created at every checkpoint).
ROTATE_IDLE_BYTES = 64 * 1024

_dumps = orjson.dumps
_NEWLINE = orjson.OPT_APPEND_NEWLINE

#: How many of the last records' ids :meth:`Journal.recover` remembers.
LAST_IDS = 256

_SUFFIX = ".journal"


def _segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}{_SUFFIX}"


class Journal:
    """The journal of one task in ``directory`` (created 0700; refused like the state
    directory if another user owns it or others may write it: :class:`ConfigError`).

    ``fsync``: sync every flush to the disk. Not thread-safe: the hosts use it from their
    event loop's thread only (a receiver's thread hands its messages to the loop first).
    """

    def __init__(self, directory: Path, *, fsync: bool = False):
        self.directory = Path(directory)
        make_private_dirs(self.directory)
        check_directory(self.directory.parent, "journal directory")
        check_directory(self.directory, "journal directory")
        self.fsync = fsync
        #: Whether records were buffered since the last flush; ``on_dirty(journal)``, if set,
        #: is called when it becomes true (the host then has it written at the end of the
        #: loop's turn): one look per record instead of a call.
        self.dirty = False
        self.on_dirty: Callable[[Journal], None] | None = None
        #: Sequence number the next appended record gets.
        self.next_seq = 1
        #: Last sequence number written to the file (flushed).
        self.written_seq = 0
        # One growing buffer: each record is copied in and orjson's own buffer (a few KiB,
        # shrunk in place) freed at once for the next record (kept, 300 of them made
        # append cost 3 µs instead of 0.5).
        self._buffer = bytearray()
        self._fd: int | None = None
        self._segment_bytes = 0
        #: First sequence numbers of the segments on disk, oldest first.
        self._segments: list[int] = []
        #: Records skipped at recovery because they were not messages (line numbers), and
        #: what else recovery found amiss (a position past the last record).
        self.bad_records: list[str] = []
        #: What recovery cut off: a last record written in part (a kill inside ``write``,
        #: normal after a crash: that message was never handed to the task).
        self.cut_off: list[str] = []
        #: Ids of the last records found at recovery (at most :data:`LAST_IDS`), handled or
        #: not: a receiver that journals before it takes skips these if it finds them again.
        self.last_ids: set[str] = set()

    # -- recovery --------------------------------------------------------------------------

    def recover(self, after: int) -> list[dict[str, Any]]:
        """Read the segments; return the messages with a sequence number above ``after`` (the
        checkpointed position), oldest first, and continue numbering after the last record.
        A record that is not a JSON object is skipped and described in :attr:`bad_records`; a
        partly written last record is cut off. Raises :class:`StateError` if a segment cannot
        be read."""
        names = sorted(p.name for p in self.directory.iterdir()
                       if p.name.endswith(_SUFFIX) and p.name[:-len(_SUFFIX)].isdigit())
        out: list[dict[str, Any]] = []
        last_ids: list[Any] = []
        seq = 0
        for name in names:
            path = self.directory / name
            first = int(name[:-len(_SUFFIX)])
            try:
                data = read_own_file(path)
            except OSError as exc:
                raise StateError(f"cannot read journal segment {path}: {exc}") from exc
            lines = data.split(b"\n")
            torn = lines.pop()  # b"" when the segment ends with a whole record
            if not lines:  # made, then killed before its first record was whole
                path.unlink()
                continue
            if torn:
                os.truncate(path, len(data) - len(torn))
                self.cut_off.append(f"{path.name}: a last record of {len(torn)} bytes written "
                                    "in part, cut off")
            self._segments.append(first)
            tail = lines[-LAST_IDS:]
            for line in tail:
                try:
                    meta = orjson.loads(line).get(META_KEY)
                    last_ids.append(meta["id"])
                except (orjson.JSONDecodeError, AttributeError, TypeError, KeyError):
                    pass
            for index, line in enumerate(lines):
                seq = first + index
                if seq <= after:
                    continue
                try:
                    message = orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    message = None
                    why = str(exc)
                else:
                    why = "not a JSON object"
                if message.__class__ is not dict:
                    self.bad_records.append(f"{path.name} record {index + 1}: {why}")
                    continue
                out.append(message)
            seq = first + len(lines) - 1
        if names and after > seq:
            self.bad_records.append(
                f"the checkpoint's position {after} is past the journal's last record {seq}: "
                f"records up to {seq} are taken as handled (a checkpoint from another journal, "
                "or a journal cut short)")
        self.next_seq = max(seq, after) + 1
        self.written_seq = self.next_seq - 1
        self.last_ids = {i for i in last_ids[-LAST_IDS:] if isinstance(i, str)}
        return out

    # -- appending -------------------------------------------------------------------------

    def append(self, message: dict[str, Any]) -> int:
        """Buffer ``message`` (a JSON object; raises ``TypeError`` if it cannot be encoded);
        return its sequence number. It is on disk after the next :meth:`flush`. The first
        record after a flush calls :attr:`on_dirty` (if set) with the journal."""
        self._buffer += _dumps(message, option=_NEWLINE)
        seq = self.next_seq
        self.next_seq = seq + 1
        if not self.dirty:
            self.dirty = True
            if self.on_dirty is not None:
                self.on_dirty(self)
        return seq

    @property
    def pending(self) -> bool:
        """Whether records wait in the buffer."""
        return bool(self._buffer)

    def flush(self) -> None:
        """Write the buffered records (and sync them if ``fsync``). Raises :class:`StateError`
        if the file cannot be written (the records stay buffered for the next try)."""
        if not self._buffer:
            return
        data = self._buffer
        try:
            if self._fd is None or self._segment_bytes >= SEGMENT_BYTES:
                self._open_segment(self.written_seq + 1)
            with memoryview(data) as whole:
                view = whole
                while view:
                    view = view[os.write(self._fd, view):]
                del view
            if self.fsync:
                os.fsync(self._fd)
        except OSError as exc:
            if self._fd is not None:  # no part of a record may stay: numbering is by line
                try:
                    os.ftruncate(self._fd, self._segment_bytes)
                except OSError:
                    pass
            raise StateError(f"cannot write the journal in {self.directory}: {exc}") \
                from exc
        self._segment_bytes += len(data)
        self.written_seq = self.next_seq - 1
        self._buffer = bytearray()
        self.dirty = False

    def _open_segment(self, first_seq: int) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        path = self.directory / _segment_name(first_seq)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        os.fchmod(fd, 0o600)
        if self.fsync:
            dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        self._fd = fd
        self._segment_bytes = 0
        self._segments.append(first_seq)

    # -- after a checkpoint ----------------------------------------------------------------

    def checkpointed(self, seq: int) -> None:
        """The task's checkpoint now holds position ``seq``: delete the segments whose records
        are all at or below it, and begin a new segment if the current one is wholly
        checkpointed and large enough (see the module docstring)."""
        if (self._fd is not None and seq >= self.written_seq and not self._buffer
                and self._segment_bytes >= ROTATE_IDLE_BYTES):
            os.close(self._fd)
            self._fd = None  # the next flush begins a segment at written_seq + 1
            self._segment_bytes = 0
        # The newest segment is kept even when all of it is checkpointed: its last ids
        # are what a restart needs (see last_ids).
        segments = self._segments
        keep_from = 0
        for index in range(len(segments) - 1):
            if segments[index + 1] - 1 <= seq:
                keep_from = index + 1
            else:
                break
        for first in segments[:keep_from]:
            try:
                os.unlink(self.directory / _segment_name(first))
            except FileNotFoundError:
                pass
        del segments[:keep_from]

    def close(self) -> None:
        """Flush what is buffered and close the file (idempotent)."""
        self.flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
