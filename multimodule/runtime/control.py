"""The control message schema, shared by the daemon (server side) and ``mmctl`` (client side).

A control message is ``{".multimodule": BODY}`` sent to the daemon's control queue. BODY keeps
the original App::MultiModule's shapes and adds a few keys of ours::

    config:     {TASK: {...}, ...}         replace those tasks' config
    control:    [{type: "cleanly_exit", exit_externals: 0|1}, {type: "reload"}]
    query:      "state" | "config" | "status" | "graph"  (with task: TASK for state and
                                           config; "graph": the tasks, the Router's routes
                                           and their rates, for mmctl graph)
    migrate:    {task: TASK, to: "external"|"internal"}  move a task (mmctl migrate)
    failsafe:   TASK (with reason: "...")  stop TASK and keep it stopped (mmctl failsafe)
    unfailsafe: TASK                       clear the mark and start it again
    task_command: {task: TASK, action: "stop"|"start"|"restart"}  one task (mmctl stop,
                                           start, restart TASK)
    reply_to:   QNAME                      where the answer goes (``{"ok": true}`` or
                                           ``{"error": "..."}`` for config/control; the
                                           figures for a query)
    expires_at: seconds since the epoch    after this the daemon ignores the message (so a
                                           command given while no daemon ran does not fire
                                           when one starts later)
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from multimodule.config import QueueName, TaskName, format_validation_error
from multimodule.errors import ConfigError

CONTROL_KEY = ".multimodule"


class ControlItem(BaseModel):
    """One entry of ``control``."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["cleanly_exit", "reload"]
    exit_externals: bool = False


class Migrate(BaseModel):
    """``migrate``: move ``task`` to its own process (``to = "external"``) or into the
    daemon (``"internal"``)."""

    model_config = ConfigDict(extra="forbid")
    task: TaskName
    to: Literal["external", "internal"]


class TaskCommand(BaseModel):
    """``task_command``: stop, start, or restart (its module imported afresh) one task."""

    model_config = ConfigDict(extra="forbid")
    task: TaskName
    action: Literal["stop", "start", "restart"]


class ControlBody(BaseModel):
    """The object under ``.multimodule`` in a control message."""

    model_config = ConfigDict(extra="forbid")
    config: dict[TaskName, dict[str, Any]] | None = None
    control: list[ControlItem] = Field(default_factory=list)
    migrate: Migrate | None = None
    query: Literal["state", "config", "status", "graph"] | None = None
    task: TaskName | None = None
    failsafe: TaskName | None = None
    unfailsafe: TaskName | None = None
    task_command: TaskCommand | None = None
    reason: str | None = Field(None, max_length=1000)
    reply_to: QueueName | None = None
    expires_at: float | None = None



def parse_control(message: dict[str, Any]) -> ControlBody:
    """Validate a control message; raises :class:`ConfigError` naming the bad field."""
    body = message.get(CONTROL_KEY)
    if not isinstance(body, dict):
        raise ConfigError(f"a control message needs a {CONTROL_KEY!r} object")
    if not body:
        raise ConfigError(f"the {CONTROL_KEY!r} object is empty: nothing to do")
    try:
        parsed = ControlBody.model_validate(body)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, CONTROL_KEY)) from exc
    if parsed.query in ("state", "config") and parsed.task is None:
        raise ConfigError(f"query {parsed.query!r} needs a task")
    return parsed
