"""The task API: what a task author writes against.

A task is a class named like its module (module ``Example1`` defines class ``Example1``)
deriving from :class:`Task`::

    class Example1(Task):
        is_stateful = True

        def set_config(self, config):
            self.named_recur("tick", 1.0, self.tick)

        def tick(self):
            ct = self.state.get("ct", 0)
            self.emit({"ct": ct, "outstr": self.config.get("outstr", "")})
            self.state["ct"] = ct + 1

        def message(self, message):
            if "new_ct" in message:
                self.state["ct"] = message["new_ct"]

The framework (the daemon, or the external-task process) constructs the task with no
arguments, attaches it, restores ``state``, calls :meth:`Task.set_config`, then delivers
messages in order to :meth:`Task.message`. The task never does file I/O for its state and never
touches queues directly: it uses :meth:`Task.emit` and :meth:`Task.send`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, ClassVar, Protocol

if TYPE_CHECKING:
    from pydantic import BaseModel

    from multimodule.oob import Channels

#: The queue every emitted message goes to.
ROUTER_QNAME = "Router"

Work = Callable[[], "None | Awaitable[None]"]


class TaskHost(Protocol):
    """What a task needs from the process that runs it."""

    channels: Channels

    def send(self, qname: str, message: dict[str, Any], *, owned: bool = False,
             destination: str | None = None) -> None:
        """Send ``message`` to queue ``qname`` (on host ``destination``, if another) without
        blocking the event loop (``owned``, ``destination``: see :meth:`Task.send`)."""

    async def wait_sent(self, written: Callable[[], None] | None = None) -> None:
        """Return once everything this task sent so far is safe from a kill of this process:
        written to the receiving task's journal here, or in a System V queue (seconds: as
        long as a full queue makes it wait); ``written``: see :meth:`Task.wait_sent`."""

    def sends_held(self) -> bool:
        """See :meth:`Task.sends_held`."""

    async def drain(self) -> None:
        """See :meth:`Task.drain`."""

    def recur(self, task: Task, name: str, interval: float, work: Work) -> None:
        """Schedule ``work`` every ``interval`` seconds under ``name`` for ``task``."""

    def private_path(self, suffix: str) -> Path | None:
        """See :meth:`Task.private_path`."""

    def set_stalled(self, stalled: bool) -> None:
        """See :meth:`Task.set_stalled`."""


@dataclass
class TaskCounters:
    """Per-task figures kept by the framework (counts since the task was loaded).

    ``handler_seconds``: wall time spent in :meth:`Task.message` (seconds).
    ``handler_cpu_seconds``: CPU time of the event loop's thread while the task's messages
    and scheduled work were handled (seconds; measured per batch of messages, so an async
    handler that awaits is also charged for what ran meanwhile).
    ``handler_timeouts``: calls of the handler or scheduled work interrupted at the task's
    ``handler_timeout_s`` (each also counts as a failure).
    """

    messages_in: int = 0
    messages_out: int = 0
    emitted: int = 0
    task_message_failure: int = 0
    recur_failure: int = 0
    handler_seconds: float = 0.0
    handler_cpu_seconds: float = 0.0
    slow_handlers: int = 0
    handler_timeouts: int = 0


class Task:
    """Base class of every task.

    Class attributes: ``is_stateful`` (the framework saves and restores ``self.state``),
    ``Config`` (an optional pydantic model validating the task's config table; its instance
    is ``self.settings``), ``file_only_config`` (keys of the table that only the config file
    may set, never ``mmctl config``: what names servers, files or code the task trusts, since
    any member of the transit group may send control messages).

    Instance attributes set by the framework: ``name`` (str), ``config`` (dict: the task's
    table, ``{}`` when it has none), ``settings`` (the ``Config`` instance or ``None``),
    ``state`` (dict, JSON-able), ``counters`` (:class:`TaskCounters`).
    """

    is_stateful: ClassVar[bool] = False
    Config: ClassVar[type[BaseModel] | None] = None
    file_only_config: ClassVar[frozenset[str]] = frozenset()

    name: str
    config: dict[str, Any]
    settings: BaseModel | None
    state: dict[str, Any]
    counters: TaskCounters
    _host: TaskHost

    def attach(self, name: str, host: TaskHost) -> None:
        """Called once by the framework before anything else (not by task authors)."""
        self.name = name
        self._host = host
        self.config = {}
        self.settings = None
        self.state = {}
        self.counters = TaskCounters()

    # -- what a task implements ------------------------------------------------------------

    def message(self, message: dict[str, Any]) -> None | Awaitable[None]:
        """Handle one message (a dict; the task's own copy). May be ``async def``.

        An exception is reported on the ``error`` channel with the message and counted in
        ``task_message_failure``; the next message is delivered as usual.
        """
        raise NotImplementedError(f"task {type(self).__name__} does not implement message()")

    def set_config(self, config: dict[str, Any]) -> None:
        """Called when the task's config is known and on every change (``{}`` if none).

        ``self.config`` and ``self.settings`` are already updated when this runs.
        """

    def extra_figures(self) -> dict[str, int | float]:
        """Task-specific counters for ``mmctl status`` (e.g. the Router's ``unrouted``)."""
        return {}

    def stopping(self) -> None:
        """Called once when the task is being stopped (daemon exit, unload, failsafe,
        migration), before its last messages are delivered and its state saved. A task that
        started asyncio work of its own (not through :meth:`named_recur`) stops it here."""

    def stopped(self) -> None:
        """Called once when the task has handled its last message, before its state is saved
        for the last time: release what it holds (connections, files)."""

    # -- what a task calls -----------------------------------------------------------------

    def emit(self, message: dict[str, Any]) -> None:
        """Send ``message`` to the Router, marked as coming from this task.

        Sets ``source`` to this task's name (an existing ``source`` moves to
        ``previous_source``); modifies ``message`` in place, the receiver gets its own copy.
        """
        if "source" in message:
            message["previous_source"] = message["source"]
        message["source"] = self.name
        self.counters.emitted += 1
        self.counters.messages_out += 1
        self._host.send(ROUTER_QNAME, message)

    def send(self, qname: str, message: dict[str, Any], *, owned: bool = False,
             destination: str | None = None) -> None:
        """Send ``message`` straight to queue ``qname`` (in memory when the receiver is in this
        process, else System V). Never blocks the event loop; never drops the message: if it
        cannot be sent it raises (:class:`~multimodule.errors.InvalidQueueName`,
        :class:`~multimodule.errors.InvalidDestination`,
        :class:`~multimodule.errors.UnserializableMessage`, or
        :class:`~multimodule.errors.QueueCreationRefused` when ``qname`` has no queue yet and
        the daemon's rate of new queues is spent), and the handler's failure is reported.

        ``owned=True``: the task gives ``message`` and everything in it away and never touches
        it again, so an in-memory receiver may get this very object instead of a copy. Only
        for messages made of JSON values (e.g. one the task received).

        ``destination``: another host's name: the message goes to queue ``qname`` on that
        host, through the built-in ``Bridge`` task (NATS JetStream, see ``docs/bridge.md``);
        this host's own name, or ``None``, is a local send.
        """
        if destination is None:
            self._host.send(qname, message, owned=owned)
        else:
            self._host.send(qname, message, owned=owned, destination=destination)
        self.counters.messages_out += 1

    async def wait_sent(self, written: Callable[[], None] | None = None) -> None:
        """Wait until every message this task sent so far is safe from a kill of this
        process: in the receiving task's journal (a task in this process) or in a System V
        queue. For a task that confirms to an outside system what it passed on (the Bridge
        acknowledges NATS only after this). ``written``: called once the journals are
        written, before waiting for messages held back by full queues (so everything sent
        before the first of those is safe when it runs). Returns at once without journals.
        """
        await self._host.wait_sent(written)

    def sends_held(self) -> bool:
        """Whether messages this task sent wait for room in a full queue (they are not safe
        from a kill of this process yet; :meth:`wait_sent` waits for them)."""
        return self._host.sends_held()

    async def drain(self) -> None:
        """Wait while this task is held back: a task in this process it sent to is 1,024
        messages behind (until it is back under 256), or messages it sent wait in a full
        overflow. The framework holds back handlers and timers by itself; a coroutine the task
        started on its own (a producer loop) awaits this between bursts, as a writer awaits
        asyncio's ``StreamWriter.drain()``, so that memory stays bounded. Returns at once
        when nothing holds the task back."""
        await self._host.drain()

    def set_stalled(self, stalled: bool) -> None:
        """Say that this task cannot keep up for now (``True``: its handler waits on
        something outside, such as a server that is away) or that it can again (``False``).
        While stalled and 1,024 messages behind, what tasks in this process send it goes
        through its System V queue, whose fill holds them back in turn, so memory stays
        bounded (as for a task whose own sends wait in full queues)."""
        self._host.set_stalled(stalled)

    def private_path(self, suffix: str) -> Path | None:
        """``STATE_DIR/NAME.SUFFIX``: a file of this task's own in the state directory, for
        what its checkpoint cannot hold (``None`` when the task runs without one). ``suffix``
        is letters, digits, ``-`` and ``_``; raises ``ValueError`` otherwise."""
        return self._host.private_path(suffix)

    def named_recur(self, name: str, interval: float, work: Work) -> None:
        """Run ``work`` (sync or async, no arguments) every ``interval`` seconds.

        One schedule per ``name``: calling again replaces the work and interval. The config's
        ``intervals.<name>`` overrides ``interval``. Cancelled when the task stops. An
        exception in ``work`` is reported on ``error`` and the schedule goes on.
        """
        self._host.recur(self, name, interval, work)

    def log(self, text: str, **fields: Any) -> None:
        """A record on the ``log`` channel (``fields``: structured extras)."""
        self._host.channels.emit("log", self.name, text, **fields)

    def error(self, text: str, **fields: Any) -> None:
        """A record on the ``error`` channel."""
        self._host.channels.emit("error", self.name, text, **fields)

    def alert(self, text: str, **fields: Any) -> None:
        """A record on the ``alert`` channel."""
        self._host.channels.emit("alert", self.name, text, **fields)

    def debug(self, text: str, level: int = 1, **fields: Any) -> None:
        """A record on the ``debug`` channel, shown when the debug level is ``>= level``."""
        self._host.channels.emit("debug", self.name, text, level=level, **fields)
