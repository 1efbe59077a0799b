#!/usr/bin/env python3
"""Scale figures (issue 15), each beside its goal, measured in one run.

So far: the routed throughput inside one daemon (producer task -> Router -> consumer task, bursts
of 500, as ``bench/runtime.py``) with 1 route and with 1,000 routes (999 that cannot match,
on ``source`` equalities, ahead of the one that does), and against one raw ``asyncio.Queue``
hop in the same run. Goals: 1 and 1,000 routes within 1.5x of each other; routed at least
0.3 of the raw hop. Then ``--tasks`` (default 1,000) idle internal tasks in one daemon:
start-up seconds, RSS, threads, idle CPU and a full garbage collection. Not measured yet:
10,000 tasks, RSS over 10 minutes, and 50 external tasks beside supervisord and circusd.

Run from the repository root::

    .venv/bin/python bench/scale.py [--n 50000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import runtime as rt  # noqa: E402 - bench/runtime.py: the producer/consumer and the raw hop

from multimodule.config import DaemonOptions  # noqa: E402
from multimodule.runtime.daemon import Daemon  # noqa: E402
from multimodule.transit import Transit  # noqa: E402


def write_config(tmp: Path, routes: int) -> Path:
    """A config whose Router has ``routes`` routes, the matching one last."""
    config = tmp / f"routes-{routes}.json"
    table = [{"match": {"source": f"Other{i}"}, "forwards": [{"qname": "Nowhere"}]}
             for i in range(routes - 1)]
    table.append({"match": {"source": rt.PRODUCER}, "forwards": [{"qname": rt.CONSUMER}]})
    config.write_text(json.dumps({"Router": {"routes": table}, rt.PRODUCER: {},
                                  rt.CONSUMER: {}}))
    return config


async def measure(tmp: Path, task_dir: Path, routes: int, n: int, repeat: int
                  ) -> tuple[float, float]:
    """Best routed and raw throughput (msg/s) over ``repeat`` interleaved runs."""
    base = tmp / f"d{routes}"
    base.mkdir()
    opts = DaemonOptions(state_dir=base / "state", transit_dir=base / "transit",
                         config_file=write_config(tmp, routes), task_path=[task_dir],
                         oob=f"log:{base}/log.out,error:{base}/error.out,"
                             f"alert:{base}/alert.out,debug:{base}/debug.out",
                         control_queue=f"bench_scale_{routes}")
    daemon = Daemon(opts)
    run = asyncio.ensure_future(daemon.run())
    try:
        started = time.monotonic()
        while daemon.ready is None or not daemon.ready.is_set():
            if run.done() or time.monotonic() - started > 30:
                raise RuntimeError(f"daemon not ready (see {base})")
            await asyncio.sleep(0.01)
        await rt.routed_run(daemon, 2000, rt.BURST, 0.0, 30)  # warm-up
        routed, raw = [], []
        for _ in range(repeat):
            routed.append(await rt.routed_run(daemon, n, rt.BURST, 0.0, 60 + n * 1e-4))
            raw.append(await rt.raw_run(n, rt.BURST, 0.0, 60))
        return (max(r.n / r.wall for r in routed), max(r.n / r.wall for r in raw))
    finally:
        daemon.request_stop()
        await asyncio.wait_for(run, 30)
        Transit(base / "transit").remove_all()


IDLE_TASK = """
from multimodule import Task
class {name}(Task):
    def message(self, message):
        pass
"""


async def idle_tasks(tmp: Path, count: int, idle_s: float) -> dict[str, float]:
    """A daemon with ``count`` idle internal tasks: start-up seconds, RSS, threads, idle CPU
    over ``idle_s`` seconds, and a full collection's milliseconds (start-up objects frozen,
    as the daemon does)."""
    import gc

    import psutil

    base = tmp / f"idle{count}"
    (base / "tasks").mkdir(parents=True)
    for i in range(count):
        (base / "tasks" / f"Idle{i}.py").write_text(IDLE_TASK.format(name=f"Idle{i}"))
    (base / "c.toml").write_text("".join(f"[Idle{i}]\n" for i in range(count)))
    opts = DaemonOptions(state_dir=base / "state", transit_dir=base / "transit",
                         config_file=base / "c.toml", task_path=[base / "tasks"],
                         oob=f"log:{base}/log.out,error:{base}/error.out,"
                             f"alert:{base}/alert.out,debug:{base}/debug.out",
                         control_queue="bench_scale_idle")
    me = psutil.Process()
    started = time.monotonic()
    daemon = Daemon(opts)
    run = asyncio.ensure_future(daemon.run())
    try:
        while daemon.ready is None or not daemon.ready.is_set():
            if run.done():
                raise RuntimeError(f"daemon exited during start-up (see {base})")
            await asyncio.sleep(0.01)
        start_s = time.monotonic() - started
        cpu0 = me.cpu_times()
        await asyncio.sleep(idle_s)
        cpu1 = me.cpu_times()
        collect = time.perf_counter()
        gc.collect()
        collect_ms = (time.perf_counter() - collect) * 1e3
        return {"start_s": start_s, "rss_mb": me.memory_info().rss / 2**20,
                "threads": me.num_threads(),
                "idle_cpu_percent": 100 * ((cpu1.user + cpu1.system)
                                           - (cpu0.user + cpu0.system)) / idle_s,
                "full_collection_ms": collect_ms}
    finally:
        daemon.request_stop()
        await asyncio.wait_for(run, 120)
        Transit(base / "transit").remove_all()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=1000,
                        help="idle internal tasks of the start-up and idle figures")
    parser.add_argument("--idle-s", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        task_dir, _ = rt.write_tasks(tmp)
        results = {routes: asyncio.run(measure(tmp, task_dir, routes, args.n, args.repeat))
                   for routes in (1, 1000)}
        idle = asyncio.run(idle_tasks(tmp, args.tasks, args.idle_s))
    one, raw_one = results[1]
    many, raw_many = results[1000]
    print(f"routed throughput, {args.n} messages in bursts of {rt.BURST}, best of "
          f"{args.repeat}:")
    print(f"  1 route       {one:9.0f} msg/s   raw asyncio.Queue hop {raw_one:9.0f} msg/s")
    print(f"  1,000 routes  {many:9.0f} msg/s   raw asyncio.Queue hop {raw_many:9.0f} msg/s")
    slower = one / many
    print(f"  1 route / 1,000 routes = {slower:.2f} (goal <= 1.5: "
          f"{'met' if slower <= 1.5 else 'MISSED'})")
    for routes, (routed, raw) in results.items():
        ratio = routed / raw
        print(f"  routed / raw, {routes} routes = {ratio:.2f} (goal >= 0.3: "
              f"{'met' if ratio >= 0.3 else 'MISSED'})")
    print(f"{args.tasks} idle internal tasks in one daemon (goals are for 10,000):")
    print(f"  start-up {idle['start_s']:.1f} s (goal for 10,000: < 15 s), RSS "
          f"{idle['rss_mb']:.0f} MB (< 300 MB), threads {idle['threads']}, idle CPU "
          f"{idle['idle_cpu_percent']:.2f}% over {args.idle_s:g} s (< 1%), a full collection "
          f"{idle['full_collection_ms']:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
