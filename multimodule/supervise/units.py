"""Unit names and drop-ins for external tasks (``multimodule-task@NAME.service``).

Per-task resource settings come from the task's ``limits`` table (validated with the rest of
the config as :class:`~multimodule.config.TaskLimits`) and become a drop-in for that
instance, ``/run/systemd/system/multimodule-task@NAME.service.d/50-limits.conf`` (runtime, so
it disappears with a reboot like the daemon's other runtime state); the template unit itself is
never rewritten. Names follow systemd.unit(5) and the escaping of systemd-escape(1).
"""

from __future__ import annotations

from pathlib import Path

from multimodule.config import TaskLimits

TEMPLATE = "multimodule-task@.service"
DROPIN_ROOT = Path("/run/systemd/system")
DROPIN_NAME = "50-limits.conf"


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
