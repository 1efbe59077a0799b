#!/usr/bin/env python3
"""Scale figures (issue 15), each beside its goal, measured in one run.

So far: routed throughput inside one daemon (producer task -> Router -> consumer task, bursts
of 500, as ``bench/runtime.py``) with 1 route and with 1,000 routes (999 that cannot match,
on ``source`` equalities, ahead of the one that does), and against one raw ``asyncio.Queue``
hop in the same run. Goals: 1 and 1,000 routes within 1.5x of each other; routed at least
0.3 of the raw hop. The other figures of issue 15 (10,000 idle tasks, 50 external tasks
beside supervisord and circusd) are not measured yet.

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        task_dir, _ = rt.write_tasks(tmp)
        results = {routes: asyncio.run(measure(tmp, task_dir, routes, args.n, args.repeat))
                   for routes in (1, 1000)}
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
