"""``mmctl logs [TASK ...] [-f] [-n N] [--since T]``: what tasks wrote on their out-of-band
channels, internal and external alike, merged in time order with the task's name on each line.

It reads where the daemon writes, as its published options say (``STATE_DIR/daemon-options.json``,
see :func:`~multimodule.config.published_options`): from the journal when a channel goes there
(records with ``MULTIMODULE_TASK=``, and the output of the units ``multimodule.service`` and
``multimodule-task@NAME.service``), and from the files of its ``-o`` spec and the detached
tasks' ``STATE_DIR/task-NAME.log`` otherwise (file records start with their time; a line
without one, such as a traceback, takes the time of the line before it; what a task prints,
``TASK: text``, is that task's). Each line is printed
as ``TIME TASK: text`` (``log``) or ``TIME CHANNEL: TASK: text``. ``-f`` follows new records
as they come (the journal's or inotify's wake-ups), until Ctrl-C.
"""

from __future__ import annotations

import argparse
import heapq
import json
import re
import sys
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterable, Iterator

from multimodule.config import options_path
from multimodule.errors import CommandError
from multimodule.oob import CHANNELS, parse_spec

#: The daemon's own records carry this name.
DAEMON = "MultiModule"
_UNIT = re.compile(r"multimodule-task@(?P<task>[A-Za-z_][A-Za-z0-9_]*)\.service")
_CHANNEL_PREFIX = tuple(f"{channel}: " for channel in CHANNELS if channel != "log")
_DURATION = re.compile(r"(?P<n>\d+(?:\.\d+)?)(?P<unit>[smhd])")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True, order=True)
class Line:
    """One record: ``time`` (seconds since the epoch), ``task``, ``channel``, ``text``."""

    time: float
    task: str
    channel: str
    text: str

    def render(self) -> str:
        """``TIME TASK: text`` or ``TIME CHANNEL: TASK: text`` (local time, ms)."""
        stamp = datetime.fromtimestamp(self.time).isoformat(sep=" ", timespec="milliseconds")
        channel = "" if self.channel == "log" else f"{self.channel}: "
        return f"{stamp} {channel}{self.task}: {self.text}"


def parse_since(text: str, now: float) -> float:
    """``--since``: an ISO date and time (``2026-12-02 19:00``, local time unless it has an
    offset) or a duration ago (``90s``, ``10m``, ``2h``, ``1d``); seconds since the epoch.
    Raises :class:`~multimodule.errors.CommandError` (exit status 1)."""
    match = _DURATION.fullmatch(text.strip())
    if match:
        return now - float(match["n"]) * _SECONDS[match["unit"]]
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise CommandError(f"--since {text!r}: give a date and time (2026-12-02 19:00) or a "
                        "duration ago (90s, 10m, 2h, 1d)") from None


def split_record(rest: str, default_task: str) -> tuple[str, str, str]:
    """``(task, channel, text)`` of a record as the daemon prints it (``TASK: text`` or
    ``CHANNEL: TASK: text``); a line of another shape is ``default_task``'s ``log``."""
    channel = "log"
    if rest.startswith(_CHANNEL_PREFIX):
        channel, rest = rest.split(": ", 1)
    task, sep, text = rest.partition(": ")
    if sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", task):
        return task, channel, text
    return default_task, channel, rest


def file_lines(path: Path, default_task: str, start: int = 0,
               last_time: float | None = None) -> tuple[list[Line], int, float | None]:
    """The records of ``path`` from byte ``start``: ``(lines, end offset, last time)``. A line
    without a leading time takes the one before it (or the file's modification time)."""
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read()
    complete = data[:data.rfind(b"\n") + 1]
    out = []
    for raw in complete.decode("utf-8", "replace").splitlines():
        stamp, _, rest = raw.partition(" ")
        try:
            when = datetime.fromisoformat(stamp).timestamp()
        except ValueError:
            when, rest = (last_time if last_time is not None else path.stat().st_mtime), raw
        last_time = when
        task, channel, text = split_record(rest, default_task)
        out.append(Line(when, task, channel, text))
    return out, start + len(complete), last_time


