"""``mmctl logs`` from the files the daemon writes (the journal's side is tested under a
booted systemd in test_systemd_daemon.py): one view of the daemon's and its tasks' records,
internal and external alike, in time order, with each task's name; -n, --since, -f."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from datetime import datetime

from helpers import receive_n, route, router_section, wait_for_file

TALKER = """
    from multimodule import Task

    class {name}(Task):
        is_stateful = True

        def message(self, message):
            n = message["n"]
            if n % 2:
                self.error(f"odd {{n}}")
            else:
                self.log(f"even {{n}}")
            self.emit({{"n": n}})
"""

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}"


def records(out: str) -> list[str]:
    """The lines of ``mmctl logs`` without their times (each must start with one)."""
    lines = out.splitlines()
    for line in lines:
        assert re.match(STAMP + " ", line), line
    return [line[24:] for line in lines]


def test_logs_merge_internal_and_external_tasks_in_time_order(mm, transit, tmp_path):
    # Given a daemon writing its channels to files, with an internal task and an external
    # (detached) one whose records go to the same files
    for name in ("Inside", "Outside"):
        mm.task(name, TALKER.format(name=name))
    mm.config("[Inside]\n[Outside]\nis_external = true\n"
              + router_section(route("Inside", "out"), route("Outside", "out")))
    log, errors = tmp_path / "log.out", tmp_path / "errors.out"
    daemon = mm.start("-o", f"log:{log},error:{errors},alert:{errors},debug:{tmp_path}/d.out",
                      wait=False)
    wait_for_file(log, lambda p: p.exists() and "running (pid" in p.read_text())
    # When messages go to one task, then the other, then the first again
    for n, task in enumerate(("Inside", "Outside", "Inside", "Outside", "Inside"), 1):
        transit.send(task, {"n": n})
        receive_n(transit, "out", 1)
    # Then mmctl logs shows every record once, in the order they were written, each with its
    # task's name (the daemon's own records too)
    status, out, err = mm.mmctl("logs", "-s", str(mm.state_dir))
    assert status == 0, err
    lines = records(out)
    talk = [line for line in lines if re.search(r"(odd|even) \d", line)]
    assert talk == ["error: Inside: odd 1", "Outside: even 2", "error: Inside: odd 3",
                    "Outside: even 4", "error: Inside: odd 5"], out
    assert any(line.startswith("MultiModule: running (pid") for line in lines), out
    times = [datetime.fromisoformat(line[:23]) for line in out.splitlines()]
    assert times == sorted(times)
    # and TASK, -n and --since select
    status, out, _ = mm.mmctl("logs", "-s", str(mm.state_dir), "Outside", "-n", "1")
    assert records(out) == ["Outside: even 4"], out
    status, out, _ = mm.mmctl("logs", "-s", str(mm.state_dir), "--since", "2h", "Inside")
    assert [line for line in records(out) if "odd" in line] == \
        ["error: Inside: odd 1", "error: Inside: odd 3", "error: Inside: odd 5"], out
    status, out, _ = mm.mmctl("logs", "-s", str(mm.state_dir), "--since", "2999-01-01")
    assert status == 0 and out == ""
    daemon.stop_ok()


def test_logs_follow_prints_records_as_they_come(mm, transit, tmp_path):
    mm.task("Inside", TALKER.format(name="Inside"))
    mm.config("[Inside]\n" + router_section(route("Inside", "out")))
    log = tmp_path / "log.out"
    mm.start("-o", f"log:{log},error:{log},alert:{log},debug:{tmp_path}/d.out", wait=False)
    wait_for_file(log, lambda p: p.exists() and "running (pid" in p.read_text())
    # Given mmctl logs -f running for the task
    follower = subprocess.Popen([sys.executable, "-m", "multimodule.cli.mmctl", "logs", "-f",
                                 "-s", str(mm.state_dir), "Inside"], env=mm.env, cwd=mm.tmp,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: list[str] = []
    arrived = threading.Event()

    def read() -> None:
        for line in follower.stdout:
            seen.append(line)
            if "even 42" in line:
                arrived.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        # When the task writes a record
        transit.send("Inside", {"n": 42})
        # Then the follower prints it as it comes
        assert arrived.wait(15), (seen, follower.stderr)
        assert re.match(STAMP + " Inside: even 42$", seen[-1].rstrip("\n")), seen
    finally:
        follower.terminate()
        follower.wait(10)


def test_logs_refuse_what_they_cannot_read(mm, tmp_path):
    # A state directory no daemon published its options in
    status, _, err = mm.mmctl("logs", "-s", str(tmp_path / "nowhere"))
    assert status == 1 and "cannot tell where the daemon writes" in err, err
    # A --since that is neither a time nor a duration
    mm.config("")
    daemon = mm.start()
    status, _, err = mm.mmctl("logs", "-s", str(mm.state_dir), "--since", "yesterday-ish")
    assert status == 1 and "--since 'yesterday-ish'" in err, err
    daemon.stop_ok()
