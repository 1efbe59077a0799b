"""What the resource monitor costs per sample, against the raw reads it cannot avoid.

Prints, measured in this run:
- per external task: ``Monitor.read_process`` (psutil, plus the task's own cgroup where it has
  one) against a raw ``psutil.Process.oneshot()`` read of the same figures (the baseline);
- per task: ``Monitor.tick`` (windows, levels, the status row) for internal tasks, in
  microseconds, and what one sample of N tasks costs the event loop at the default interval.
Run: .venv/bin/python bench/monitor.py [--tasks N]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import psutil

from multimodule.monitor.monitor import Monitor, TaskView

DEFAULT_INTERVAL_S = 5.0


def raw_read(pid: int) -> None:
    process = psutil.Process(pid)
    with process.oneshot():
        process.cpu_times()
        process.memory_info()
        process.num_threads()
        process.num_fds()
        process.io_counters()


def per_call(function, rounds: int) -> float:
    """Seconds per call, best of 5 runs of ``rounds`` calls."""
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(rounds):
            function()
        best = min(best, (time.perf_counter() - started) / rounds)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200, help="internal tasks per tick")
    args = parser.parse_args()

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        monitor = Monitor(window_s=60.0)
        view = TaskView("Ext", "external", "running", pid=child.pid, where="bench.service",
                        cgroup=True, counters={}, counters_since=time.time())
        raw = per_call(lambda: raw_read(child.pid), 500)
        ours = per_call(lambda: monitor.read_process(view), 500)
    finally:
        child.kill()
        child.wait()

    views = [TaskView(f"T{i}", "internal", "running", pid=os.getpid(), where="daemon",
                      counters={"messages_in": i, "messages_out": i, "handler_cpu_seconds": 0.1,
                                "handler_seconds": 0.2, "task_message_failure": 0,
                                "queue_depth": 0},
                      counters_since=time.time(), queue_fill=0.0)
             for i in range(args.tasks)]
    fill = {view.name: 0.0 for view in views}
    clock = [0.0]

    def one_tick() -> None:  # samples DEFAULT_INTERVAL_S apart, as in the daemon
        clock[0] += DEFAULT_INTERVAL_S
        monitor.tick(views, {}, fill)

    monitor = Monitor(window_s=60.0, clock=lambda: clock[0])
    for _ in range(100):  # fill both windows (60 s and 300 s) first
        one_tick()
    tick = per_call(one_tick, 20)

    print(f"external task figures: read_process {ours * 1e6:8.1f} us, raw psutil read "
          f"{raw * 1e6:8.1f} us  -> ratio {ours / raw:.2f}")
    print(f"tick of {args.tasks} internal tasks: {tick * 1e3:.2f} ms "
          f"({tick / args.tasks * 1e6:.1f} us per task); at the default interval of "
          f"{DEFAULT_INTERVAL_S:g} s the loop spends {tick / DEFAULT_INTERVAL_S * 100:.3f} % "
          "of its time on it")


if __name__ == "__main__":
    main()
