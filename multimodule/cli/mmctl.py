"""``mmctl``: the operator's command-line tool.

Exit status: 0 on success; 1 when the operation failed or timed out (e.g. ``recv`` got fewer
messages than asked for); 2 for bad usage or bad input (bad JSON, a bad queue name).
``strans``, ``rtrans`` and ``qtrans`` are ``mmctl send``, ``mmctl recv`` and ``mmctl queues`` for
users of Perl's IPC::Transit.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

import orjson

from multimodule.errors import Empty, MultiModuleError, UsageError
from multimodule.transit import Transit, default_transit_dir

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class CommandError(Exception):
    """A command failed; ``status`` is the exit status to use."""

    def __init__(self, message: str, status: int = EXIT_FAILED):
        super().__init__(message)
        self.status = status


def _transit_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-T", "--transit-dir", metavar="DIR", default=argparse.SUPPRESS,
        help="transit directory shared by the processes that talk "
             "(default: $MULTIMODULE_TRANSIT_DIR, else /run/multimodule/transit as root or "
             "under systemd, else $XDG_RUNTIME_DIR/multimodule/transit)",
    )
    return common


def _open_transit(args: argparse.Namespace) -> Transit:
    return Transit(getattr(args, "transit_dir", None))


def _parse_object(text: str, origin: str) -> dict[str, Any]:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise CommandError(f"{origin} is not valid JSON: {exc}", EXIT_USAGE) from exc
    if not isinstance(value, dict):
        raise CommandError(
            f"{origin} must be a JSON object ({{...}}), not a JSON {type(value).__name__}",
            EXIT_USAGE,
        )
    return value


def _print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")
    sys.stdout.flush()


def cmd_send(args: argparse.Namespace) -> int:
    """``mmctl send QNAME [JSON]``: send one message (JSON object from the argument or stdin)."""
    if args.json is not None:
        message = _parse_object(args.json, "the message argument")
    else:
        message = _parse_object(sys.stdin.read(), "the message on standard input")
    _open_transit(args).send(args.qname, message, timeout=args.timeout)
    return EXIT_OK


def cmd_recv(args: argparse.Namespace) -> int:
    """``mmctl recv QNAME``: print received messages as pretty JSON, one object each."""
    if args.count < 1:
        raise CommandError("--count must be at least 1", EXIT_USAGE)
    if args.timeout is not None and args.timeout < 0:
        raise CommandError("--timeout must not be negative", EXIT_USAGE)
    transit = _open_transit(args)
    for got in range(args.count):
        try:
            message = transit.receive(args.qname, timeout=args.timeout)
        except Empty:
            raise CommandError(
                f"timed out after {args.timeout} s on queue {args.qname!r} "
                f"({got} of {args.count} messages received)"
            ) from None
        _print_json(message)
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
    widths = [max([len(h)] + [len(t[i]) for t in table]) for i, h in enumerate(headers)]
    if not args.no_legend:
        print("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    for t in table:
        print("  ".join(c.ljust(w) for c, w in zip(t, widths)).rstrip())
    if not args.no_legend:
        print(f"\n{len(rows)} queues listed in {transit.path}.")
    return EXIT_OK


def _add_send(sub, common) -> None:
    p = sub.add_parser("send", parents=[common], help="send one message to a queue",
                       description="Send one JSON object to queue QNAME.")
    p.add_argument("qname", metavar="QNAME", help="queue name")
    p.add_argument("json", metavar="JSON", nargs="?",
                   help="the message, a JSON object (default: read from standard input)")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="seconds to wait for room in a full queue (default: wait for ever)")
    p.set_defaults(func=cmd_send)


def _add_recv(sub, common) -> None:
    p = sub.add_parser("recv", parents=[common], help="receive messages from a queue",
                       description="Receive messages from queue QNAME and print each as "
                                   "pretty JSON. Exits 1 if the timeout passes first.")
    p.add_argument("qname", metavar="QNAME", help="queue name")
    p.add_argument("-n", "--count", type=int, default=1, metavar="N",
                   help="how many messages to receive (default: 1)")
    p.add_argument("-t", "--timeout", type=float, default=None, metavar="S",
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
        description="Control multimodule: send and receive messages, list queues.",
        epilog=f"Default transit directory here: {default_transit_dir()}",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_send(sub, common)
    _add_recv(sub, common)
    _add_queues(sub, common)
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "mmctl") -> int:
    """Run ``mmctl`` with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
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


def _alias(command: str) -> int:
    return main([command, *sys.argv[1:]])


def strans() -> int:
    """``strans QNAME [JSON]`` = ``mmctl send``."""
    return _alias("send")


def rtrans() -> int:
    """``rtrans QNAME`` = ``mmctl recv``."""
    return _alias("recv")


def qtrans() -> int:
    """``qtrans`` = ``mmctl queues``."""
    return _alias("queues")


if __name__ == "__main__":
    sys.exit(main())
