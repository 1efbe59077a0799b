"""``mmctl``: the operator's command-line tool.

Exit status (as ``systemctl``): 0 on success; 1 when the operation failed or timed out (e.g.
``recv`` got fewer messages than asked for); 2 for bad usage or bad input (bad JSON, a bad
queue name); 3 when the daemon did not answer (not running); 4 for no such task.
``strans``, ``rtrans`` and ``qtrans`` are ``mmctl send``, ``mmctl recv`` and ``mmctl queues`` for
users of Perl's IPC::Transit.
"""

from __future__ import annotations

import argparse
import math
import os
import secrets
import select
import sys
import time
from typing import Any, Sequence

import orjson

from multimodule.cli import graph
from multimodule.errors import (
    BadMessage,
    CommandError,
    Empty,
    MultiModuleError,
    QueueFull,
    UsageError,
)
from multimodule.cli import logs
from multimodule.transit import Transit, default_transit_dir
from multimodule.transit.lowlevel import ENV_TRANSIT_DIR, SYSTEM_TRANSIT_DIR, decode_body

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3
EXIT_NO_SUCH_TASK = 4

DEFAULT_CONTROL_QUEUE = "MultiModule_control"
CONTROL_KEY = ".multimodule"


def _transit_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-T", "--transit-dir", metavar="DIR", default=argparse.SUPPRESS,
        help="transit directory shared by the processes that talk (default: "
             "$MULTIMODULE_TRANSIT_DIR, else $RUNTIME_DIRECTORY/transit in a unit with "
             "RuntimeDirectory=, /run/multimodule/transit as root, under systemd or for the "
             "members of its group, else $XDG_RUNTIME_DIR/multimodule/transit, or "
             "/tmp/multimodule-UID/transit)",
    )
    common.add_argument(
        "-q", "--control-queue", metavar="QNAME", default=argparse.SUPPRESS,
        help=f"the daemon's control queue (default: {DEFAULT_CONTROL_QUEUE})",
    )
    return common


def _open_transit(args: argparse.Namespace) -> Transit:
    given = getattr(args, "transit_dir", None)
    if given is None and not os.environ.get(ENV_TRANSIT_DIR):
        chosen = default_transit_dir()
        system = SYSTEM_TRANSIT_DIR
        if chosen != system and system.parent.exists() and not getattr(args, "warned", False):
            # The packaged service runs here, but this user may not reach its queues.
            args.warned = True
            print(f"{args.prog}: {system} (the system daemon's) is not accessible to you: "
                  f"members of its group may use it; using {chosen}", file=sys.stderr)
    return Transit(given)


def _parse_object(text: str, origin: str) -> dict[str, Any]:
    # Read as a receiver reads a message: a JSON object, integers within 64 bits (a larger one
    # would silently become a float), no NaN.
    try:
        return decode_body(text.encode("utf-8", "surrogatepass"), what=origin)
    except BadMessage as exc:
        raise CommandError(exc.reason.replace(" is JSON ", " must be a JSON object ({...}), "
                                              "not a JSON ").replace(", not an object", ""),
                           EXIT_USAGE) from None


def _print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")
    sys.stdout.flush()


def cmd_send(args: argparse.Namespace) -> int:
    """``mmctl send QNAME [JSON] [--to HOST]``: send one message (JSON object from the argument
    or stdin), to another host's queue with ``--to``."""
    if args.json is not None:
        message = _parse_object(args.json, "the message argument")
    else:
        message = _parse_object(sys.stdin.read(), "the message on standard input")
    _open_transit(args).send(args.qname, message, timeout=args.timeout, destination=args.to)
    return EXIT_OK


def cmd_recv(args: argparse.Namespace) -> int:
    """``mmctl recv QNAME``: print received messages as pretty JSON, one object each."""
    transit = _open_transit(args)
    got = 0
    while got < args.count:
        try:
            message = transit.receive(args.qname, timeout=args.timeout)
        except Empty:
            raise CommandError(
                f"timed out after {args.timeout} s on queue {args.qname!r} "
                f"({got} of {args.count} messages received)"
            ) from None
        except BadMessage as exc:
            print(f"{args.prog}: discarded a malformed message: {exc.reason} "
                  f"(raw {exc.raw!r})", file=sys.stderr)
            continue
        _print_json(message)
        got += 1
    return EXIT_OK


