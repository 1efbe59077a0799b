"""The one configuration schema: the daemon's options and the task config file.

The task config file is TOML (``.toml``) or JSON (``.json``) with one top-level table per task
name. A task's table is free-form for the task, except for the reserved keys validated here:

- ``is_external`` (bool): run the task in its own process (see the external-task issue);
- ``intervals`` (table of name to seconds): overrides ``named_recur`` intervals, and
  ``save_state`` (how often a stateful task's state is saved, default 1 s);
- ``limits`` (table): resource limits of an external task (:class:`TaskLimits`: ``memory_max``,
  ``cpu_quota``, ``tasks_max``, ``nice``, ``environment``), checked with the rest of the file;
- ``monitor`` (table of metric to ``{warn, severe, failsafe}``): this task's own thresholds
  for the resource monitor, over the defaults (``[Example1.monitor.open_fds] warn = 50``);
- ``dedupe`` (bool or a number of ids): drop a message whose id the task handled already
  (one delivered again after a crash); ``true`` remembers the last 10,000 ids, a number that
  many. The window is saved in the task's checkpoint.
- ``handler_timeout_s`` (seconds, default 10): how long one call of the task's message handler
  or of its scheduled work may hold the event loop before the handler watchdog interrupts it
  (:class:`~multimodule.errors.HandlerTimeout` raised inside it; see
  :mod:`multimodule.runtime.watchdog`); a task cut off 3 times within 10 minutes is put in
  failsafe.

A task class may declare a nested pydantic model ``Config`` for the rest of its table; a bad
value is then refused with the field's name. Every error is a :class:`ConfigError` whose text
names the file and the field (``Router.routes.0.forwards``) or the line and column.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)

from multimodule.errors import ConfigError, InvalidDestination, InvalidQueueName
from multimodule.monitor.levels import DEFAULT_THRESHOLDS, METRICS, Thresholds
from multimodule.state import read_own_file
from multimodule.transit import validate_qname
from multimodule.transit.lowlevel import validate_destination

RESERVED_KEYS = ("is_external", "intervals", "limits", "monitor", "dedupe",
                 "handler_timeout_s")

#: Default seconds between two saves of a stateful task's state.
DEFAULT_SAVE_STATE_S = 1.0

#: Default seconds one call of a task's handler may hold the event loop before it is
#: interrupted (the task's ``handler_timeout_s``).
DEFAULT_HANDLER_TIMEOUT_S = 10.0


def _field_check(check: Callable[[str], str], error: type[Exception]) -> AfterValidator:
    """A pydantic validator from a transit check: its ``error`` becomes the ``ValueError``
    pydantic reports with the field."""
    def validate(value: str) -> str:
        try:
            return check(value)
        except error as exc:
            raise ValueError(str(exc)) from exc
    return AfterValidator(validate)


#: A ``str`` field holding a queue name, validated as transit does (pydantic reports the field).
QueueName = Annotated[str, _field_check(validate_qname, InvalidQueueName)]
#: A ``str`` field naming a host (a ``destination``), validated as transit does.
HostName = Annotated[str, _field_check(validate_destination, InvalidDestination)]


def _task_name(value: str) -> str:
    if not is_task_name(value):
        raise ValueError(f"{value!r} is not a task name (a Python identifier)")
    return value


#: A ``str`` field holding a task name (a Python identifier: it names a module and a class).
TaskName = Annotated[str, AfterValidator(_task_name)]

#: An interval in seconds: finite, at least 10 ms (a smaller one would only burn CPU).
Interval = Annotated[float, Field(ge=0.01, allow_inf_nan=False)]


#: A threshold: a number >= 0 (not a string, not a bool), or ``false`` (or JSON ``null``)
#: for no such level.
Level = Annotated[
    Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True)] | None,
    BeforeValidator(lambda value: None if value is False else value),
]


class LevelOverride(BaseModel):
    """A task's thresholds for one metric; a level left out keeps the default's value,
    ``false`` removes that level."""

    model_config = ConfigDict(extra="forbid")

    warn: Level = None
    severe: Level = None
    failsafe: Level = None


#: A metric that has levels (see :mod:`multimodule.monitor.levels`).
MetricName = Literal[METRICS]


def monitor_thresholds(overrides: dict[str, LevelOverride]) -> dict[str, Thresholds]:
    """A task's ``monitor`` table as thresholds merged over the defaults. Raises
    ``ValueError`` naming the metric if the merged levels decrease."""
    out = {}
    for metric, override in overrides.items():
        base = DEFAULT_THRESHOLDS[metric]
        given = override.model_dump(exclude_unset=True)
        merged = {level: given.get(level, getattr(base, level))
                  for level in ("warn", "severe", "failsafe")}
        try:
            out[metric] = Thresholds(**merged, stops=base.stops)
        except ValueError:
            raise ValueError(f"{metric}: levels must not decrease from warn to severe to "
                             f"failsafe (with the defaults filled in: {merged})") from None
    return out


#: Size suffixes systemd accepts in ``MemoryMax=`` (systemd.resource-control(5)).
_SIZE_SUFFIXES = ("K", "M", "G", "T")


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
    """A task's ``limits`` table (``None`` or a dict) as :class:`TaskLimits`; raises
    :class:`ConfigError` naming ``source`` and the field (``T.limits.nice``)."""
    try:
        return TaskLimits.model_validate(table or {})
    except ValidationError as exc:
        raise ConfigError(f"{source}: {format_validation_error(exc, f'{task}.limits')}") from exc


class TaskSection(BaseModel):
    """The reserved keys of one task's table; other keys pass through to the task."""

    model_config = ConfigDict(extra="allow")

    is_external: StrictBool = Field(False, description="run the task in its own process")
    intervals: dict[str, Interval] = Field(
        default_factory=dict,
        description="seconds per named_recur schedule name; 'save_state' sets how often "
                    "state is saved",
    )
    limits: TaskLimits = Field(default_factory=TaskLimits,
                               description="resource limits of an external task")
    monitor: dict[MetricName, LevelOverride] = Field(
        default_factory=dict, description="this task's monitor thresholds per metric")
    dedupe: StrictBool | Annotated[int, Field(ge=1, le=10_000_000)] = Field(
        False, description="drop messages whose id was handled already: true (the last "
                           "10,000 ids) or the number of ids to remember (1 to 10,000,000)")
    handler_timeout_s: Annotated[float, Field(ge=0.01, allow_inf_nan=False, strict=True)] = \
        Field(DEFAULT_HANDLER_TIMEOUT_S,
              description="seconds one call of a handler or scheduled work may hold the "
                          "event loop before it is interrupted")

    @field_validator("monitor")
    @classmethod
    def _levels_in_order(cls, value: dict[str, LevelOverride]) -> dict[str, LevelOverride]:
        monitor_thresholds(value)
        return value


