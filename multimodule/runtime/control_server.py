"""The daemon's side of the control queue: one handler per command, and an answer to every
request that asked for one (an error included, and "stopping" for requests still waiting when
the daemon stops).

The message schema is :mod:`multimodule.runtime.control` (shared with ``mmctl``). What the
commands act on is a :class:`Controlled`, which the daemon implements; the server knows
nothing else of it.

``status`` is answered while a task's handler holds the event loop: the loop keeps a snapshot
of the figures each time it answers one and after each monitor sample
(:meth:`ControlServer.keep_snapshot`), and once the handler watchdog says the loop is blocked
(:meth:`~multimodule.runtime.watchdog.HandlerWatchdog.blocked`, after ``--slow-handler-s``),
the control queue's receiver thread answers a plain ``status`` request itself from that
snapshot, marked with ``blocked`` (task, call, seconds held) and ``snapshot_at``. Requests it
had handed to the loop before the block was seen, and the loop had not begun, are answered so
too when the watchdog sees the block; each request gets one answer. Every other command waits
for the loop.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import traceback
from typing import Any, Awaitable, Protocol

import orjson

from multimodule.errors import BadMessage, ConfigError, Empty, MultiModuleError, TransitError
from multimodule.oob import Channels
from multimodule.runtime.control import CONTROL_KEY, ControlBody, parse_control
from multimodule.runtime.watchdog import Blocked, HandlerWatchdog

SOURCE = "MultiModule"

class Controlled(Protocol):
    """What control commands act on. A command's *outcome* is ``None`` (done), why it was
    refused (a string), or an awaitable giving one of those once the command has finished
    (a migration, a task started)."""

    def set_task_config(self, name: str, table: Any) -> str | None:
        """Replace ``name``'s config; why it was refused (``"no task ..."`` if unknown)."""

    def migrate(self, name: str, to_external: bool) -> Any:
        """Move ``name``; an outcome."""

    def failsafe_task(self, name: str, reason: str) -> Any:
        """Put ``name`` in failsafe; an outcome."""

    def unfailsafe(self, name: str) -> Any:
        """Clear ``name``'s failsafe; an outcome."""

    def reload(self) -> str | None:
        """Re-read the config file; why it was refused."""

    def request_stop(self, exit_externals: bool = False) -> None:
        """Begin an orderly exit."""

    #: ``stop(name)``, ``start(name)``, ``restart(name)`` of one task, each giving an outcome
    #: (see :class:`~multimodule.runtime.task_control.TaskControl`).
    tasks: Any

    async def query(self, what: str, name: str | None) -> dict[str, Any]:
        """The reply to a ``state``, ``config``, ``status`` or ``graph`` query."""


def _reply_to(message: Any) -> str | None:
    body = message.get(CONTROL_KEY) if isinstance(message, dict) else None
    reply_to = body.get("reply_to") if isinstance(body, dict) else None
    return reply_to if isinstance(reply_to, str) else None


#: The keys of a request the receiver's thread may answer alone: ``status`` and nothing else.
_STATUS_ONLY = frozenset({"query", "reply_to", "expires_at"})


def _plain_status_request(message: dict[str, Any]) -> bool:
    """Whether ``message`` is a valid, unexpired ``status`` query with a reply queue and
    nothing more (any thread)."""
    body = message.get(CONTROL_KEY)
    if not isinstance(body, dict) or body.get("query") != "status" or \
            not body.keys() <= _STATUS_ONLY:
        return False
    try:
        parsed = parse_control(message)
    except ConfigError:
        return False  # the loop says what is wrong with it
    return parsed.reply_to is not None and (parsed.expires_at is None
                                            or parsed.expires_at >= time.time())


