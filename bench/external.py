"""How long external-task operations take, with the detached-process backend (no systemd).

Prints, over a few rounds: the time from `mmctl migrate` (the request sent) to the first
message handled in the new mode, each way, and from `kill -9` of the task's process to the
restarted task handling a message (this includes the backend's 1 s restart backoff).
Run: .venv/bin/python bench/external.py [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from multimodule.cli import mmctl
from multimodule.transit import Empty, Transit

ECHO = textwrap.dedent("""
    import os
    from multimodule import Task

    class Echo(Task):
        is_stateful = True

        def message(self, message):
            self.emit({"n": message["n"], "pid": os.getpid()})
""")


def first_from(transit: Transit, n: int, pid_ok) -> float:
    """Send message ``n`` repeatedly (new numbers) until one comes back from a process that
    ``pid_ok`` accepts; return when it did (time.monotonic())."""
    while True:
        transit.send("Echo", {"n": n})
        try:
            while True:
                reply = transit.receive("out", timeout=0.01)
                if pid_ok(reply["pid"]):
                    return time.monotonic()
        except Empty:
            n += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    repo = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "tasks").mkdir()
        (tmp / "tasks" / "Echo.py").write_text(ECHO)
        (tmp / "config.toml").write_text(
            '[Echo]\n\n[Router]\nroutes = [ { match = { source = "Echo" }, '
            'forwards = [ { qname = "out" } ] } ]\n')
        transit_dir = tmp / "transit"
        env = dict(os.environ, MULTIMODULE_TRANSIT_DIR=str(transit_dir),
                   PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))
        os.environ["MULTIMODULE_TRANSIT_DIR"] = str(transit_dir)
        daemon = subprocess.Popen(
            [sys.executable, "-m", "multimodule.cli.daemon", "-c", str(tmp / "config.toml"),
             "--task-path", str(tmp / "tasks"), "-s", str(tmp / "state"),
             "--task-backend", "detached"], env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        transit = Transit(transit_dir)
        try:
            first_from(transit, 0, lambda pid: pid == daemon.pid)
            out_times, in_times, crash_times = [], [], []
            for _ in range(args.rounds):
                t0 = time.monotonic()
                mmctl.main(["migrate", "Echo", "--external", "--wait", "30"])
                out_times.append(first_from(transit, 0, lambda pid: pid != daemon.pid) - t0)
                pid = next(int(p.read_text()) for p in [tmp / "state" / "task-Echo.lock"])
                t0 = time.monotonic()
                os.kill(pid, signal.SIGKILL)
                crash_times.append(first_from(transit, 0, lambda p, old=pid: p not in
                                              (old, daemon.pid)) - t0)
                t0 = time.monotonic()
                mmctl.main(["migrate", "Echo", "--internal", "--wait", "30"])
                in_times.append(first_from(transit, 0, lambda pid: pid == daemon.pid) - t0)

            def show(label, values):
                print(f"{label:<58} median {statistics.median(values) * 1000:7.0f} ms   "
                      f"min {min(values) * 1000:6.0f}  max {max(values) * 1000:6.0f}")

            print(f"external tasks, detached backend, {args.rounds} rounds")
            show("mmctl migrate --external -> first message handled outside", out_times)
            show("mmctl migrate --internal -> first message handled inside", in_times)
            show("kill -9 -> restarted task handles a message (1 s backoff)", crash_times)
        finally:
            mmctl.main(["stop", "--externals", "--wait", "30"])
            daemon.wait(30)
            transit.remove_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
