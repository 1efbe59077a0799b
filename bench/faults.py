#!/usr/bin/env python3
"""The fault suite at scale: what ``kill -9`` of real daemons and task processes loses.

Run from the repository root::

    .venv/bin/python bench/faults.py                        # every scenario, 150,000 each
    .venv/bin/python bench/faults.py --scenarios a,f --count 20000 --kills 3
    .venv/bin/python bench/faults.py --dedupe both          # duplicates before/after dedupe
    .venv/bin/python bench/faults.py --journal fsync        # once the daemon has a journal

Each scenario starts real ``multimodule`` daemons in a private state and transit directory,
streams numbered messages through a stateful task (FaultCounter) to a sink queue, injects its
faults, waits for the pipeline to drain, stops it in order and reads the saved state. The
instrument and the definitions of its figures are in ``tests/fault_harness.py`` (shared with
``tests/test_faults.py``, which runs it with small counts in CI). Scenarios: ``0`` no fault
(the baseline), ``a`` kill -9 of the daemon (5 times, the sink queue full at every other kill),
``b`` of the external task, ``c`` of both, ``d`` of the daemon during ``mmctl migrate``, ``e``
an unread sink queue (daemon memory, backpressure), ``f`` kill -9 during saves of a 5 MB state.

Printed per run: sent, lost, duplicates (and those carrying the same transit id: resends of one
send), out of order, whether the saved state is consistent, kills, recovery time (kill to the
first message forwarded after it reaching the sink) median/max in seconds and as a multiple of
the same run's cold start (daemon spawn to the first message at the sink), the daemon's peak
RSS, the producer's QueueFull count (backpressure), drained, and the goals (0 lost, state
consistent, 0 duplicates with dedupe on, RSS under 100 MB with the producer held back in e).
Details (problems, notes) follow the table. The exit status is 0 whatever the figures; 1 only
when the harness itself fails (a daemon that cannot start at all).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# Make "multimodule" and the shared instrument importable when run as bench/faults.py.
_ROOT = Path(__file__).resolve().parent.parent
for _path in (str(_ROOT / "tests"), str(_ROOT)):
    if _path not in sys.path:
        sys.path.insert(1, _path)

from fault_harness import (  # noqa: E402
    RSS_LIMIT_BYTES,
    SCENARIOS,
    FaultResult,
    Options,
    daemon_supports,
    dedupe_is_reserved,
    format_table,
    run_scenario,
    scenario,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring and ``--help``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help="comma-separated keys or names (default: all: "
                             + ", ".join(f"{s.key}={s.name}" for s in SCENARIOS.values()) + ")")
    parser.add_argument("--count", type=int, default=150_000,
                        help="messages per scenario (default 150000; e streams until its "
                             "unread phase ends)")
    parser.add_argument("--kills", type=int, default=5, help="faults per scenario (default 5)")
    parser.add_argument("--dedupe", choices=("off", "on", "both"), default="off",
                        help="the dedupe task key; 'both' runs each scenario without and with "
                             "it (duplicates before and after dedupe)")
    parser.add_argument("--dedupe-window", type=int, default=None, metavar="N",
                        help="with dedupe on: 'dedupe = N' instead of 'dedupe = true'")
    parser.add_argument("--journal", choices=("default", "off", "fsync"), default="default",
                        help="the daemon's journal: as it defaults, --no-journal, or "
                             "--journal-fsync (passed only if the daemon has the option)")
    parser.add_argument("--route", choices=("router", "direct"), default="router",
                        help="FaultCounter emits through the Router (default) or sends "
                             "straight to the sink")
    parser.add_argument("--rate", type=float, default=None,
                        help="messages/s the producer sends at most (0: no limit; default: "
                             "each scenario's pace, which spreads the stream over its faults)")
    parser.add_argument("--unread", type=float, default=60.0, metavar="S",
                        help="seconds the sink queue stays unread in e (default 60)")
    parser.add_argument("--rss-cap", type=float, default=5 * RSS_LIMIT_BYTES / 2**20,
                        metavar="MB", help="e's unread phase ends early past this daemon RSS "
                                           "(default 500)")
    parser.add_argument("--ballast", type=int, default=5_000_000, metavar="BYTES",
                        help="state size in f (default 5000000)")
    parser.add_argument("--quiet", type=float, default=3.0, metavar="S",
                        help="seconds without a message at the sink that, with empty "
                             "queues, mean drained (default 3)")
    parser.add_argument("--drain-timeout", type=float, default=300.0, metavar="S")
    parser.add_argument("--recovery-timeout", type=float, default=120.0, metavar="S",
                        help="how long to wait for messages to flow after a kill")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep each run's directories (logs, state) here instead of a "
                             "temporary directory removed at the end")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the chosen scenarios and print the table; return the exit status."""
    args = parse_args(argv)
    try:
        chosen = [scenario(k.strip()) for k in args.scenarios.split(",") if k.strip()]
    except KeyError as exc:
        print(f"faults.py: {exc.args[0]}", file=sys.stderr)
        return 2
    base = Options(count=args.count, kills=args.kills, journal=args.journal, route=args.route,
                   rate=args.rate, unread_s=args.unread, rss_cap_bytes=int(args.rss_cap * 2**20),
                   ballast_bytes=args.ballast, quiet_s=args.quiet,
                   drain_timeout_s=args.drain_timeout, recovery_timeout_s=args.recovery_timeout)
    try:
        base.check()
    except ValueError as exc:
        print(f"faults.py: {exc}", file=sys.stderr)
        return 2
    on = True if args.dedupe_window is None else args.dedupe_window
    dedupes = {"off": [False], "on": [on], "both": [False, on]}[args.dedupe]

    print(f"fault suite: {len(chosen)} scenarios x {len(dedupes)}, {args.count} messages, "
          f"{args.kills} faults each; {os.cpu_count()} CPUs; System V queues of "
          f"{_sysctl('msgmnb')} bytes")
    print(f"  journal options in this daemon: --no-journal "
          f"{'yes' if daemon_supports('--no-journal') else 'no'}, --journal-fsync "
          f"{'yes' if daemon_supports('--journal-fsync') else 'no'}; dedupe a reserved task "
          f"key: {'yes' if dedupe_is_reserved() else 'no (set on FaultCounter only)'}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mm-faults-"))
    results: list[FaultResult] = []
    try:
        for spec in chosen:
            for dedupe in dedupes:
                label = f"{spec.key}-{spec.name}-dedupe-{'on' if dedupe else 'off'}"
                started = time.monotonic()
                print(f"running {label} ...", flush=True)
                try:
                    result = run_scenario(spec.key, dataclasses.replace(base, dedupe=dedupe),
                                          workdir / label)
                except RuntimeError as exc:  # the harness's own precondition
                    print(f"faults.py: {label}: {exc}", file=sys.stderr)
                    return 1
                results.append(result)
                print(f"  done in {time.monotonic() - started:.0f} s: lost {result.lost}, "
                      f"duplicates {result.duplicates}, state "
                      f"{'consistent' if result.state_consistent else 'INCONSISTENT'}",
                      flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(format_table(results))
    print("\nduplicates: copies the sink (a plain queue) took -> of them, those a receiving "
          "task with dedupe would take (a copy with its first copy's id is dropped there):")
    for result in results:
        print(f"  {result.scenario} {result.title}, FaultCounter's dedupe {result.dedupe}: "
              f"{result.duplicates} -> {result.duplicates_after_dedupe}")
    print("\ndetails:")
    for result in results:
        missed = result.goals_missed()
        print(result.summary().rstrip())
        print("  goals: " + ("met" if not missed else "MISSED: " + "; ".join(missed)))
    return 0


def _sysctl(name: str) -> str:
    """The kernel setting ``name`` (``/proc/sys/kernel/NAME``), or ``?``."""
    try:
        return Path(f"/proc/sys/kernel/{name}").read_text().strip()
    except OSError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
