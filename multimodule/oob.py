"""Out-of-band channels: ``log``, ``error``, ``alert`` and ``debug``.

Tasks and the daemon report through these channels, never through their message queues. Each
channel goes to one sink, chosen by the ``-o`` spec (``log:1,error:2,alert:journal,...``):

- ``1`` / ``2``: standard output / standard error, one line per record:
  ``TASK: text key=value ...`` (``log``) or ``CHANNEL: TASK: text key=value ...`` (others);
- ``journal``: journald with structured fields ``MESSAGE``, ``PRIORITY``, ``MULTIMODULE_TASK``,
  ``MULTIMODULE_CHANNEL`` and the caller's fields upper-cased (``journalctl
  MULTIMODULE_TASK=Example1``);
- a path (containing ``/``): appended to that file, each line starting with its local time
  (ISO 8601, microseconds, offset), created 0600 whatever the umask; a symbolic
  link or another user's file there is refused (reported on stderr, as a failing sink is);
- any other word: a queue name; the record is sent there as a message (``router`` means the
  ``Router`` queue), which is how the original routed its channels.

Defaults: ``journal`` for every channel under systemd (``$INVOCATION_ID`` set), else
``log:1,error:2,alert:2,debug:./debug.out``.

Writing never blocks the caller (the event loop): records for streams, files and the journal
go through a bounded queue to one writer thread. When that queue is full (a sink slower than
the records come), records are dropped and counted (:attr:`Channels.dropped`), and the count
is reported on the ``error`` channel's sink as soon as the writer catches up. Records for a
queue sink are sent at once (the daemon's sends never block either).
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, TextIO

import orjson

from multimodule.errors import ConfigError
from multimodule.state import open_for_append

CHANNELS = ("log", "error", "alert", "debug")

# syslog priorities, as journald expects them
_PRIORITY = {"log": 6, "error": 3, "alert": 1, "debug": 7}

Sender = Callable[[str, dict[str, Any]], None]


def format_fields(fields: dict[str, Any]) -> str:
    """A record's fields as they follow its text on a stream or in a file
    (`` key=value ...``; ``""`` for none)."""
    if not fields:
        return ""
    parts = []
    for key, value in fields.items():
        text = value if isinstance(value, str) else orjson.dumps(value, default=str).decode()
        parts.append(f"{key}={text}")
    return " " + " ".join(parts)


@dataclass
class Sink:
    """Where one channel's records go: ``kind`` is ``stdout``, ``stderr``, ``file``,
    ``journal`` or ``queue``; ``target`` is the path or queue name."""

    kind: str
    target: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _file: TextIO | None = field(default=None, repr=False)

    def write(self, channel: str, task: str, text: str, fields: dict[str, Any],
              send: Sender | None, when: float | None = None) -> None:
        """Write one record emitted at ``when`` (seconds since the epoch; default: now); a
        failing sink is reported on stderr, never raised."""
        try:
            if self.kind == "journal":
                self._journal(channel, task, text, fields)
            elif self.kind == "queue":
                if send is None:
                    raise RuntimeError("no transit to send the record with")
                record = {"channel": channel, "task": task, "text": text, "time": time.time()}
                record.update(fields)
                send(self.target, record)
            else:
                prefix = f"{task}: " if channel == "log" else f"{channel}: {task}: "
                if self.kind == "file":  # a file has no other clock: mmctl logs merges by it
                    stamp = datetime.fromtimestamp(when if when is not None else time.time())
                    prefix = stamp.astimezone().isoformat(timespec="microseconds") + " " + prefix
                line = prefix + text + format_fields(fields) + "\n"
                stream = self._stream()
                with self._lock:
                    stream.write(line)
                    stream.flush()
        except Exception as exc:  # a sink must never take the caller down
            sys.stderr.write(f"oob: cannot write {channel} record to {self.kind} "
                             f"{self.target}: {exc}: {task}: {text}\n")

    def _stream(self) -> TextIO:
        if self.kind == "stdout":
            return sys.stdout
        if self.kind == "stderr":
            return sys.stderr
        if self._file is None:
            fd = open_for_append(Path(self.target))  # 0600, never through a symlink
            self._file = open(fd, "a", encoding="utf-8")  # noqa: SIM115 - kept open
        return self._file

    def _journal(self, channel: str, task: str, text: str, fields: dict[str, Any]) -> None:
        from systemd import journal  # imported only when the journal is used

        extra = {}
        for key, value in fields.items():
            name = "".join(c if c.isalnum() else "_" for c in str(key)).upper()
            extra[name.lstrip("_") or "FIELD"] = value if isinstance(value, str) else \
                orjson.dumps(value, default=str).decode()
        journal.send(
            f"{task}: {text}",
            PRIORITY=str(_PRIORITY[channel]),
            MULTIMODULE_TASK=task,
            MULTIMODULE_CHANNEL=channel,
            SYSLOG_IDENTIFIER="multimodule",
            **extra,
        )

    def close(self) -> None:
        """Close the file of a ``file`` sink."""
        if self._file is not None:
            self._file.close()
            self._file = None


def parse_sink(spec: str) -> Sink:
    """Turn one handler word (``1``, ``2``, ``journal``, a path, a queue name) into a Sink.
    Raises :class:`ConfigError` for a file whose directory cannot be written or a word that
    is not a valid queue name."""
    if spec == "1":
        return Sink("stdout")
    if spec == "2":
        return Sink("stderr")
    if spec == "journal":
        return Sink("journal")
    if "/" in spec:
        directory = os.path.dirname(os.path.abspath(spec))
        if os.path.isdir(spec) or not os.access(directory, os.W_OK | os.X_OK):
            raise ConfigError(f"out-of-band file {spec!r}: not a file in a writable directory")
        return Sink("file", spec)
    if spec.lower() == "router":
        return Sink("queue", "Router")
    if not spec:
        raise ConfigError("empty out-of-band handler")
    from multimodule.errors import InvalidQueueName
    from multimodule.transit import validate_qname

    try:
        validate_qname(spec)
    except InvalidQueueName as exc:
        raise ConfigError(f"out-of-band handler {spec!r} is neither 1, 2, journal, router, a "
                          f"path (with a /) nor a queue name: {exc}") from None
    return Sink("queue", spec)


def default_spec(environ: dict[str, str] | None = None) -> str:
    """The default ``-o`` spec: journald under systemd, else stdout/stderr/a debug file."""
    env = os.environ if environ is None else environ
    if env.get("INVOCATION_ID"):
        return "log:journal,error:journal,alert:journal,debug:journal"
    return "log:1,error:2,alert:2,debug:./debug.out"


def absolute_spec(spec: str) -> str:
    """``spec`` with each file path made absolute (for a process with another working
    directory, such as an external task's)."""
    parts = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        channel, sep, handler = part.partition(":")
        if sep and "/" in handler:
            handler = os.path.abspath(handler)
        parts.append(f"{channel}{sep}{handler}")
    return ",".join(parts)


def spec_of(sinks: dict[str, Sink]) -> str:
    """The ``-o`` spec that gives ``sinks`` (file paths made absolute)."""
    handlers = {"stdout": "1", "stderr": "2", "journal": "journal"}
    return absolute_spec(",".join(f"{channel}:{handlers.get(sink.kind, sink.target)}"
                                  for channel, sink in sinks.items()))


def parse_spec(spec: str) -> dict[str, Sink]:
    """Parse ``channel:handler,...`` over the defaults. Raises :class:`ConfigError` naming the
    bad part (an unknown channel, a part without ``:``)."""
    sinks = {ch: parse_sink(h) for ch, h in
             (part.split(":", 1) for part in default_spec().split(","))}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        channel, sep, handler = part.partition(":")
        if not sep:
            raise ConfigError(f"out-of-band spec part {part!r} is not CHANNEL:HANDLER")
        if channel not in CHANNELS:
            raise ConfigError(
                f"unknown out-of-band channel {channel!r} (channels: {', '.join(CHANNELS)})"
            )
        sinks[channel] = parse_sink(handler)
    return sinks


#: Records that may wait for the writer thread before new ones are dropped.
WRITER_QUEUE_SIZE = 10_000

#: Seconds :meth:`Channels.close` waits for the writer to write what is queued.
CLOSE_WAIT_S = 5.0


class Channels:
    """The four channels of one process.

    ``sinks``: channel name to :class:`Sink` (see :func:`parse_spec`). ``debug_level``: debug
    records with ``level`` above it are dropped (0: no debug output). ``send``: how queue sinks
    send (``send(qname, message)``), set once transit is up. ``queue_size``: records that may
    wait for the writer thread. ``counts``: records emitted per channel; ``dropped``: records
    lost because the writer was that far behind.
    """

    def __init__(self, sinks: dict[str, Sink] | None = None, debug_level: int = 0,
                 send: Sender | None = None, queue_size: int = WRITER_QUEUE_SIZE):
        self.sinks = sinks if sinks is not None else parse_spec("")
        self.debug_level = debug_level
        self.send = send
        self.counts = dict.fromkeys(CHANNELS, 0)
        self.dropped = 0
        self._reported_drops = 0
        self._pending: queue.Queue = queue.Queue(queue_size)
        self._writer: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._count_lock = threading.Lock()

    def emit(self, channel: str, task: str, text: str, /, **fields: Any) -> None:
        """Write a record on ``channel`` for ``task``; ``fields`` are structured extras.
        Never blocks and never raises for a failing sink. Safe to call from any thread (the
        handler watchdog reports from its own while the event loop is blocked), provided
        :attr:`send` is (a host's is: its overflow)."""
        if channel == "debug":
            level = fields.pop("level", 1)
            if level > self.debug_level:
                return
        with self._count_lock:
            self.counts[channel] += 1
        sink = self.sinks[channel]
        if sink.kind == "queue":
            sink.write(channel, task, str(text), fields, self.send)
            return
        if self._writer is None:
            self._start_writer()
        try:
            self._pending.put_nowait((sink, channel, task, str(text), fields, time.time()))
        except queue.Full:
            with self._count_lock:
                self.dropped += 1

    def _start_writer(self) -> None:
        with self._start_lock:
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_records, name="mm-oob",
                                                daemon=True)
                self._writer.start()

    def _write_records(self) -> None:
        while True:
            item = self._pending.get()
            if item is None:
                return
            sink, channel, task, text, fields, when = item
            sink.write(channel, task, text, fields, self.send, when)
            if self.dropped != self._reported_drops and self._pending.empty():
                lost = self.dropped - self._reported_drops
                self._reported_drops = self.dropped
                error = self.sinks["error"]
                if error.kind != "queue":
                    error.write("error", "MultiModule",
                                f"{lost} out-of-band records were dropped: the sinks are "
                                "slower than the records come", {"dropped_total": self.dropped},
                                None)

    def flush(self, timeout: float = CLOSE_WAIT_S) -> bool:
        """Wait up to ``timeout`` seconds until every queued record is written; return
        whether it was."""
        if self._writer is None:
            return True
        done = threading.Event()
        try:
            self._pending.put((_Marker(done), "", "", "", {}, None), timeout=timeout)
        except queue.Full:
            return False
        return done.wait(timeout)

    def close(self) -> None:
        """Write what is queued (up to 5 s), stop the writer, close file sinks."""
        if self._writer is not None:
            try:
                self._pending.put(None, timeout=CLOSE_WAIT_S)
            except queue.Full:
                pass
            self._writer.join(CLOSE_WAIT_S)
            self._writer = None
        for sink in self.sinks.values():
            sink.close()


class _Marker:
    """A fake sink whose write tells :meth:`Channels.flush` that the writer got there."""

    kind = "marker"

    def __init__(self, done: threading.Event):
        self.done = done

    def write(self, *args: Any) -> None:
        self.done.set()