#: ``scheme://user:password@`` in a URL: what :func:`redact` hides.
_URL_PASSWORD = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@\s:]*)"
                           r"(?::[^/@\s]*)?@")
#: Keys of a config table whose values are never shown.
SECRET_KEYS = frozenset({"password", "token", "secret", "pass", "passwd"})


def redact(value: Any) -> Any:
    """``value`` (a config value or table, or a text) with secrets hidden: the password or
    token of every URL (``nats://u:pw@h`` -> ``nats://u:***@h``, ``nats://tok@h`` ->
    ``nats://***@h``) and the values of keys named like a password (:data:`SECRET_KEYS`).
    For logs, status, ``mmctl config`` and error messages."""
    if isinstance(value, str):
        return _URL_PASSWORD.sub(_hide, value) if "@" in value else value
    if isinstance(value, dict):
        return {k: "***" if isinstance(k, str) and k.lower() in SECRET_KEYS else redact(v)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value


def _hide(match: re.Match[str]) -> str:
    whole = match.group(0)
    user = match.group("user")
    if ":" in whole[len(match.group("scheme")):]:
        return f"{match.group('scheme')}{user}:***@"
    return f"{match.group('scheme')}***@"


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """One line per pydantic error: ``field.path: message (got value)``, with secrets
    hidden (see :func:`redact`)."""
    lines = []
    for err in exc.errors():
        # pydantic marks a bad dict key with a "[key]" step after it; the key names it.
        loc = ".".join(str(p) for p in (prefix, *err["loc"]) if p not in ("", "[key]"))
        got = redact(err.get("input"))
        shown = repr(got)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        lines.append(f"{loc or '(top level)'}: {redact(err['msg'])} (got {shown})")
    return "; ".join(lines)


def is_task_name(name: object) -> bool:
    """Task names are Python identifiers (they name a module and a class)."""
    return isinstance(name, str) and name.isidentifier()


def parse_config_text(text: str, source: str, fmt: str) -> dict[str, dict[str, Any]]:
    """Parse and check the structure of a config file's text.

    ``fmt``: ``"toml"`` or ``"json"``. Returns task name to table. Raises :class:`ConfigError`
    naming ``source`` and the line/column of a syntax error or the field of a bad value.
    """
    try:
        if fmt == "json":
            data = json.loads(text) if text.strip() else {}
        else:
            data = tomllib.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source}: line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    return check_config(data, source)


