"""``multimodule``: the control daemon's command line (options as in the original
App::MultiModule, with long forms; help texts come from :class:`DaemonOptions`)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Sequence

from pydantic import ValidationError

from multimodule.config import DaemonOptions, inherit_options
from multimodule.errors import ConfigError
from multimodule.oob import parse_spec

#: field name -> flags; the order is the order in --help.
FLAGS = {
    "control_queue": ("-q", "--control-queue"),
    "prefixes": ("-p", "--prefixes"),
    "config_file": ("-c", "--config"),
    "state_dir": ("-s", "--state-dir"),
    "debug": ("-d", "--debug"),
    "module": ("-m", "--module"),
    "oob": ("-o", "--oob"),
    "transit_dir": ("-T", "--transit-dir"),
    "task_path": ("--task-path",),
    "slow_handler_s": ("--slow-handler-s",),
    "task_backend": ("--task-backend",),
    "monitor_interval_s": ("--monitor-interval",),
    "monitor_window_s": ("--monitor-window",),
    "metrics_listen": ("--metrics-listen",),
    "queue_creation_rate": ("--queue-creation-rate",),
    "queue_creation_burst": ("--queue-creation-burst",),
    "journal": ("--journal",),
    "journal_fsync": ("--journal-fsync",),
    "outbox_max_bytes": ("--outbox-max-bytes",),
}

_METAVARS = {"prefixes": "P1,P2", "config_file": "FILE", "state_dir": "DIR", "debug": "N",
             "module": "TASK", "oob": "SPEC", "transit_dir": "DIR", "task_path": "DIR",
             "slow_handler_s": "S", "control_queue": "QNAME",
             "task_backend": "{auto,systemd,detached}", "monitor_interval_s": "S",
             "monitor_window_s": "S", "metrics_listen": "ADDR:PORT",
             "queue_creation_rate": "N", "queue_creation_burst": "N",
             "outbox_max_bytes": "BYTES"}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, generated from :class:`DaemonOptions`."""
    parser = argparse.ArgumentParser(
        prog="multimodule",
        description="Run multimodule tasks under one control daemon.",
        epilog="Stop with SIGTERM/SIGINT (state is saved); reload the config with SIGHUP.",
    )
    for field, flags in FLAGS.items():
        info = DaemonOptions.model_fields[field]
        default = info.get_default(call_default_factory=True)
        shown = ",".join(default) if isinstance(default, list) else str(default)
        help_text = info.description
        if default not in (None, [], ""):
            help_text += f" (default: {shown!r})"
        kwargs = {"dest": field, "help": help_text, "default": argparse.SUPPRESS}
        if info.annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = _METAVARS[field]
        if field == "task_path":
            kwargs["action"] = "append"
        parser.add_argument(*flags, **kwargs)
    return parser


def _flag_error(err: dict) -> str:
    if not err["loc"]:  # a check across options: its message names them
        return err["msg"].removeprefix("Value error, ").replace(
            "monitor_window_s", "--monitor-window").replace(
            "monitor_interval_s", "--monitor-interval")
    flag = "/".join(FLAGS.get(str(err["loc"][0]), (str(err["loc"][0]),)))
    return f"{flag}: {err['msg']} (got {err.get('input')!r})"


def parse_options(argv: Sequence[str] | None = None) -> DaemonOptions:
    """Parse the command line into validated :class:`DaemonOptions`; exit 2 on bad input."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    try:
        options = DaemonOptions.model_validate(args)
        parse_spec(options.oob)
    except ValidationError as exc:
        # Name the flag the user typed, not the schema's field.
        parser.error("; ".join(_flag_error(err) for err in exc.errors()))
    except ConfigError as exc:
        parser.error(str(exc))
    return options


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``multimodule`` command; returns the exit status."""
    options = parse_options(argv)
    from multimodule.runtime.daemon import Daemon
    from multimodule.runtime.task_process import TaskProcessHost

    try:
        options = inherit_options(options)
        host = TaskProcessHost(options) if options.module else Daemon(options)
        return asyncio.run(host.run())
    except ConfigError as exc:
        print(f"multimodule: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
