"""Daemon start-up: the one-daemon-per-state-dir guard, the status file, and refusing to start
with an invalid config file."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import orjson

from helpers import router_section, route


def test_second_daemon_on_same_state_dir_exits_1_naming_the_running_pid(mm):
    # Given a daemon running on a state dir
    mm.config(router_section())
    before = time.time()
    first = mm.start()
    # Then its status file has its pid, start time and command line
    status = orjson.loads((mm.state_dir / "multimodule.status.json").read_bytes())
    assert status["pid"] == first.pid
    assert before - 1 <= status["start_time"] <= time.time()
    assert status["argv"][-2:] == ["-s", str(mm.state_dir)]
    assert "-c" in status["argv"] and str(mm.config_path) in status["argv"]
    # When a second daemon is started on the same state dir
    started = time.monotonic()
    second = mm.run_daemon(timeout=15)
    # Then it exits at once with status 1 naming the first daemon's pid
    assert second.returncode == 1, second
    assert time.monotonic() - started < 10
    assert f"pid {first.pid}" in second.stderr, second.stderr
    assert "running (pid" not in second.stdout
    assert "Traceback" not in second.stderr, second.stderr
    # and the first daemon, its lock and status file are untouched
    assert first.proc.poll() is None
    assert orjson.loads((mm.state_dir / "multimodule.status.json").read_bytes()) == status
    status_code, out, _ = mm.mmctl("status", "--json")
    assert status_code == 0 and orjson.loads(out)["pid"] == first.pid
    # When the first stops, the status file goes and a new daemon may start
    first.stop_ok()
    assert not (mm.state_dir / "multimodule.status.json").exists()
    third = mm.start()
    assert orjson.loads((mm.state_dir / "multimodule.status.json").read_bytes())["pid"] == \
        third.pid


def test_daemons_on_different_state_dirs_coexist(mm, tmp_path):
    # Given a running daemon / When another starts on another state dir (and control queue)
    # Then both run
    mm.config(router_section())
    mm.start()
    other = mm.start("-q", "Other_control", state_dir=tmp_path / "other-state")
    assert other.proc.poll() is None


def test_invalid_toml_at_startup_exits_1_naming_file_and_line(mm):
    # Given a config file with a syntax error on line 2
    mm.config('[Router]\nroutes = [ { match = \n')
    # When the daemon starts / Then it exits 1, naming the file and the line
    result = mm.run_daemon()
    assert result.returncode == 1, result
    assert str(mm.config_path) in result.stderr and "line 2" in result.stderr, result.stderr
    assert "running (pid" not in result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    # and it released its lock: no status file is left behind
    assert not (mm.state_dir / "multimodule.status.json").exists()


def test_invalid_reserved_key_at_startup_exits_1_naming_file_and_field(mm):
    # Given a config with a negative interval / When the daemon starts / Then it exits 1
    mm.config("[Ticker]\nintervals = { tick = -1 }\n")
    result = mm.run_daemon()
    assert result.returncode == 1, result
    assert str(mm.config_path) in result.stderr, result.stderr
    assert "Ticker.intervals.tick" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_missing_config_file_at_startup_exits_1_naming_it(mm, tmp_path):
    # Given a config path that does not exist / When the daemon starts / Then it exits 1
    missing = tmp_path / "nope.toml"
    result = mm.run_daemon(config=missing)
    assert result.returncode == 1, result
    assert f"{missing}: cannot read" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_invalid_router_routes_at_startup_exits_1_naming_file_and_field(mm):
    # Given a config whose Router route has no forwards
    mm.config('[Router]\nroutes = [ { match = { source = "A" } } ]\n')
    # When the daemon starts
    daemon = mm.start(wait=False)
    # Then it reports the file and the field
    line = daemon.expect("stderr", "Router.routes.0.forwards")
    assert str(mm.config_path) in line, line
    # and refuses to run (a daemon without its Router would lose every emitted message)
    assert daemon.wait_exit(5) == 1, daemon.output()
    assert not daemon.lines_matching("stdout", "running (pid")
    assert not daemon.lines_matching("stderr", "Traceback"), daemon.output()


def test_bad_oob_spec_exits_2(mm):
    # When the daemon is given an unknown -o channel / Then it exits 2 (usage) naming it
    result = mm.run_daemon("-o", "nochannel:1", config=False)
    assert result.returncode == 2, result
    assert "unknown out-of-band channel 'nochannel'" in result.stderr


ECHO = """
    from multimodule import Task

    class Echo(Task):
        def message(self, message):
            self.emit({"n": message["n"]})
