"""Unit names and drop-ins for external tasks (``multimodule-task@NAME.service``).

Per-task resource settings come from the task's ``limits`` table and become a drop-in for that
instance, ``/run/systemd/system/multimodule-task@NAME.service.d/50-limits.conf`` (runtime, so
it disappears with a reboot like the daemon's other runtime state); the template unit itself is
never rewritten. Names follow systemd.unit(5) and the escaping of systemd-escape(1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from multimodule.config import format_validation_error
from multimodule.errors import ConfigError

TEMPLATE = "multimodule-task@.service"
DROPIN_ROOT = Path("/run/systemd/system")
DROPIN_NAME = "50-limits.conf"

_SIZE_SUFFIXES = ("K", "M", "G", "T")


def escape_instance(name: str) -> str:
    """``systemd-escape`` of ``name`` for use as a unit instance (systemd-escape(1)).

    Keeps ASCII letters, digits, ``:``, ``_`` and ``.`` (not leading); ``/`` becomes ``-``;
    every other byte of the UTF-8 encoding becomes ``\\xNN``.
    """
    out = []
    for i, byte in enumerate(name.encode("utf-8")):
        ch = chr(byte)
        if ch == "/":
            out.append("-")
        elif (ch.isascii() and (ch.isalnum() or ch in ":_.")) and not (ch == "." and i == 0):
            out.append(ch)
        else:
            out.append(f"\\x{byte:02x}")
    return "".join(out)


def unit_name(task: str) -> str:
    """The unit of external task ``task``: ``multimodule-task@<escaped task>.service``."""
    return f"multimodule-task@{escape_instance(task)}.service"


class TaskLimits(BaseModel):
    """The ``limits`` table of a task, as systemd resource-control settings
    (systemd.resource-control(5), systemd.exec(5)).

    ``memory_max``: bytes (int) or a systemd size (``"512M"``, ``"infinity"``);
    ``cpu_quota``: share of one CPU (``0.5`` = 50%, ``2`` = two CPUs) or ``"50%"``;
    ``tasks_max``: processes and threads; ``nice``: -20..19; ``environment``: variables.
    """

    model_config = ConfigDict(extra="forbid")

    memory_max: int | str | None = Field(None, description="MemoryMax=, bytes or a size")
    cpu_quota: float | str | None = Field(None, description="CPUQuota=, share of one CPU")
    tasks_max: int | None = Field(None, ge=1, description="TasksMax=")
    nice: int | None = Field(None, ge=-20, le=19, description="Nice=")
    environment: dict[str, str] = Field(default_factory=dict, description="Environment=")

    @field_validator("memory_max")
    @classmethod
    def _size(cls, value: int | str | None) -> int | str | None:
        if value is None or isinstance(value, int):
            if isinstance(value, int) and value <= 0:
                raise ValueError("must be a positive number of bytes")
            return value
        text = value.strip()
        digits = text[:-1] if text[-1:].upper() in _SIZE_SUFFIXES else text
        if text != "infinity" and not (digits.replace(".", "", 1).isdigit()
                                       or (text.endswith("%") and text[:-1].isdigit())):
            raise ValueError(f"{value!r} is not a size (bytes, or like 512M, 2G, 10%, "
                             "infinity)")
        return text

    @field_validator("cpu_quota")
    @classmethod
    def _quota(cls, value: float | str | None) -> float | str | None:
        if isinstance(value, str):
            if not (value.endswith("%") and value[:-1].isdigit() and int(value[:-1]) > 0):
                raise ValueError(f"{value!r} is not a percentage like 50%")
        elif value is not None and not value > 0:
            raise ValueError("must be a positive share of one CPU")
        return value

    @field_validator("environment")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not key or not (key[0].isalpha() or key[0] == "_") or not all(
                    c.isalnum() or c == "_" for c in key) or not key.isascii():
                raise ValueError(f"{key!r} is not an environment variable name")
        return value


def parse_limits(task: str, table: Any, source: str = "config") -> TaskLimits:
    """Validate a task's ``limits``; raises :class:`ConfigError` naming the field."""
    try:
        return TaskLimits.model_validate(table or {})
    except ValidationError as exc:
        raise ConfigError(f"{source}: {format_validation_error(exc, f'{task}.limits')}") from exc


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%") + '"'


def render_dropin(task: str, limits: TaskLimits) -> str:
    """The text of the drop-in carrying ``limits`` for ``task``'s unit."""
    lines = [f"# Written by the multimodule daemon from the limits of task {task}; "
             "do not edit.", "[Service]"]
    if limits.memory_max is not None:
        lines.append(f"MemoryMax={limits.memory_max}")
    if limits.cpu_quota is not None:
        quota = limits.cpu_quota if isinstance(limits.cpu_quota, str) \
            else f"{round(limits.cpu_quota * 100)}%"
        lines.append(f"CPUQuota={quota}")
    if limits.tasks_max is not None:
        lines.append(f"TasksMax={limits.tasks_max}")
    if limits.nice is not None:
        lines.append(f"Nice={limits.nice}")
    for key, value in sorted(limits.environment.items()):
        lines.append(f"Environment={_quote(f'{key}={value}')}")
    return "\n".join(lines) + "\n"


def dropin_path(task: str, root: Path = DROPIN_ROOT) -> Path:
    """Where the limits drop-in of ``task`` goes."""
    return root / f"{unit_name(task)}.d" / DROPIN_NAME


def resource_properties(limits: TaskLimits) -> list[str]:
    """The resource-control settings of ``limits`` as ``systemctl set-property`` arguments
    (``MemoryMax=``, ``CPUQuota=``, ``TasksMax=``); ``nice`` and ``environment`` are not
    unit properties that can be set this way (the task's process applies them)."""
    lines = render_dropin("-", limits).splitlines()[2:]
    return [line for line in lines if line.split("=", 1)[0] in ("MemoryMax", "CPUQuota",
                                                                 "TasksMax")]