def cmd_queues(args: argparse.Namespace) -> int:
    """``mmctl queues``: list the queues of the transit directory with their fill."""
    transit = _open_transit(args)
    rows = [
        {
            "name": s.name,
            "messages": s.messages,
            "bytes": s.bytes,
            "max_bytes": s.max_bytes,
            "fill_percent": round(100.0 * s.fill, 1) if s.fill is not None else None,
            "key": s.key,
            "id": s.id,
        }
        for s in transit.queues()
    ]
    if args.json:
        _print_json(rows)
        return EXIT_OK
    headers = ("NAME", "MESSAGES", "BYTES", "MAX BYTES", "FULL")
    table = [
        (r["name"], str(r["messages"]), str(r["bytes"]), str(r["max_bytes"]),
         f"{r['fill_percent']:.1f}%" if r["fill_percent"] is not None else "-")
        for r in rows
    ]
    for line in _columns(headers, table)[1 if args.no_legend else 0:]:
        print(line)
    if not args.no_legend:
        print(f"\n{len(rows)} queues listed in {transit.path}.")
    return EXIT_OK


def _columns(headers: Sequence[str], rows: list[Sequence[str]]) -> list[str]:
    """The header line and one line per row, each column as wide as its widest cell."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    return ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
            for line in (headers, *rows)]


def _control_queue(args: argparse.Namespace) -> str:
    return getattr(args, "control_queue", DEFAULT_CONTROL_QUEUE)


def _ask(args: argparse.Namespace, body: dict[str, Any]) -> dict[str, Any]:
    """Send ``body`` to the daemon's control queue and wait for its answer, which comes on a
    private reply queue. The message expires when we stop waiting, so a daemon started later
    does not act on it. Raises :class:`CommandError` (status 3) if nobody answers."""
    transit = _open_transit(args)
    reply_to = f"mmctl-reply-{os.getpid()}-{secrets.token_hex(4)}"
    body = {**body, "reply_to": reply_to, "expires_at": time.time() + args.wait}
    try:
        transit.sysv_queue(reply_to)  # exists before the daemon answers
        try:
            transit.send(_control_queue(args), {CONTROL_KEY: body}, timeout=args.wait)
            reply = transit.receive(reply_to, timeout=args.wait)
        except (Empty, QueueFull):
            raise CommandError(
                f"the daemon did not answer on {_control_queue(args)!r} within {args.wait} s "
                "(is it running, with the same transit directory?)", EXIT_NOT_RUNNING,
            ) from None
    finally:
        transit.remove(reply_to)
    if "error" in reply:
        status = EXIT_NO_SUCH_TASK if reply["error"].startswith("no task") else EXIT_FAILED
        raise CommandError(reply["error"], status)
    return reply


def _task_name(value: str) -> str:
    # Imported here: the config schema (pydantic) is needed by commands naming a task only,
    # not by send, recv and queues, which start twice as fast without it.
    from multimodule.config import is_task_name

    if not is_task_name(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a task name (a Python identifier)")
    return value


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be a finite number >= 0")
    return seconds


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} must be at least 1")
    return number


def cmd_config(args: argparse.Namespace) -> int:
    """``mmctl config TASK [JSON]``: replace a task's config, or print it."""
    if args.json is None:
        _print_json(_ask(args, {"query": "config", "task": args.task})["config"])
        return EXIT_OK
    table = _parse_object(args.json, "the config argument")
    _ask(args, {"config": {args.task: table}})
    return EXIT_OK


def cmd_state(args: argparse.Namespace) -> int:
    """``mmctl state TASK [--set JSON]``: print a task's state, or set keys in it."""
    keys = _parse_object(args.set, "--set") if args.set is not None else None
    reply = _ask(args, {"query": "state", "task": args.task})
    if not reply.get("stateful"):
        raise CommandError(f"task {args.task} is not stateful")
    if keys is None:
        if reply.get("saved"):
            where = "is in failsafe" if reply.get("where") == "failsafe" \
                else "runs in its own process"
            print(f"{args.prog}: task {args.task} {where}; this is its state as last saved",
                  file=sys.stderr)
        _print_json(reply["state"])
    else:
        # The original's shape: a transform message on the task's own queue, delivered in
        # order with the task's other messages.
        _open_transit(args).send(args.task, {CONTROL_KEY: {"transform": keys}},
                                 timeout=args.wait)
    return EXIT_OK


