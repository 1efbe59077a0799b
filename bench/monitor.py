"""What the resource monitor costs per sample, against the raw reads it cannot avoid.

Prints, measured in this run:
- per external task: ``Monitor.read_process`` (psutil, plus the task's own cgroup where it has
  one) against a raw ``psutil.Process.oneshot()`` read of the same figures (the baseline);
- per task: ``Monitor.tick`` (windows, levels, the status row) for internal tasks, in
  microseconds, and what one sample of N tasks costs the event loop at the default interval;
- the memory attribution of internal tasks (``MemoryAttribution.measure``: the deep-size walks,
  on the loop) per sample for 10, 100 and 1000 tasks with a small state and with a 5 MB state
  (its JSON size; one state object shared by all the tasks, which costs each task's walk as
  much as its own would, as every walk counts every object it reaches), against the monitor's
  tick of the same tasks (the baseline), with its share of the loop's time at the default
  interval and how many samples it takes to renew every task's figure;
- the estimate of a 5 MB state against a full walk of every object (the exact figure): both
  the bytes and the time;
- the other method considered, ``tracemalloc`` (figures by the file that allocated): how
  much slower a handler-like workload (a message copied through orjson, kept in a dict) runs
  while it traces, against the same workload untraced, and what one snapshot grouped by file
  costs with one 5 MB state alive.
Run: .venv/bin/python bench/monitor.py [--tasks N] [--quick]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import orjson
import psutil

# Make "multimodule" importable when run as bench/monitor.py from a checkout.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(1, _ROOT)

from multimodule.monitor.deepsize import MemoryAttribution, deep_size  # noqa: E402
from multimodule.monitor.monitor import Monitor, TaskView  # noqa: E402
from multimodule.task import Task  # noqa: E402

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


class BenchTask(Task):
    """A task as the daemon holds one: attached, with a config and a state."""

    is_stateful = True


def make_tasks(count: int, state: dict) -> dict[str, Task]:
    tasks = {}
    for i in range(count):
        task = BenchTask()
        task.attach(f"T{i}", None)
        task.config = {"intervals": {"tick": 1.0}, "outstr": "howdy"}
        task.state = state if state is not None else {"ct": i, "seen": [1, 2, 3]}
        tasks[task.name] = task
    return tasks


def large_state(json_bytes: int) -> dict:
    """A state whose JSON takes about ``json_bytes``: a log of small records."""
    record = {"n": 0, "text": "x" * 40, "tags": ["a", "b"]}
    count = json_bytes // len(orjson.dumps(record))
    return {"ct": count, "log": [{"n": i, "text": f"{i:040d}", "tags": ["a", str(i)]}
                                 for i in range(count)]}


def internal_views(count: int) -> list[TaskView]:
    return [TaskView(f"T{i}", "internal", "running", pid=os.getpid(), where="daemon",
                     counters={"messages_in": i, "messages_out": i, "handler_cpu_seconds": 0.1,
                               "handler_seconds": 0.2, "task_message_failure": 0,
                               "queue_depth": 0},
                     counters_since=time.time(), queue_fill=0.0)
            for i in range(count)]


def tick_cost(count: int) -> float:
    """Seconds of one ``Monitor.tick`` of ``count`` internal tasks, windows full."""
    views = internal_views(count)
    fill = {view.name: 0.0 for view in views}
    clock = [0.0]
    monitor = Monitor(window_s=60.0, clock=lambda: clock[0])

    def one_tick() -> None:  # samples DEFAULT_INTERVAL_S apart, as in the daemon
        clock[0] += DEFAULT_INTERVAL_S
        monitor.tick(views, {}, fill)

    for _ in range(100):  # fill both windows (60 s and 300 s) first
        one_tick()
    return per_call(one_tick, 20 if count <= 200 else 3)


def attribution_cost(tasks: dict[str, Task]) -> tuple[float, int]:
    """Seconds of one sample's ``MemoryAttribution.measure`` once every task has a figure,
    and how many samples it takes to renew them all."""
    attribution = MemoryAttribution()
    while len(attribution.measure(tasks)) < len(tasks):  # every task measured once
        pass
    walked = []

    def one_sample() -> None:
        attribution.measure(tasks)
        walked.append(attribution.last_walked)

    cost = per_call(one_sample, 5)
    per_sample = min(walked)
    return cost, -(-len(tasks) // max(per_sample, 1))


def handler_workload(rounds: int) -> None:
    """Work like a handler's: copy a message through orjson, keep the last 1000 in a dict."""
    kept: dict[int, dict] = {}
    message = {"ct": 1, "outstr": "howdy", "list": [1, 2, 3], "meta": {"a": "b"}}
    for i in range(rounds):
        copy = orjson.loads(orjson.dumps(message))
        copy["ct"] = i
        kept[i % 1000] = copy