def check_config(data: object, source: str) -> dict[str, dict[str, Any]]:
    """Validate the structure of a parsed config: task names, tables, reserved keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a table of tasks, "
                          f"not {type(data).__name__}")
    out: dict[str, dict[str, Any]] = {}
    for name, table in data.items():
        if not is_task_name(name):
            raise ConfigError(f"{source}: {name!r} is not a valid task name "
                              "(it must be a Python identifier)")
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: {name}: a task's config must be a table, "
                              f"not {type(table).__name__}")
        try:
            TaskSection.model_validate(table)
        except ValidationError as exc:
            raise ConfigError(f"{source}: {format_validation_error(exc, name)}") from exc
        out[name] = table
    return out


def load_config_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read and check a config file (format by extension: ``.json``, else TOML).

    Raises :class:`ConfigError` if it cannot be read or does not validate.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    fmt = "json" if path.suffix.lower() == ".json" else "toml"
    return parse_config_text(text, str(path), fmt)


def validate_task_config(task_name: str, config_model: type[BaseModel] | None,
                         table: dict[str, Any], source: str = "config"
                         ) -> tuple[dict[str, Any], BaseModel | None]:
    """Validate one task's table against the task's own ``Config`` model, if it has one.

    Returns ``(config, settings)``: ``config`` is the table with the model's coerced values
    and defaults filled in and the reserved keys present in the table as validated, all plain
    JSON values (it is what ``mmctl config`` shows); ``settings`` the model instance (or
    ``None``). Without a model, ``config`` is a copy of the table. Raises
    :class:`ConfigError` naming ``source``, the task and the field.
    """
    try:
        section = TaskSection.model_validate(table)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {format_validation_error(exc, task_name)}") from exc
    if config_model is None:
        return dict(table), None
    own = {k: v for k, v in table.items() if k not in RESERVED_KEYS}
    try:
        settings = config_model.model_validate(own)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {format_validation_error(exc, task_name)}") from exc
    config = dict(table)
    config.update(settings.model_dump(mode="json", exclude_unset=False))
    # The reserved keys as given (exclude_unset: no defaults added), in JSON form.
    config.update(section.model_dump(mode="json", include=set(RESERVED_KEYS),
                                     exclude_unset=True))
    return config, settings


class DaemonOptions(BaseModel):
    """Options of the ``multimodule`` daemon; the command line is built from these fields
    (``multimodule.cli.daemon``), so help texts and validation live here only."""

    model_config = ConfigDict(extra="forbid")

    control_queue: QueueName = Field("MultiModule_control",
                               description="queue on which the daemon takes control messages")
    prefixes: list[str] = Field(
        default_factory=lambda: [""],
        description="comma-separated module prefixes tried for task NAME (module "
                    "PREFIX+NAME, class NAME), after the built-in multimodule.tasks.",
    )
    config_file: Path | None = Field(None, description="task config file (.toml or .json); "
                                                       "re-read when it changes and on SIGHUP")
    state_dir: Path = Field(Path("./state"), description="directory for state, status and "
                                                         "lock files")
    debug: int = Field(0, ge=0, description="debug level: debug records up to this level "
                                            "are written")
    module: TaskName | None = Field(None, description="run only this one task in this process "
                                                 "(its own state and lock; emits go to the "
                                                 "Router's System V queue)")
    oob: str = Field("", description="out-of-band channels log, error, alert, debug, each "
                                     "to 1 (stdout), 2 (stderr), journal, a file (a path "
                                     "with a /), router, or any other word: a queue name; "
                                     "e.g. log:1,error:2,alert:journal,debug:./debug.out")
    transit_dir: Path | None = Field(None, description="transit directory (default: "
                                                       "$MULTIMODULE_TRANSIT_DIR or the "
                                                       "system default)")
    task_path: list[Path] = Field(default_factory=list,
                                  description="directory added to sys.path to find task "
                                              "modules (repeatable)")
    slow_handler_s: float = Field(0.5, gt=0, description="seconds one call of a message "
                                                         "handler or scheduled work may hold "
                                                         "the event loop before a warning "
                                                         "(while it runs, with its stack; "
                                                         "each task's handler_timeout_s "
                                                         "interrupts it)")
    monitor_interval_s: float = Field(5.0, ge=0.05, le=3600, allow_inf_nan=False,
                                      description="seconds between two samples of the "
                                                  "resource monitor")
    monitor_window_s: float = Field(60.0, ge=0.1, le=86400, allow_inf_nan=False,
                                    description="seconds of the monitor's short window "
                                                "(levels; the long window is 5 times this)")
    metrics_listen: str | None = Field(None, description="serve the monitor's figures for "
                                                         "Prometheus on ADDR:PORT (off by "
                                                         "default)")
    queue_creation_rate: float = Field(
        50.0, gt=0, allow_inf_nan=False,
        description="new System V queues the daemon's sends may create per second; a send "
                    "that would create one over this is refused and reported to its task")
    queue_creation_burst: int = Field(100, ge=1, description="new System V queues the "
                                                             "daemon's sends may create at "
                                                             "once, before the rate applies")
    journal: bool = Field(True, description="journal each task's input before it is handled "
                                            "and checkpoint it with the task's state, so a "
                                            "kill loses no message (--no-journal: off)")
    journal_fsync: bool = Field(False, description="also fsync the journal at every write "
                                                   "(survives power loss; costs throughput)")
    outbox_max_bytes: int = Field(
        16 * 1024 * 1024, ge=4096,
        description="bytes of messages held for full System V queues before the tasks that "
                    "sent them are paused (backpressure; at least 4096)")
    task_backend: Literal["auto", "systemd", "detached"] = Field(
        "auto", description="how external tasks run: systemd units "
                            "(multimodule-task@NAME.service), detached processes, or auto "
                            "(systemd when the daemon is a systemd service)")

    @field_validator("prefixes", mode="before")
    @classmethod
    def _split_prefixes(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [p.strip() for p in value.split(",")]
        return value


    @model_validator(mode="after")
    def _window_holds_samples(self) -> DaemonOptions:
        if self.monitor_window_s < 2 * self.monitor_interval_s:
            raise ValueError(
                f"monitor_window_s ({self.monitor_window_s:g}) must be at least twice "
                f"monitor_interval_s ({self.monitor_interval_s:g}): a rate needs two samples "
                "in the window")
        return self

    @field_validator("metrics_listen")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is None:
            return None
        split_address(value)
        return value


def split_address(value: str) -> tuple[str, int]:
    """``ADDR:PORT`` (``[::1]:9100`` for IPv6) as ``(addr, port)``; raises ``ValueError``."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not ADDR:PORT (e.g. 127.0.0.1:9100)")
    return host.strip("[]") or "0.0.0.0", int(port)