def cmd_migrate(args: argparse.Namespace) -> int:
    """``mmctl migrate TASK --external|--internal``: move a task, keeping state and messages."""
    _ask(args, {"migrate": {"task": args.task,
                            "to": "external" if args.external else "internal"}})
    return EXIT_OK


def cmd_stop(args: argparse.Namespace) -> int:
    """``mmctl stop [TASK] [--externals] [--no-block]``: stop one task and keep it stopped,
    or ask the daemon to exit cleanly (state saved) and wait until it has exited."""
    if args.task is not None:
        return cmd_task_command(args, "stop")
    reply = _ask(args, {"control": [{"type": "cleanly_exit",
                                     "exit_externals": 1 if args.externals else 0}]})
    pid = reply.get("pid")
    if args.no_block or not isinstance(pid, int):
        return EXIT_OK
    try:
        pidfd = os.pidfd_open(pid)  # readable once the process has exited
    except ProcessLookupError:
        return EXIT_OK  # gone already
    try:
        if not select.select([pidfd], [], [], args.stop_timeout)[0]:
            raise CommandError(f"the daemon (pid {pid}) has not exited after "
                               f"{args.stop_timeout:g} s")
    finally:
        os.close(pidfd)
    return EXIT_OK


def cmd_task_command(args: argparse.Namespace, action: str | None = None) -> int:
    """``mmctl start|restart TASK`` (and ``stop TASK``): one task, the others untouched;
    returns once it is done."""
    _ask(args, {"task_command": {"task": args.task, "action": action or args.command}})
    return EXIT_OK


def cmd_reload(args: argparse.Namespace) -> int:
    """``mmctl reload``: make the daemon re-read its config file (as SIGHUP does)."""
    _ask(args, {"control": [{"type": "reload"}]})
    return EXIT_OK


def _size(value: Any) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return str(value)