"""


def test_configured_task_without_module_reported_others_keep_running(mm, transit):
    # Given a config naming a task that has no module, beside a working one
    mm.task("Echo", ECHO)
    mm.config("[Echo]\n\n[NoSuchModule]\nx = 1\n\n"
              + router_section(route("Echo", "out")))
    # When the daemon starts
    daemon = mm.start()
    # Then the missing task is reported on stderr by name
    line = daemon.expect("stderr", "cannot load task NoSuchModule")
    assert "no task 'NoSuchModule'" in line, line
    # and the other task works
    transit.send("Echo", {"n": 1})
    assert transit.receive("out", timeout=10)["n"] == 1


def test_task_whose_constructor_raises_reported_others_keep_running(mm, transit):
    mm.task("Echo", ECHO)
    mm.task("BadInit", """
        from multimodule import Task

        class BadInit(Task):
            def __init__(self):
                raise RuntimeError("cannot construct")
    """)
    # Given a task whose constructor raises, beside a working one
    mm.config("[BadInit]\n\n[Echo]\n\n" + router_section(route("Echo", "out")))
    # When the daemon starts / Then the failure is reported and the other task works
    daemon = mm.start()
    line = daemon.expect("stderr", "task BadInit failed to start")
    assert "RuntimeError: cannot construct" in line, line
    transit.send("Echo", {"n": 2})
    assert transit.receive("out", timeout=10)["n"] == 2
    status, out, _ = mm.mmctl("status", "--json")
    report = orjson.loads(out)
    assert "BadInit" not in report["tasks"] and "BadInit" in report["import_failures"]


def test_stateless_task_marked_external_refused_naming_file_and_field(mm):
    mm.task("Echo", ECHO)
    # Given a stateless task marked is_external (only stateful tasks run external)
    mm.config("[Echo]\nis_external = true\n\n" + router_section(route("Echo", "out")))
    # When the daemon starts / Then it refuses the config, naming file and field, and exits 1
    daemon = mm.start(wait=False)
    line = daemon.expect("stderr", "Echo.is_external: only a stateful task runs external")
    assert str(mm.config_path) in line, line
    assert daemon.wait_exit(5) == 1, daemon.output()


def test_sigint_stops_cleanly_like_sigterm(mm, transit):
    mm.task("Echo", ECHO)
    # Given a running daemon / When it gets SIGINT / Then it stops cleanly with status 0
    mm.config("[Echo]\n\n" + router_section(route("Echo", "out")))
    daemon = mm.start()
    daemon.proc.send_signal(signal.SIGINT)
    assert daemon.wait_exit(10) == 0, daemon.output()
    daemon.expect("stdout", "stopping:")
    assert not (mm.state_dir / "multimodule.status.json").exists()


def test_second_daemon_on_same_transit_dir_exits_1_unless_its_control_queue_differs(
        mm, tmp_path):
    # Given a daemon running on a transit dir (it holds the control queue's lock there)
    mm.config(router_section())
    first = mm.start()
    lock = mm.transit_dir / ".daemon-MultiModule_control.lock"
    assert lock.exists()
    # When a second daemon starts on the same transit dir with another state dir
    second = mm.run_daemon(state_dir=tmp_path / "state2", timeout=15)
    # Then it exits 1 naming the first daemon's pid and the lock
    assert second.returncode == 1, second
    assert f"pid {first.pid}" in second.stderr, second.stderr
    assert lock.name in second.stderr, second.stderr
    assert "running (pid" not in second.stdout
    assert "Traceback" not in second.stderr, second.stderr
    # and left nothing behind in its state dir; the first still answers
    assert not (tmp_path / "state2" / "multimodule.status.json").exists()
    status, out, err = mm.mmctl("status", "--json")
    assert status == 0 and orjson.loads(out)["pid"] == first.pid, err
    # When it is started with a different control queue instead
    third = mm.start("-q", "Other_control", state_dir=tmp_path / "state3")
    # Then it runs beside the first, answering on its own control queue
    assert (mm.transit_dir / ".daemon-Other_control.lock").exists()
    status, out, err = mm.mmctl("status", "-q", "Other_control", "--json")
    assert status == 0 and orjson.loads(out)["pid"] == third.pid, err
    status, out, err = mm.mmctl("status", "--json")
    assert status == 0 and orjson.loads(out)["pid"] == first.pid, err
    third.stop_ok()
    first.stop_ok()


def test_the_process_of_an_unknown_external_task_exits_1(mm):
    # Given no task module Nosuchtask / When its process is started (as its unit would)
    mm.config("")
    result = mm.run_daemon("-m", "Nosuchtask")
    # Then it exits 1 naming the task, instead of running with no task
    assert result.returncode == 1, result
    assert "Nosuchtask" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert "running (pid" not in result.stdout


def test_the_process_of_a_stateless_task_is_refused(mm):
    # Given a stateless task (the daemon's copy serves its queue)
    mm.task("Plain", "from multimodule import Task\n\nclass Plain(Task):\n"
                     "    def message(self, message):\n        pass\n")
    mm.config("[Plain]\n")
    # When its own process is started / Then it exits 1: a second reader would take half
    result = mm.run_daemon("-m", "Plain")
    assert result.returncode == 1, result
    assert "stateless" in result.stderr and "running (pid" not in result.stdout, result


async def test_what_start_up_made_is_out_of_the_collectors_reach_until_the_stop(inproc):
    import gc

    inproc.task("Idle", """
        from multimodule import Task
        class Idle(Task):
            def message(self, message):
                pass
    """)
    inproc.config("[Idle]\n")
    before = gc.get_freeze_count()
    daemon = await inproc.start()
    # Then the task and everything else made at start-up is frozen (not walked by full
    # collections), and a message handled afterwards is collected as usual
    frozen = gc.get_freeze_count()
    assert frozen > before + 1000
    task = daemon.registry.runners["Idle"].task
    assert all(obj is not task for obj in gc.get_objects())  # not walked by a collection
    assert await inproc.stop() == 0
    assert gc.get_freeze_count() == 0


def test_an_external_tasks_process_does_not_import_the_monitor():
    # The process of one external task (multimodule -m NAME) imports what it runs, not what
    # only the daemon uses: the resource monitor (its levels are config) and psutil
    code = ("import sys, multimodule.cli.daemon, multimodule.runtime.task_process; "
            "print(sorted(m for m in sys.modules if m in ('psutil', 'multimodule.monitor.monitor', "
            "'multimodule.monitor.sources', 'multimodule.runtime.monitoring')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]", out
