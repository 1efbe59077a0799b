"""Failsafe: a task stopped on purpose and kept stopped until a person clears it.

A task is put in failsafe by the monitor (a metric reached its ``failsafe`` level), by its
runner (its handlers were cut off by the watchdog too often: :meth:`Failsafe.request`) or by
hand (``mmctl failsafe``). It is stopped (internal: unloaded after the message in hand, what it
holds in memory delivered, or left in its journal (without journals: sent back to its queue)
if its handlers hang, and its state saved;
external: its unit or process stopped) and marked in ``STATE_DIR/failsafe.json``. A task so marked is not loaded, not even after a daemon restart,
until ``mmctl unfailsafe NAME``; messages sent to it meanwhile wait in its System V queue. The
Router is never put in failsafe: nothing could be routed without it.

:class:`Failsafe` is handed a stop/start pair and a notify callable; it knows nothing else of
the host.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import orjson

from multimodule.errors import MultiModuleError
from multimodule.oob import Channels
from multimodule.state import read_own_file, write_atomic
from multimodule.task import ROUTER_QNAME

SOURCE = "MultiModule"

#: ``notify(kind, task, text, fields)``: an alert-channel record and a message to the Router.
Notify = Callable[[str, str, str, dict[str, Any]], None]


def printable(text: str) -> str:
    """``text`` on one line, control characters as spaces (it goes into logs)."""
    return "".join(c if c.isprintable() else " " for c in text)


class Failsafe:
    """Failsafe marks (``marks``: task -> ``{"reason", "since", "metric", "value", ...}``) and
    the stopping and starting they imply.

    ``path``: the marks file. ``stop_task(name)``: stops a running task (awaitable).
    ``start_task(name)``: starts it again as its config says; returns why it cannot, the
    asyncio task starting it (external tasks), or ``None``. ``loaded(name)``: whether
    ``name`` runs (here or in its own process); ``moving(name)``: whether it is being
    migrated (it cannot be stopped then). ``notify``: see :data:`Notify`.
    """

    def __init__(self, path: Path, *, channels: Channels, notify: Notify,
                 stop_task: Callable[[str], Awaitable[None]],
                 start_task: Callable[[str], str | asyncio.Task | None],
                 loaded: Callable[[str], bool], moving: Callable[[str], bool]):
        self.path = path
        self.channels = channels
        self.notify = notify
        self.stop_task = stop_task
        self.start_task = start_task
        self.loaded = loaded
        self.moving = moving
        self.marks: dict[str, dict[str, Any]] = {}
        self.entering: dict[str, asyncio.Task] = {}

    # -- marks -----------------------------------------------------------------------------

    def load(self) -> None:
        """Read the marks kept by an earlier run (a bad file is reported and kept aside as
        ``failsafe.json.bad``; no task is then held back)."""
        try:
            data = orjson.loads(read_own_file(self.path))  # ours only, never through a link
            if not isinstance(data, dict):
                raise ValueError("not an object")
            self.marks = {}
            for name, mark in data.items():
                if name == ROUTER_QNAME:
                    self.channels.emit("error", SOURCE, f"{self.path}: the Router is never "
                                                        "held in failsafe; ignored")
                    continue
                mark = mark if isinstance(mark, dict) else {}
                since = mark.get("since")
                mark["since"] = since if isinstance(since, (int, float)) and \
                    0 <= since < 1e11 else None
                mark["reason"] = printable(str(mark.get("reason") or "unknown"))
                self.marks[str(name)] = mark
        except FileNotFoundError:
            self.marks = {}
        except (OSError, ValueError) as exc:
            self.channels.emit("error", SOURCE, f"cannot read {self.path}: {exc}; no task is "
                                                "held in failsafe")
            self.path.replace(self.path.with_name("failsafe.json.bad"))
            self.marks = {}

    def _save(self) -> None:
        try:
            write_atomic(self.path, orjson.dumps(self.marks, option=orjson.OPT_INDENT_2))
        except OSError as exc:
            self.channels.emit("error", SOURCE, f"cannot save the failsafe marks in "
                                                f"{self.path}: {exc}; they hold until the "
                                                "daemon exits")

    def holds(self, name: str) -> bool:
        """Whether ``name`` is in failsafe or being put there."""
        return name in self.marks or name in self.entering

    def describe(self, name: str) -> str:
        """``since DATE (REASON)`` for a task in failsafe."""
        mark = self.marks.get(name, {})
        since = mark.get("since")
        when = f"since {time.ctime(since)} " if since is not None else ""
        return f"{when}({mark.get('reason')})"

    # -- entering and leaving --------------------------------------------------------------

    def begin(self, name: str, reason: str, **fields: Any) -> asyncio.Task | str:
        """Put ``name`` in failsafe. Returns the asyncio task stopping it, or why it cannot
        be done now."""
        if name in self.entering:
            return self.entering[name]
        if name == ROUTER_QNAME:
            return "the Router is never put in failsafe: nothing could be routed without it"
        if name in self.marks:
            return f"task {name} is already in failsafe"
        if self.moving(name):
            return f"task {name} is being migrated; try again when it has moved"
        if not self.loaded(name):
            return f"no task {name!r} is loaded"
        reason = printable(reason)
        self.marks[name] = {"reason": reason, "since": time.time(), **fields}
        self._save()
        self.notify("failsafe", name, f"failsafe: {reason}; stopped until "
                                      f"`mmctl unfailsafe {name}`",
                    {"level": "failsafe", "reason": reason,
                     "metric": fields.get("metric"), "value": fields.get("value")})
        task = asyncio.get_running_loop().create_task(self._stop(name), name=f"failsafe:{name}")
        self.entering[name] = task
        task.add_done_callback(lambda _: self.entering.pop(name, None))
        return task

    def request(self, name: str, reason: str, **fields: Any) -> bool:
        """:meth:`begin` for a caller that only needs to know whether ``name`` is being
        stopped now (a task whose handlers keep hanging); a refusal (the Router, a task
        being migrated) is reported on ``error``."""
        outcome = self.begin(name, reason, **fields)
        if isinstance(outcome, str):
            self.channels.emit("error", SOURCE, f"task {name}: {printable(reason)}; {outcome}",
                               task=name)
        return not isinstance(outcome, str)

    async def _stop(self, name: str) -> str | None:
        try:
            await self.stop_task(name)
        except (MultiModuleError, OSError) as exc:
            problem = f"failsafe: cannot stop task {name}: {exc}"
            self.channels.emit("error", SOURCE, problem, task=name)
            return problem
        self.channels.emit("log", SOURCE, f"task {name} stopped (failsafe)", task=name)
        return None

    def clear(self, name: str) -> str | asyncio.Task | None:
        """Clear ``name``'s mark and start it again as its config says. Returns why it was
        refused (it then stays in failsafe), the asyncio task starting it, or ``None``."""
        if name in self.entering:
            return f"task {name} is still being stopped; try again"
        if name not in self.marks:
            if not self.loaded(name):
                return f"no task {name!r} is loaded or in failsafe"
            return f"task {name} is not in failsafe"
        mark = self.marks.pop(name)
        outcome = self.start_task(name)
        if isinstance(outcome, str):
            self.marks[name] = mark  # it cannot run (its config or code changed meanwhile)
            return f"task {name} stays in failsafe: {outcome}"
        self._save()
        self.notify("failsafe", name, "failsafe cleared by hand; started again",
                    {"level": "ok", "reason": "unfailsafe", "metric": None, "value": None})
        return outcome

    async def settle(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the failsafe stops in progress (one still
        running then goes on; its mark is saved already)."""
        if self.entering:
            await asyncio.wait(list(self.entering.values()), timeout=timeout)