def tracemalloc_costs(state: dict) -> tuple[float, float]:
    """(how many times slower the handler workload runs while tracemalloc traces, seconds of
    one snapshot grouped by file with ``state`` allocated while tracing)."""
    untraced = per_call(lambda: handler_workload(20_000), 1)
    tracemalloc.start()
    try:
        traced = per_call(lambda: handler_workload(20_000), 1)
        copy = orjson.loads(orjson.dumps(state))  # allocated while tracing, like a task's
        snapshot_s = per_call(lambda: tracemalloc.take_snapshot().statistics("filename"), 1)
        del copy
    finally:
        tracemalloc.stop()
    return traced / untraced, snapshot_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200, help="internal tasks per tick")
    parser.add_argument("--quick", action="store_true",
                        help="attribution for 10 and 100 tasks only")
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

    tick = tick_cost(args.tasks)
    print(f"external task figures: read_process {ours * 1e6:8.1f} us, raw psutil read "
          f"{raw * 1e6:8.1f} us  -> ratio {ours / raw:.2f}")
    print(f"tick of {args.tasks} internal tasks: {tick * 1e3:.2f} ms "
          f"({tick / args.tasks * 1e6:.1f} us per task); at the default interval of "
          f"{DEFAULT_INTERVAL_S:g} s the loop spends {tick / DEFAULT_INTERVAL_S * 100:.3f} % "
          "of its time on it")

    big = large_state(5_000_000)
    print(f"memory attribution per sample (a {len(orjson.dumps(big)) / 1e6:.1f} MB state "
          f"is {deep_size(big, max_objects=10**9, sample_items=10**9).bytes / 1e6:.0f} MB "
          "of objects), against the monitor's tick of the same tasks:")
    counts = (10, 100) if args.quick else (10, 100, 1000)
    for count in counts:
        baseline = tick_cost(count)
        for label, state in (("small state", None), ("5 MB state", big)):
            cost, renew = attribution_cost(make_tasks(count, state))
            print(f"  {count:5d} tasks, {label:11s}: {cost * 1e3:7.2f} ms  -> ratio "
                  f"{cost / baseline:6.2f} to the tick ({baseline * 1e3:.2f} ms); "
                  f"{cost / DEFAULT_INTERVAL_S * 100:.3f} % of the loop at "
                  f"{DEFAULT_INTERVAL_S:g} s; every figure renewed every {renew} samples")

    task = make_tasks(1, big)["T0"]
    ours_size = deep_size(task)
    full_size = deep_size(task, max_objects=10**9, sample_items=10**9)
    ours_s = per_call(lambda: deep_size(task), 20)
    full_s = per_call(lambda: deep_size(task, max_objects=10**9, sample_items=10**9), 1)
    print(f"one 5 MB state: estimate {ours_size.bytes / 1e6:.1f} MB ({ours_size.objects} "
          f"objects) against a full walk {full_size.bytes / 1e6:.1f} MB "
          f"({full_size.objects} objects) -> ratio {ours_size.bytes / full_size.bytes:.3f}; "
          f"time {ours_s * 1e3:.2f} ms against {full_s * 1e3:.0f} ms -> ratio "
          f"{ours_s / full_s:.4f}")

    slower, snapshot_s = tracemalloc_costs(big)
    print(f"tracemalloc instead: a handler workload runs {slower:.2f} times slower while it "
          f"traces (every allocation of the daemon, all the time), and one snapshot by file "
          f"with a 5 MB state takes {snapshot_s * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