class ControlServer:
    """Serves control queue ``qname`` of ``transit`` (in memory for this process, fed from its
    System V queue) for ``target``. With ``watchdog`` (the process's handler watchdog),
    ``status`` is answered while a handler blocks the loop (see the module docstring)."""

    def __init__(self, target: Controlled, *, transit: Any, qname: str, channels: Channels,
                 watchdog: HandlerWatchdog | None = None):
        self.target = target
        self.transit = transit
        self.qname = qname
        self.channels = channels
        self.watchdog = watchdog
        self.queue = None
        self.receiver = None
        self._serving: asyncio.Task | None = None
        self._current: asyncio.Task | None = None
        self._stopping = False
        self._later: set[asyncio.Task] = set()
        #: ``(time.time(), figures as JSON)`` of the last status, or ``None``.
        self._snapshot: tuple[float, bytes] | None = None
        # Plain status requests handed to the loop and not begun there (by id), and those of
        # them answered from the snapshot meanwhile; the lock makes each answer one.
        self._lock = threading.Lock()
        self._owed: dict[int, dict[str, Any]] = {}
        self._answered: dict[int, dict[str, Any]] = {}

    def start(self) -> None:
        """Take the control queue and serve it (on the loop)."""
        self.queue = self.transit.declare_local(self.qname)
        if self.watchdog is not None:
            self.watchdog.when_blocked(self.answer_owed)
        self.receiver = self.transit.receiver(
            self.qname, self.queue.put, on_error=self._on_transit_error,
            intercept=self._intercept if self.watchdog is not None else None)
        self.receiver.start()
        self._serving = asyncio.get_running_loop().create_task(self._serve(),
                                                               name="control")

    def _on_transit_error(self, exc: TransitError) -> None:
        # A malformed message on the control queue (bad bytes, a refused spill file): said,
        # never silently dropped; the next request is unaffected.
        self.channels.emit("error", SOURCE, f"control queue: {exc}")

    @property
    def idle(self) -> bool:
        """No request waiting, in hand, or waiting for its command to finish."""
        busy = self._current is not None and not self._current.done()
        return not busy and not self.queue and not self._later

    async def _serve(self) -> None:
        while not self._stopping:
            message = await self.queue.get_async()
            self._current = asyncio.get_running_loop().create_task(self.serve_one(message))
            await self._current

    async def serve_one(self, message: dict[str, Any]) -> None:
        """Carry out one control message and answer it; a command that fails is reported
        and answered with an error, never raised."""
        if not self._claim(message):
            return  # answered from the snapshot while the loop was blocked
        reply_to = _reply_to(message)
        try:
            reply = await self.handle(message)
        except Exception as exc:  # the daemon never dies of a control message
            text = f"control message failed: {type(exc).__name__}: {exc}"
            self.channels.emit("error", SOURCE, text, traceback=traceback.format_exc())
            reply = {"error": text}
        if reply is None or reply_to is None:
            return
        if isinstance(reply, dict):
            self.reply(reply_to, reply)
            return
        task = asyncio.get_running_loop().create_task(self._reply_later(reply_to, reply))
        self._later.add(task)
        task.add_done_callback(self._later.discard)

    async def _reply_later(self, reply_to: str, pending: Awaitable[str | None]) -> None:
        try:
            problem = await pending
        except asyncio.CancelledError:
            problem = "cancelled: the daemon is stopping"
        except Exception as exc:
            problem = f"{type(exc).__name__}: {exc}"
        self.reply(reply_to, {"error": problem} if problem else {"ok": True})

    async def handle(self, message: dict[str, Any]) -> dict[str, Any] | Awaitable | None:
        """The reply to ``message``: a dict, an awaitable giving the problem (or ``None``)
        once a long command is done, or ``None`` for an expired message. Raises nothing
        for bad input (the reply says what was wrong)."""
        try:
            body = parse_control(message)
        except ConfigError as exc:
            self.channels.emit("error", SOURCE, f"control message refused: {exc}",
                               message=message)
            return {"error": f"control message refused: {exc}"}
        if body.expires_at is not None and body.expires_at < time.time():
            self.channels.emit("log", SOURCE, "ignored an expired control message",
                               message=message)
            return None
        errors: list[str] = []
        waits: list[Awaitable] = []
        for handler in (self._config, self._migrate, self._failsafe, self._unfailsafe,
                        self._task_command, self._control):
            outcome = handler(body)
            if isinstance(outcome, str):
                errors.append(outcome)
            elif outcome is not None:
                waits.append(outcome)
        if errors and body.reply_to is None:
            self.channels.emit("error", SOURCE, "control message refused: " + "; ".join(errors))
        if body.query is not None:
            reply = await self.target.query(body.query, body.task)
            if body.query == "status" and "status" in reply:
                self.keep_snapshot(reply["status"])
            return reply
        if errors:
            return {"error": "; ".join(errors)}
        if waits and body.reply_to is not None:  # nobody to answer: the commands run on
            return _first_problem(waits)
        if any(item.type == "cleanly_exit" for item in body.control):
            return {"ok": True, "pid": os.getpid()}  # mmctl stop waits for it to exit
        return {"ok": True}

    # -- one handler per command -----------------------------------------------------------

    def _config(self, body: ControlBody) -> str | None:
        problems = [self.target.set_task_config(name, table)
                    for name, table in (body.config or {}).items()]
        return "; ".join(p for p in problems if p) or None

    def _migrate(self, body: ControlBody) -> Any:
        if body.migrate is None:
            return None
        return self.target.migrate(body.migrate.task, body.migrate.to == "external")

    def _failsafe(self, body: ControlBody) -> Any:
        if body.failsafe is None:
            return None
        return self.target.failsafe_task(body.failsafe, body.reason or "put in failsafe by hand")

    def _unfailsafe(self, body: ControlBody) -> Any:
        if body.unfailsafe is None:
            return None
        return self.target.unfailsafe(body.unfailsafe)

    def _task_command(self, body: ControlBody) -> Any:
        if body.task_command is None:
            return None
        return getattr(self.target.tasks, body.task_command.action)(body.task_command.task)

    def _control(self, body: ControlBody) -> str | None:
        problems = []
        for item in body.control:
            if item.type == "cleanly_exit":
                self.channels.emit("log", SOURCE, "cleanly_exit requested on the control "
                                                  "queue" + (", external tasks too"
                                                             if item.exit_externals else ""))
                self.target.request_stop(item.exit_externals)
            elif item.type == "reload":
                problem = self.target.reload()
                if problem:
                    problems.append(problem)
        return "; ".join(problems) or None

    # -- status while the loop is blocked -------------------------------------------------

    def keep_snapshot(self, status: dict[str, Any]) -> None:
        """Keep ``status`` (the figures of a status reply; on the loop) to answer from
        while the loop is blocked."""
        self._snapshot = (time.time(), orjson.dumps(status, default=str,
                                                    option=orjson.OPT_NON_STR_KEYS))

    def _intercept(self, message: dict[str, Any]) -> bool:
        # The receiver's thread: answer a plain status request here if the loop is blocked;
        # else hand it to the loop, owed until the loop begins it.
        if not _plain_status_request(message):
            return False
        with self._lock:
            blocked = self.watchdog.blocked()
            if blocked is None:
                self._owed[id(message)] = message
                return False
        self._answer_from_snapshot(message, blocked)
        return True

    def answer_owed(self, blocked: Blocked) -> None:
        """The loop is blocked (the watchdog's thread): answer from the snapshot the status
        requests handed to the loop that it has not begun."""
        with self._lock:
            owed = list(self._owed.values())
            self._answered.update(self._owed)
            self._owed.clear()
        for message in owed:
            self._answer_from_snapshot(message, blocked)

    def _claim(self, message: dict[str, Any]) -> bool:
        """On the loop, before serving ``message``: whether it is still to be answered."""
        key = id(message)
        with self._lock:
            self._owed.pop(key, None)
            return self._answered.pop(key, None) is None

    def _answer_from_snapshot(self, message: dict[str, Any], blocked: Blocked) -> None:
        held = blocked.as_dict()
        snapshot = self._snapshot
        if snapshot is None:
            reply = {"error": f"the event loop is blocked by task {blocked.task}'s "
                              f"{blocked.what} ({held['held_s']:.1f} s so far) and no figures "
                              "were kept yet; try again"}
        else:
            taken, figures = snapshot
            reply = {"query": "status", "task": None,
                     "status": {**orjson.loads(figures), "blocked": held,
                                "snapshot_at": taken}}
        self.reply(_reply_to(message), reply)

    # -- replies and stopping --------------------------------------------------------------

    def reply(self, reply_to: str, reply: dict[str, Any]) -> None:
        """Answer on ``reply_to`` only if that queue still exists (never creating or
        remembering it: a client that gave up has removed its queue). Any thread."""
        try:
            sent = self.transit.send_if_exists(reply_to, reply)
        except MultiModuleError as exc:
            self.channels.emit("error", SOURCE, f"cannot answer on {reply_to!r}: {exc}")
            sent = self.transit.send_if_exists(
                reply_to, {"error": f"the daemon could not encode its answer: {exc}"})
        if not sent:
            self.channels.emit("debug", SOURCE,
                               f"no reply sent: reply queue {reply_to!r} is gone or full")

    async def stop(self, timeout: float) -> None:
        """Stop serving; answer every request still waiting (in memory or in the System V
        queue) with an error saying the daemon is stopping (a ``cleanly_exit`` with
        ``ok``), and wait up to ``timeout`` seconds for the answers owed to commands in
        progress (those still pending then are answered "cancelled")."""
        self._stopping = True
        if self.receiver is not None:
            await self.receiver.stop()
        if self._current is not None:
            await asyncio.wait([self._current])  # the request in hand finishes
        if self._serving is not None:
            self._serving.cancel()
        waiting = self.queue.drain() if self.queue is not None else []
        self.transit.undeclare_local(self.qname)
        self.answer_waiting(waiting)
        if self._later:
            _, pending = await asyncio.wait(list(self._later), timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)

    def answer_waiting(self, waiting: list[dict[str, Any]] | None = None) -> None:
        """Answer ``waiting`` and every request in the control queue now: the daemon is
        stopping (a ``cleanly_exit`` gets ``ok``). Called by :meth:`stop`, and again at the
        very end of the stop for requests that came meanwhile."""
        waiting = list(waiting or [])
        while True:
            try:
                waiting.append(self.transit.receive(self.qname, timeout=0))
            except Empty:
                break
            except BadMessage as exc:
                self.channels.emit("error", SOURCE, f"control queue: {exc}")
            except TransitError as exc:
                self.channels.emit("error", SOURCE, f"control queue: {exc}")
                break
        for message in waiting:
            reply_to = _reply_to(message)
            if reply_to is None:
                continue
            body = message.get(CONTROL_KEY)
            control = body.get("control") if isinstance(body, dict) else None
            exits = isinstance(control, list) and any(
                isinstance(c, dict) and c.get("type") == "cleanly_exit" for c in control)
            self.reply(reply_to, {"ok": True} if exits else
                       {"error": "the daemon is stopping; the request was not carried out"})


async def _first_problem(waits: list[Awaitable]) -> str | None:
    for wait in waits:
        problem = await wait
        if problem:
            return problem
    return None