def daemon_sources(state_dir: Path) -> tuple[bool, dict[Path, str], list[str]]:
    """Where the daemon of ``state_dir`` writes: ``(journal, {file: default task}, channels
    it writes to its standard output or error, which cannot be read here)``."""
    try:
        published = json.loads(options_path(state_dir).read_bytes())
        sinks = parse_spec(published.get("sinks") or published["oob"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CommandError(f"cannot tell where the daemon writes: {options_path(state_dir)}: "
                        f"{exc} (is -s the daemon's state directory?)") from None
    journal = any(sink.kind == "journal" for sink in sinks.values())
    files = {Path(sink.target): DAEMON for sink in sinks.values() if sink.kind == "file"}
    for log in sorted(state_dir.glob("task-*.log")):
        files[log] = log.name[len("task-"):-len(".log")]
    unread = [channel for channel, sink in sinks.items() if sink.kind in ("stdout", "stderr")]
    return journal, files, unread


def journal_lines(reader, tasks: set[str]) -> Iterator[Line]:
    """The records the journal ``reader`` gives next (its matches set by
    :func:`open_journal`), as :class:`Line`; those of other tasks left out."""
    for entry in reader:
        task = entry.get("MULTIMODULE_TASK")
        channel = entry.get("MULTIMODULE_CHANNEL", "log")
        text = str(entry.get("MESSAGE", ""))
        unit = _UNIT.fullmatch(str(entry.get("_SYSTEMD_UNIT", "")))
        if task is None:  # a process's own output: "TASK: text" as a task printed it
            task, channel, text = split_record(text, unit["task"] if unit else DAEMON)
            if entry.get("PRIORITY", 6) <= 3:
                channel = "error"
        else:
            if text.startswith(f"{task}: "):
                text = text[len(task) + 2:]
            if task == DAEMON and unit:
                task = unit["task"]  # an external task's process, of itself
        if tasks and task not in tasks:
            continue
        yield Line(entry["__REALTIME_TIMESTAMP"].timestamp(), str(task), str(channel), text)


def open_journal(tasks: set[str], since: float | None):
    """A journal reader matching the records of ``tasks`` (every task: empty) and the output
    of their units, from ``since`` (seconds since the epoch) or the start."""
    from systemd import journal  # imported only when the journal is read

    reader = journal.Reader()
    if tasks:
        reader.add_match(_SYSTEMD_UNIT="multimodule.service")  # what tasks print there
        reader.add_disjunction()
        for task in sorted(tasks):
            reader.add_match(MULTIMODULE_TASK=task)
            reader.add_disjunction()
            reader.add_match(_SYSTEMD_UNIT=f"multimodule-task@{task}.service")
            reader.add_disjunction()
    else:
        reader.add_match(SYSLOG_IDENTIFIER="multimodule")
        reader.add_disjunction()
        reader.add_match(_SYSTEMD_UNIT="multimodule.service")
        for unit in sorted(reader.query_unique("_SYSTEMD_UNIT")):
            if _UNIT.fullmatch(unit):
                reader.add_disjunction()
                reader.add_match(_SYSTEMD_UNIT=unit)
    if since is not None:
        reader.seek_realtime(datetime.fromtimestamp(since))
    return reader


def _last(lines: Iterable[Line], count: int | None, since: float | None) -> list[Line]:
    kept = (line for line in lines if since is None or line.time >= since)
    return list(deque(kept, maxlen=count)) if count is not None else list(kept)


def run(args: argparse.Namespace) -> int:
    """``mmctl logs``; see the module docstring. Raises :class:`~multimodule.errors.CommandError` (exit status 1)."""
    tasks = set(args.tasks)
    since = parse_since(args.since, datetime.now().timestamp()) if args.since else None
    journal, files, unread = daemon_sources(args.state_dir)
    if unread:
        print(f"{args.prog} logs: the daemon writes its {', '.join(unread)} records to its "
              "standard output or error, which are not read here (give it -o CHANNEL:FILE, "
              "or run it under systemd)", file=sys.stderr)
    if journal:
        reader = open_journal(tasks, since)
        for line in _last(journal_lines(reader, tasks), args.lines, since):
            print(line.render(), flush=True)
        while args.follow:
            reader.wait(-1)  # the journal's own wake-up: new entries, or a rotation
            for line in journal_lines(reader, tasks):
                print(line.render(), flush=True)
        return 0
    offsets: dict[Path, tuple[int, float | None]] = {}
    per_file = []
    for path, default in files.items():
        try:
            lines, end, last = file_lines(path, default)
        except FileNotFoundError:
            lines, end, last = [], 0, None
        offsets[path] = (end, last)
        per_file.append([line for line in lines if not tasks or line.task in tasks])
    for line in _last(heapq.merge(*per_file), args.lines, since):
        print(line.render(), flush=True)
    if args.follow:
        _follow(files, offsets, tasks)
    return 0


def _follow(files: dict[Path, str], offsets: dict[Path, tuple[int, float | None]],
            tasks: set[str]) -> None:
    from inotify_simple import INotify, flags

    watcher = INotify()
    directories = {path.parent for path in files}
    for directory in directories:
        watcher.add_watch(str(directory), flags.MODIFY | flags.CREATE | flags.MOVED_TO)
    changed = set(files)  # once first: what was written before the watches began
    while True:
        new = []
        for path in sorted(changed):
            start, last = offsets.get(path, (0, None))
            try:
                if path.stat().st_size < start:
                    start = 0  # truncated or replaced: read it from the start
                lines, end, last = file_lines(path, files[path], start, last)
            except FileNotFoundError:
                continue
            offsets[path] = (end, last)
            new += [line for line in lines if not tasks or line.task in tasks]
        for line in sorted(new):
            print(line.render(), flush=True)
        changed = {Path(directory, event.name)
                   for event in watcher.read() for directory in directories
                   if event.name and Path(directory, event.name) in files}


def add_parser(sub, common) -> None:
    """Register ``mmctl logs`` on the subparsers ``sub`` (it reads no queue: the transit
    options of ``common`` are not offered)."""
    p = sub.add_parser(
        "logs", help="show what tasks wrote on their channels",
        description="What the daemon and its tasks (internal and external) wrote on their "
                    "log, error, alert and debug channels, merged in time order with the "
                    "task's name on each line: from the journal when the daemon writes "
                    "there (under systemd), else from the files of its -o spec and the "
                    "detached tasks' STATE_DIR/task-NAME.log. Ctrl-C ends -f.")
    p.add_argument("tasks", metavar="TASK", nargs="*",
                   help="only these tasks (the daemon's own records: MultiModule)")
    p.add_argument("-f", "--follow", action="store_true", help="print new records as they come")
    p.add_argument("-n", "--lines", type=_count, default=None, metavar="N",
                   help="only the last N records (default: all)")
    p.add_argument("--since", metavar="T", help="records from T on: a date and time "
                                               "('2026-12-02 19:00') or a duration ago "
                                               "(90s, 10m, 2h, 1d)")
    p.add_argument("-s", "--state-dir", type=Path, default=Path("./state"), metavar="DIR",
                   help="the daemon's state directory (default: ./state; the package's: "
                        "/var/lib/multimodule)")
    p.set_defaults(func=_run_command)


def _count(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be 0 or more")
    return number


def _run_command(args: argparse.Namespace) -> int:
    try:
        return run(args)
    except KeyboardInterrupt:  # the end of -f
        return 0