def _num(value: Any, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


STATUS_HEADERS = ("TASK", "KIND", "PID/UNIT", "STATE", "LEVEL", "IN/S", "OUT/S", "CPU%",
                  "MEMORY", "FDS", "QUEUE", "RESTARTS", "LAST ERROR")


def status_table(status: dict[str, Any]) -> list[str]:
    """The lines ``mmctl status`` and ``mmctl top`` print for a status reply."""
    monitor = status.get("monitor", {})
    lines = [f"multimodule daemon, pid {status['pid']}; {len(status['rows'])} tasks; figures "
             f"over {monitor.get('window_s', '?')} s, sampled every "
             f"{monitor.get('interval_s', '?')} s"]
    blocked = status.get("blocked")
    if blocked:  # answered by the daemon's control thread: its loop is held by a handler
        age = max(0.0, time.time() - status.get("snapshot_at", time.time()))
        lines.append(f"EVENT LOOP BLOCKED: task {blocked['task']}'s {blocked['what']} has "
                     f"held it for {blocked['held_s']:.1f} s; figures below are from "
                     f"{age:.1f} s ago")
    rows = []
    for r in status["rows"]:
        where = r["where"] if r["kind"] == "external" and r["where"].endswith(".service") \
            else (str(r["pid"]) if r["pid"] else "-")
        fill = r.get("queue_fill")
        error = (r.get("last_error") or "-").splitlines()[0] if r.get("last_error") else "-"
        rows.append((r["name"], r["kind"], where, r["state"], r["level"],
                     _num(r["messages_in_per_s"]), _num(r["messages_out_per_s"]),
                     _num(r["cpu_percent"]), _size(r["memory_bytes"]),
                     _num(r["open_fds"], "{}"),
                     "-" if fill is None else f"{100 * fill:.0f}%",
                     _num(r["restarts"], "{}"), error[:60]))
    lines += _columns(STATUS_HEADERS, rows)
    for r in status["rows"]:
        # A Bridge's own figures: its counters now if it runs here, else the last sample's.
        figures = status.get("tasks", {}).get(r["name"]) or r
        if "bridge_connected" in figures:
            connected = "connected" if figures["bridge_connected"] else "NOT CONNECTED"
            lines.append(
                f"bridge {r['name']}: {connected}; published {figures['bridge_published']}, "
                f"delivered {figures['bridge_delivered']}, lag {figures['bridge_lag']}, pending acks "
                f"{figures['bridge_pending_acks']}, reconnects {figures['bridge_reconnects']}, "
                f"redeliveries dropped {figures['bridge_redeliveries_dropped']}, refused "
                f"{figures['bridge_refused']}, publish retries "
                f"{figures['bridge_publish_retries']}, deliveries missed "
                f"{figures.get('bridge_deliveries_missed', 0)}")
    for q in status.get("queues", []):
        if q["level"] != "ok":
            lines.append(f"queue {q['name']}: {100 * (q['queue_fill'] or 0):.0f}% full "
                         f"({q['level']})")
    if status.get("oob_dropped"):
        lines.append(f"{status['oob_dropped']} out-of-band records dropped (slow sinks)")
    return lines


def cmd_status(args: argparse.Namespace) -> int:
    """``mmctl status``: one row per task with its figures (``--json``: everything)."""
    status = _ask(args, {"query": "status"})["status"]
    if args.json:
        _print_json(status)
        return EXIT_OK
    print("\n".join(status_table(status)))
    return EXIT_OK


def cmd_top(args: argparse.Namespace) -> int:
    """``mmctl top``: the status table, refreshed every ``--interval`` seconds."""
    shown = 0
    clear = sys.stdout.isatty()
    while args.iterations is None or shown < args.iterations:
        if shown:
            time.sleep(args.interval)
        status = _ask(args, {"query": "status"})["status"]
        if clear:
            sys.stdout.write("\x1b[H\x1b[2J")
        sys.stdout.write(time.strftime("%H:%M:%S ") + "\n".join(status_table(status)) + "\n")
        if not clear:
            sys.stdout.write("\n")
        sys.stdout.flush()
        shown += 1
    return EXIT_OK


def cmd_failsafe(args: argparse.Namespace) -> int:
    """``mmctl failsafe TASK``: stop TASK and keep it stopped until ``unfailsafe``."""
    body: dict[str, Any] = {"failsafe": args.task}
    if args.reason:
        body["reason"] = args.reason
    _ask(args, body)
    return EXIT_OK


def cmd_unfailsafe(args: argparse.Namespace) -> int:
    """``mmctl unfailsafe TASK``: clear TASK's failsafe mark and start it again."""
    _ask(args, {"unfailsafe": args.task})
    return EXIT_OK


def _add_control(sub, common) -> None:
    wait = argparse.ArgumentParser(add_help=False)
    wait.add_argument("--wait", type=_seconds, default=5.0, metavar="S",
                      help="seconds to wait for the daemon's answer (default: 5); exit "
                           "status 3 if none comes")
    p = sub.add_parser("config", parents=[common, wait], help="show or replace a task's config",
                       description="Without JSON, print TASK's config in force; with JSON, "
                                   "replace it (a control message; the file's config for "
                                   "TASK stays overridden until the file changes it).")
    p.add_argument("task", metavar="TASK", type=_task_name)
    p.add_argument("json", metavar="JSON", nargs="?", help="the new config, a JSON object")
    p.set_defaults(func=cmd_config)
    p = sub.add_parser("state", parents=[common, wait], help="show or set a task's state",
                       description="Print stateful TASK's state, or with --set, set those "
                                   "keys in it (the task sees the change at once; it is "
                                   "saved with the next save).")
    p.add_argument("task", metavar="TASK", type=_task_name)
    p.add_argument("--set", metavar="JSON", help="keys to set, a JSON object")
    p.set_defaults(func=cmd_state)
    p = sub.add_parser("migrate", parents=[common, wait],
                       help="move a task to its own process or into the daemon",
                       description="Move stateful TASK to its own process (a systemd unit "
                                   "multimodule-task@TASK.service, or a detached process "
                                   "without systemd) or back into the daemon. Its state and "
                                   "the messages sent to it meanwhile are kept, in order. "
                                   "Sets is_external in TASK's config in force; returns "
                                   "once the task has moved (allow --wait for it).")
    p.add_argument("task", metavar="TASK", type=_task_name)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--external", action="store_true", help="to its own process")
    where.add_argument("--internal", action="store_true", help="into the daemon")
    p.set_defaults(func=cmd_migrate)
    long_wait = argparse.ArgumentParser(add_help=False)
    long_wait.add_argument("--wait", type=_seconds, default=30.0, metavar="S",
                           help="seconds to wait until it is done (default: 30); exit "
                                "status 3 if the daemon does not answer")
    p = sub.add_parser("stop", parents=[common, long_wait],
                       help="stop the daemon cleanly, or one task",
                       description="Without TASK, ask the daemon to exit (it delivers what "
                                   "it holds in memory and saves state) and wait until it "
                                   "has exited, as `systemctl stop` does. With TASK, stop "
                                   "that task only (state saved) and keep it stopped: "
                                   "messages sent to it wait in its queue until `mmctl "
                                   "start TASK` (a daemon restart starts it again).")
    p.add_argument("task", metavar="TASK", type=_task_name, nargs="?")
    p.add_argument("--externals", action="store_true",
                   help="also stop external tasks (exit_externals; without TASK)")
    p.add_argument("--no-block", action="store_true",
                   help="return once the daemon has the request, without waiting for it "
                        "to exit")
    p.add_argument("--stop-timeout", type=_seconds, default=30.0, metavar="S",
                   help="seconds to wait for the daemon to exit (default: 30); exit "
                        "status 1 if it has not")
    p.set_defaults(func=cmd_stop)
    p = sub.add_parser("start", parents=[common, long_wait], help="start one task",
                       description="Start TASK as its config says (in the daemon or in its "
                                   "own process): a task stopped with `mmctl stop TASK`, or "
                                   "one not loaded yet. It gets the messages that waited.")
    p.add_argument("task", metavar="TASK", type=_task_name)
    p.set_defaults(func=cmd_task_command)
    p = sub.add_parser("restart", parents=[common, long_wait],
                       help="restart one task with its code imported afresh",
                       description="Stop TASK (the message in hand finishes, its state is "
                                   "saved, its queued messages are kept), import its module "
                                   "afresh and start it again with the same state, the other "
                                   "tasks untouched. A module that no longer imports, a "
                                   "config its new class refuses, or a set_config that "
                                   "raises leaves the running version as it was and says "
                                   "why (exit 1). An external task's process is restarted.")
    p.add_argument("task", metavar="TASK", type=_task_name)
    p.set_defaults(func=cmd_task_command)
    p = sub.add_parser("reload", parents=[common, wait], help="re-read the config file",
                       description="Make the daemon re-read its config file, like SIGHUP.")
    p.set_defaults(func=cmd_reload)
    p = sub.add_parser("status", parents=[common, wait], help="show the tasks and their figures",
                       description="One row per task: name, internal/external, pid or unit, "
                                   "state (running, activating, stopped, failed, failsafe), "
                                   "level, messages in/out per second, CPU %, memory (an "
                                   "internal task's: the estimated size of its objects; the "
                                   "daemon's: its process's less its internal tasks'), open "
                                   "descriptors, System V queue fill, restarts, last error. "
                                   "Rates and means are over the monitor's short window. "
                                   "While a task's handler blocks the daemon's event loop, "
                                   "the daemon still answers, from figures it kept a little "
                                   "earlier, and says which task blocks it and for how long "
                                   "(\"blocked\" and \"snapshot_at\" in --json).")
    p.add_argument("--json", action="store_true",
                   help="print the daemon's whole status as JSON (rows under \"rows\")")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("top", parents=[common, wait], help="show the status table live",
                       description="The status table, refreshed until Ctrl-C.")
    p.add_argument("--interval", type=_seconds, default=2.0, metavar="S",
                   help="seconds between refreshes (default: 2)")
    p.add_argument("-n", "--iterations", type=_positive_int, default=None, metavar="N",
                   help="stop after N refreshes (default: run until interrupted)")
    p.set_defaults(func=cmd_top)
    p = sub.add_parser("failsafe", parents=[common, wait], help="stop a task and keep it "
                                                                "stopped",
                       description="Put TASK in failsafe, as the resource monitor does at a "
                                   "failsafe level: it is stopped (its state saved, messages "
                                   "sent to it kept in its queue) and stays stopped, across "
                                   "daemon restarts too, until `mmctl unfailsafe TASK`.")
    p.add_argument("task", metavar="TASK", type=_task_name)
    p.add_argument("--reason", metavar="TEXT", help="why (shown in status and the alert)")
    p.set_defaults(func=cmd_failsafe)
    p = sub.add_parser("unfailsafe", parents=[common, wait], help="start a task held in "
                                                                  "failsafe again",
                       description="Clear TASK's failsafe mark and start it again, internal "
                                   "or external as its config says; it gets the messages "
                                   "that waited.")
    p.add_argument("task", metavar="TASK", type=_task_name)
    p.set_defaults(func=cmd_unfailsafe)
    graph.add_parser(sub, [common, wait])


def _add_send(sub, common) -> None:
    p = sub.add_parser("send", parents=[common], help="send one message to a queue",
                       description="Send one JSON object to queue QNAME.")
    p.add_argument("qname", metavar="QNAME", help="queue name")
    p.add_argument("json", metavar="JSON", nargs="?",
                   help="the message, a JSON object (default: read from standard input)")
    p.add_argument("--timeout", type=_seconds, default=None, metavar="S",
                   help="seconds to wait for room in a full queue (default: wait for ever)")
    p.add_argument("--to", metavar="HOST", default=None,
                   help="send to queue QNAME on another host, through this host's Bridge "
                        "task (NATS JetStream); this host's own name is a local send")
    p.set_defaults(func=cmd_send)


def _add_recv(sub, common) -> None:
    p = sub.add_parser("recv", parents=[common], help="receive messages from a queue",
                       description="Receive messages from queue QNAME and print each as "
                                   "pretty JSON. Exits 1 if the timeout passes first.")
    p.add_argument("qname", metavar="QNAME", help="queue name")
    p.add_argument("-n", "--count", type=_positive_int, default=1, metavar="N",
                   help="how many messages to receive (default: 1)")
    p.add_argument("-t", "--timeout", type=_seconds, default=None, metavar="S",
                   help="seconds to wait for each message (default: wait for ever; 0: "
                        "only take what is there)")
    p.set_defaults(func=cmd_recv)


def _add_queues(sub, common) -> None:
    p = sub.add_parser("queues", parents=[common], help="list queues and how full they are",
                       description="List the System V queues of the transit directory.")
    p.add_argument("--json", action="store_true", help="print a JSON array")
    p.add_argument("--no-legend", action="store_true", help="omit the header and footer")
    p.set_defaults(func=cmd_queues)


def build_parser(prog: str = "mmctl") -> argparse.ArgumentParser:
    """The ``mmctl`` argument parser (subcommands ``send``, ``recv``, ``queues``)."""
    common = _transit_options()
    parser = argparse.ArgumentParser(
        prog=prog, parents=[common],
        description="Control multimodule: send and receive messages, list queues, and "
                    "talk to the daemon (config, state, status, top, graph, migrate, "
                    "failsafe, unfailsafe, reload, stop).",
        epilog="The commands strans, rtrans and qtrans are mmctl send, recv and queues. "
               "Exit status: 0 ok, 1 failed or timed out, 2 bad usage or input, 3 the daemon "
               "did not answer, 4 no such task.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_send(sub, common)
    _add_recv(sub, common)
    _add_queues(sub, common)
    _add_control(sub, common)
    logs.add_parser(sub, common)
    for subparser in sub.choices.values():
        subparser.set_defaults(subparser=subparser)
    parser.subcommands = dict(sub.choices)  # command -> its own parser
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "mmctl",
         parser: argparse.ArgumentParser | None = None) -> int:
    """Run ``mmctl`` with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["__complete"]:  # the shell completion's helper, not a command
        from multimodule.cli.completion import helper
        return helper(argv[1:])
    parser = parser or build_parser(prog)
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported by the subcommand's parser, so that usage and name fit
        args.subparser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.prog = prog
    try:
        return args.func(args)
    except CommandError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return exc.status
    except UsageError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except MultiModuleError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def _alias(command: str, name: str) -> int:
    parser = build_parser()
    parser.subcommands[command].prog = name  # so that its usage and errors say "strans ..."
    return main([command, *sys.argv[1:]], prog=name, parser=parser)


def strans() -> int:
    """``strans QNAME [JSON]`` = ``mmctl send``."""
    return _alias("send", "strans")


def rtrans() -> int:
    """``rtrans QNAME`` = ``mmctl recv``."""
    return _alias("recv", "rtrans")


def qtrans() -> int:
    """``qtrans`` = ``mmctl queues``."""
    return _alias("queues", "qtrans")


if __name__ == "__main__":
    sys.exit(main())