#: Options the process of an external task takes from its daemon unless its own command line
#: sets them: its unit's ``ExecStart=`` does not carry them. (``control_queue``: where it asks
#: its daemon to put its task in failsafe when its handlers keep being cut off.)
INHERITED_OPTIONS = ("oob", "debug", "monitor_interval_s", "monitor_window_s",
                     "slow_handler_s", "journal", "journal_fsync", "outbox_max_bytes",
                     "control_queue")


def options_path(state_dir: Path) -> Path:
    """Where the daemon publishes :data:`INHERITED_OPTIONS` for its external tasks."""
    return Path(state_dir) / "daemon-options.json"


def published_options(options: DaemonOptions, oob: str, sinks: str = "") -> bytes:
    """What the daemon publishes at :func:`options_path` for its external tasks: its
    :data:`INHERITED_OPTIONS` as a JSON object, with ``oob`` (its ``-o`` spec with file
    paths made absolute) for ``options.oob``, and ``sinks``: where each of its channels goes
    in fact, its defaults included (``mmctl logs`` reads there)."""
    return json.dumps({**{name: getattr(options, name) for name in INHERITED_OPTIONS},
                       "oob": oob, "sinks": sinks}).encode()


def inherit_options(options: DaemonOptions) -> DaemonOptions:
    """For ``multimodule -m TASK``: ``options`` with the daemon's published values of the
    :data:`INHERITED_OPTIONS` it was not given. Unchanged if nothing is published; raises
    :class:`ConfigError` if what is published does not validate."""
    if options.module is None:
        return options
    try:
        # A regular file of this user's only, never through a link: what it names (the oob
        # files, the control queue) the task's process would write to.
        published = json.loads(read_own_file(options_path(options.state_dir)))
    except FileNotFoundError:
        return options
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{options_path(options.state_dir)}: {exc}") from exc
    if not isinstance(published, dict):
        raise ConfigError(f"{options_path(options.state_dir)}: not an object")
    merged = options.model_dump()
    merged.update({name: published[name] for name in INHERITED_OPTIONS
                   if name in published and name not in options.model_fields_set})
    try:
        return DaemonOptions.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(f"{options_path(options.state_dir)}: "
                          f"{format_validation_error(exc)}") from exc
