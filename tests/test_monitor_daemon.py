"""The resource monitor in a real daemon: alerts on level changes, failsafe (automatic, by
hand, across restarts), flapping, per-task thresholds, status and top, Prometheus.

External tasks run as detached processes here (the systemd backend is covered in the
container tests). Alerts are read where an operator's Router would send them: each test
routes ``source = "MultiModule"`` to the queue ``alerts``. The monitor samples every 0.1 s
over a 1 s window, so levels move within a second or two.
"""

from __future__ import annotations

import json
import os
import urllib.request

import pytest

from multimodule.errors import QueueFull

from helpers import receive_n, receive_until, route, router_section
from test_runtime_external import alive

FAST = ("--monitor-interval", "0.1", "--monitor-window", "1")

ALERTS = route("MultiModule", "alerts")


def alert_for(transit, task, predicate=lambda m: True, timeout=20.0):
    """The next alert about ``task`` that satisfies ``predicate`` (earlier ones skipped)."""
    return receive_until(transit, "alerts",
                         lambda m: m.get("task") == task and predicate(m), timeout=timeout)[0]


def levels_seen(transit, task, metric, until_level, timeout=20.0):
    """The levels of ``task``'s ``metric`` alerts, in order, up to ``until_level``."""
    seen = []
    receive_until(transit, "alerts",
                  lambda m: (m.get("task") == task and m.get("type") == "alert"
                             and m.get("metric") == metric and not seen.append(m["level"])
                             and m["level"] == until_level), timeout=timeout)
    return seen


def status(mm):
    code, out, err = mm.mmctl("status", "--json")
    assert code == 0, err
    return json.loads(out)


def row(mm, name):
    rows = {r["name"]: r for r in status(mm)["rows"]}
    return rows.get(name)


LEAKER = """
    import os
    from multimodule import Task

    class Leaker(Task):
        is_stateful = True

        def set_config(self, config):
            self.hoard = []
            self.leaking = config.get("leak", True)
            self.named_recur("tick", 0.05, self.tick)

        def tick(self):
            self.state["ticks"] = self.state.get("ticks", 0) + 1
            if self.leaking:
                self.hoard.append(b"x" * 2_000_000)  # touched: resident at once
            self.emit({"ticks": self.state["ticks"], "pid": os.getpid()})
"""

MEMORY_LEVELS = ("[Leaker.monitor.memory_bytes]\nwarn = 150e6\nsevere = 200e6\n"
                 "failsafe = 250e6\n")


def test_memory_leak_alerts_in_order_then_failsafe_survives_restart_until_unfailsafe(
        mm, transit):
    mm.task("Leaker", LEAKER)
    mm.config("[Leaker]\nis_external = true\nintervals = { save_state = 0.05 }\n"
              + MEMORY_LEVELS + router_section(ALERTS, route("Leaker", "out")))
    # Given an external task leaking 2 MB every 50 ms, with its own memory levels
    daemon = mm.start(*FAST)
    pid = receive_until(transit, "out", lambda m: True)[0]["pid"]
    # Then warn, severe and failsafe come in that order
    assert levels_seen(transit, "Leaker", "memory_bytes", "failsafe") == \
        ["warn", "severe", "failsafe"]
    # And the task is put in failsafe: an alert saying so, its process stopped, marked
    stopped = alert_for(transit, "Leaker", lambda m: m["type"] == "failsafe")
    assert "memory_bytes reached" in stopped["reason"]
    daemon.expect("stdout", "task Leaker stopped (failsafe)")
    assert not alive(pid)
    assert row(mm, "Leaker")["state"] == "failsafe"
    assert "Leaker" in json.loads((mm.state_dir / "failsafe.json").read_text())
    ticks = json.loads(mm.state_file("Leaker").read_text())["ticks"]
    # When the daemon restarts (the leak now switched off in the config)
    daemon.stop_ok()
    mm.config("[Leaker]\nis_external = true\nleak = false\nintervals = { save_state = 0.05 }\n"
              + MEMORY_LEVELS + router_section(ALERTS, route("Leaker", "out")))
    daemon = mm.start(*FAST)
    # Then the task stays stopped, and says why
    daemon.wait_line("stdout", "task Leaker stays stopped: in failsafe", start=0)
    assert row(mm, "Leaker")["state"] == "failsafe"
    assert not (mm.state_dir / "task-Leaker.figures.json").exists()
    # When an operator clears it
    code, _, err = mm.mmctl("unfailsafe", "Leaker")
    assert code == 0, err
    # Then it runs again, in a new process, with its state where it was left
    message = receive_until(transit, "out", lambda m: m["pid"] != pid)[0]
    assert message["ticks"] == ticks + 1
    assert alive(message["pid"])
    # And unfailsafe on a task not in failsafe is refused
    code, _, err = mm.mmctl("unfailsafe", "Leaker")
    assert code == 1 and "not in failsafe" in err


def test_cpu_spinner_reaches_failsafe_and_is_stopped(mm, transit):
    mm.task("Spinner", """
        import os, time
        from multimodule import Task

        class Spinner(Task):
            is_stateful = True

            def set_config(self, config):
                self.named_recur("spin", 0.05, self.spin)
                self.emit({"pid": os.getpid()})

            def spin(self):
                end = time.thread_time() + 0.04
                while time.thread_time() < end:
                    pass
    """)
    mm.config("[Spinner]\nis_external = true\n"
              "[Spinner.monitor.cpu_cores]\nwarn = 0.2\nsevere = 0.3\nfailsafe = 0.5\n"
              + router_section(ALERTS, route("Spinner", "out")))
    # Given an external task using about 0.8 of a core, over thresholds set low for it
    mm.start(*FAST)
    pid = receive_until(transit, "out", lambda m: True)[0]["pid"]
    # Then its cpu_cores level reaches failsafe and it is stopped
    seen = levels_seen(transit, "Spinner", "cpu_cores", "failsafe")
    assert seen[-1] == "failsafe" and "ok" not in seen
    stopped = alert_for(transit, "Spinner", lambda m: m["type"] == "failsafe")
    assert "cpu_cores reached" in stopped["reason"]
    assert _wait_gone(pid)


def _wait_gone(pid, timeout=20.0):
    """Wait for ``pid`` to end (its pidfd becomes readable: no polling)."""
    import select

    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def test_fd_leak_reaches_failsafe(mm, transit):
    mm.task("Opener", """
        import os
        from multimodule import Task

        class Opener(Task):
            is_stateful = True

            def set_config(self, config):
                self.files = []
                self.named_recur("open", 0.02, self.open_one)
                self.emit({"pid": os.getpid()})

            def open_one(self):
                self.files.append(open(os.devnull))
    """)
    mm.config("[Opener]\nis_external = true\n"
              "[Opener.monitor.open_fds]\nwarn = 60\nsevere = 90\nfailsafe = 120\n"
              + router_section(ALERTS, route("Opener", "out")))
    # Given an external task opening 50 files a second
    mm.start(*FAST)
    pid = receive_until(transit, "out", lambda m: True)[0]["pid"]
    # Then open_fds goes warn, severe, failsafe, and the task is stopped
    assert levels_seen(transit, "Opener", "open_fds", "failsafe") == \
        ["warn", "severe", "failsafe"]
    assert _wait_gone(pid)
    assert row(mm, "Opener")["state"] == "failsafe"


def test_queue_filling_alerts_but_never_stops_the_task(mm, transit):
    mm.task("Slow", """
        import asyncio
        from multimodule import Task

        class Slow(Task):
            def set_config(self, config):
                if not hasattr(self, "gate"):
                    self.gate = asyncio.Event()
                if config.get("open"):
                    self.gate.set()

            async def message(self, message):
                await self.gate.wait()
                self.emit({"n": message["n"]})
    """)
    mm.config("[Slow]\n" + router_section(ALERTS, route("Slow", "out")))
    # Given a task that handles nothing until its gate opens
    mm.start(*FAST)
    # When its System V queue is filled (past what the daemon takes into memory)
    queue = transit.sysv_queue("Slow")
    sent = 0
    pad = "x" * 300
    while True:
        try:
            # The daemon takes 256 into memory, then stops taking: the queue stays full.
            transit.send("Slow", {"n": sent, "pad": pad}, timeout=0.5)
        except QueueFull:
            break
        sent += 1
    assert sent > 256 and queue.stat().fill > 0.95
    # Then the fill alerts rise to the top level, and the task is not stopped
    assert levels_seen(transit, "Slow", "queue_fill", "failsafe")[-1] == "failsafe"
    r = row(mm, "Slow")
    assert r["state"] == "running" and r["levels"]["queue_fill"] == "failsafe"
    assert status(mm)["failsafe"] == {}
    # When the gate opens, everything is delivered in order and the level goes back to ok
    assert mm.mmctl("config", "Slow", '{"open": true}')[0] == 0
    assert [m["n"] for m in receive_n(transit, "out", sent, timeout=30)] == list(range(sent))
    assert levels_seen(transit, "Slow", "queue_fill", "ok")[-1] == "ok"


def test_flapping_task_is_put_in_failsafe(mm, transit):
    mm.task("Crasher", """
        import os
        from multimodule import Task

        class Crasher(Task):
            is_stateful = True

            def set_config(self, config):
                self.emit({"pid": os.getpid()})
                self.named_recur("crash", 0.2, lambda: os._exit(3))
    """)
    mm.config("[Crasher]\nis_external = true\n"
              "[Crasher.monitor.restarts]\nwarn = 1\nsevere = 1\nfailsafe = 2\n"
              + router_section(ALERTS, route("Crasher", "out")))
    # Given an external task that crashes 0.2 s after each start (restarted after 1 s, 2 s)
    daemon = mm.start(*FAST)
    # Then after its second restart it is flapping: failsafe, with an alert that says so
    assert levels_seen(transit, "Crasher", "restarts", "failsafe", timeout=30)[-1] == "failsafe"
    stopped = alert_for(transit, "Crasher", lambda m: m["type"] == "failsafe")
    assert stopped["reason"].startswith("flapping: 2 restarts")
    daemon.expect("stdout", "task Crasher stopped (failsafe)")
    # And it is not started again
    assert row(mm, "Crasher")["state"] == "failsafe"
    assert "Crasher" not in status(mm)["externals"]


FAULTY = """
    from multimodule import Task

    class {name}(Task):
        def message(self, message):
            raise ValueError("bad input " + str(message.get("n")))
"""


def test_message_failures_alert_with_a_per_task_override(mm, transit):
    mm.task("FaultyA", FAULTY.format(name="FaultyA"))
    mm.task("FaultyB", FAULTY.format(name="FaultyB"))
    mm.config("[FaultyA]\n[FaultyB.monitor.message_failures]\nwarn = 3\n"
              + router_section(ALERTS))
    # Given two tasks whose handler raises; B's own threshold is 3 failures, A's the default 1
    mm.start(*FAST)
    # When each fails once
    transit.send("FaultyB", {"n": 1})
    transit.send("FaultyA", {"n": 1})
    # Then A gets a message-failure alert at once
    alert = alert_for(transit, "FaultyA", lambda m: m["metric"] == "message_failures")
    assert alert["level"] == "warn" and alert["value"] == 1
    assert alert["source"] == "MultiModule" and "message_failures 1: ok -> warn" in alert["text"]
    # And B, with the same one failure counted, stays ok
    b = row(mm, "FaultyB")
    assert b["message_failures"] == 1 and b["levels"]["message_failures"] == "ok"
    assert "ValueError: bad input 1" in b["last_error"]
    # When B fails twice more, it reaches its own level
    transit.send("FaultyB", {"n": 2})
    transit.send("FaultyB", {"n": 3})
    alert = alert_for(transit, "FaultyB", lambda m: m["metric"] == "message_failures")
    assert alert["level"] == "warn" and alert["value"] == 3
    # And with no more failures the window empties and both go back to ok
    assert alert_for(transit, "FaultyA", lambda m: m["metric"] == "message_failures")["level"] \
        == "ok"


COUNTER = """
    from multimodule import Task

    class Counter(Task):
        is_stateful = True

        def message(self, message):
            self.state["seen"] = self.state.get("seen", []) + [message["n"]]
            self.emit({"n": message["n"]})
"""


def test_internal_task_failsafe_by_hand_keeps_messages_and_state(mm, transit):
    mm.task("Counter", COUNTER)
    mm.config("[Counter]\nintervals = { save_state = 0.05 }\n"
              + router_section(ALERTS, route("Counter", "out")))
    daemon = mm.start(*FAST)
    transit.send("Counter", {"n": 0})
    assert receive_n(transit, "out", 1)[0]["n"] == 0
    # When an operator puts the internal task in failsafe
    code, _, err = mm.mmctl("failsafe", "Counter", "--reason", "maintenance")
    assert code == 0, err
    # Then it is unloaded and reported so, with an alert to the Router
    assert alert_for(transit, "Counter", lambda m: m["type"] == "failsafe")["reason"] == \
        "maintenance"
    assert row(mm, "Counter")["state"] == "failsafe"
    assert status(mm)["failsafe"]["Counter"]["reason"] == "maintenance"
    assert "Counter" not in status(mm)["tasks"]
    code, out, err = mm.mmctl("state", "Counter")
    assert code == 0 and json.loads(out) == {"seen": [0]} and "as last saved" in err
    code, out, _ = mm.mmctl("config", "Counter")
    assert code == 0 and json.loads(out)["intervals"] == {"save_state": 0.05}
    # And messages sent to it meanwhile wait in its queue (also across a daemon restart)
    for n in (1, 2, 3):
        transit.send("Counter", {"n": n})
    daemon.stop_ok()
    daemon = mm.start(*FAST)
    daemon.wait_line("stdout", "task Counter stays stopped", start=0)
    transit.send("Counter", {"n": 4})
    assert transit.stat("Counter").messages == 4
    # A second failsafe is refused, and so is migrating it
    code, _, err = mm.mmctl("failsafe", "Counter")
    assert code == 1 and "already in failsafe" in err
    code, _, err = mm.mmctl("migrate", "Counter", "--external")
    assert code == 1 and "mmctl unfailsafe Counter" in err
    # When it is cleared
    assert mm.mmctl("unfailsafe", "Counter")[0] == 0
    # Then the waiting messages are handled in order and the state went on
    assert [m["n"] for m in receive_n(transit, "out", 4)] == [1, 2, 3, 4]
    code, out, _ = mm.mmctl("state", "Counter")
    assert code == 0 and json.loads(out)["seen"] == [0, 1, 2, 3, 4]


def test_failsafe_refusals(mm, transit):
    mm.config(router_section(ALERTS))
    mm.start(*FAST)
    code, _, err = mm.mmctl("failsafe", "Router")
    assert code == 1 and "Router is never put in failsafe" in err
    code, _, err = mm.mmctl("failsafe", "Nobody")
    assert code == 4 and "no task 'Nobody'" in err
    result = mm.mmctl_proc("failsafe", "not-a-name")
    assert result.returncode == 2 and "is not a task name" in result.stderr


def test_status_json_rows_and_top(mm, transit):
    mm.task("Counter", COUNTER)
    mm.task("Leaker", LEAKER)
    mm.config("[Counter]\n[Leaker]\nis_external = true\nleak = false\n"
              + router_section(route("Counter", "out"), route("Leaker", "ticks")))
    mm.start(*FAST)
    receive_until(transit, "ticks", lambda m: True)
    for n in range(20):
        transit.send("Counter", {"n": n})
    receive_n(transit, "out", 20)
    # Wait for a sample that has seen the external's process and the messages
    rows = {}
    for _ in range(100):
        rows = {r["name"]: r for r in status(mm)["rows"]}
        if (rows.get("Leaker", {}).get("memory_bytes") and rows["Counter"]["messages_in"] == 20
                and (rows["Leaker"].get("messages_out") or 0) > 0):
            break
        receive_until(transit, "ticks", lambda m: True)  # the next tick: time has passed
    fields = {"name", "kind", "state", "pid", "where", "level", "levels", "messages_in_per_s",
              "messages_out_per_s", "cpu_percent", "memory_bytes", "open_fds", "threads",
              "queue_fill", "queue_depth", "restarts", "message_failures", "last_error",
              "windows"}
    counter, leaker, daemon = rows["Counter"], rows["Leaker"], rows["MultiModule"]
    assert fields <= set(counter) and fields <= set(leaker)
    assert counter["kind"] == "internal" and counter["state"] == "running"
    assert counter["messages_in"] == 20 and counter["messages_in_per_s"] >= 0
    assert counter["queue_fill"] == 0.0 and counter["message_failures"] == 0
    assert leaker["kind"] == "external" and leaker["state"] == "running"
    assert alive(leaker["pid"]) and leaker["where"].endswith("task-Leaker.lock")
    assert leaker["memory_bytes"] > 10_000_000 and leaker["open_fds"] > 3
    assert leaker["threads"] >= 1 and leaker["restarts"] == 0
    assert leaker["messages_out"] > 0  # counters written by the external process
    assert daemon["kind"] == "daemon" and daemon["pid"] == status(mm)["pid"]
    assert set(leaker["windows"]["memory_bytes"]) == {"short", "long"}
    # The table and top show the same rows
    code, out, _ = mm.mmctl("status")
    lines = out.splitlines()
    assert lines[1].split()[:5] == ["TASK", "KIND", "PID/UNIT", "STATE", "LEVEL"]
    assert any(line.split()[:4] == ["Leaker", "external", str(leaker["pid"]), "running"]
               for line in lines)
    code, out, _ = mm.mmctl("top", "-n", "2", "--interval", "0.1")
    assert code == 0 and out.count("TASK  ") == 2 and "Counter" in out


def test_prometheus_exposition(mm, transit, unused_tcp_port):
    mm.task("Counter", COUNTER)
    mm.config("[Counter]\n" + router_section(route("Counter", "out")))
    daemon = mm.start(*FAST, "--metrics-listen", f"127.0.0.1:{unused_tcp_port}")
    daemon.expect("stdout", "serving metrics on")
    transit.send("Counter", {"n": 1})
    receive_n(transit, "out", 1)
    body = urllib.request.urlopen(f"http://127.0.0.1:{unused_tcp_port}/metrics",
                                  timeout=10).read().decode()
    assert 'multimodule_task_level{kind="internal",task="Counter"} 0.0' in body
    assert 'multimodule_task_running{kind="internal",task="Counter"} 1.0' in body
    assert "# TYPE multimodule_task_messages_in_per_second gauge" in body
    assert 'multimodule_task_open_fds{kind="daemon",task="MultiModule"}' in body


@pytest.fixture
def unused_tcp_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_failsafe_of_a_hung_async_handler_returns_the_rest_to_its_queue(mm, transit):
    mm.task("Hang", """
        import asyncio
        from multimodule import Task

        class Hang(Task):
            async def message(self, message):
                self.emit({"n": message["n"]})
                await asyncio.sleep(3600)
    """)
    mm.config("[Hang]\n" + router_section(ALERTS, route("Hang", "out")))
    daemon = mm.start(*FAST)
    # Given a handler that never returns, with two more messages behind it in memory
    for n in range(3):
        transit.send("Hang", {"n": n})
    assert receive_n(transit, "out", 1)[0]["n"] == 0
    # When it is put in failsafe
    code, _, err = mm.mmctl("failsafe", "Hang", "--wait", "30")
    # Then after the stop's grace period the hung handler is cancelled, the task stops, and
    # the messages it never got are back in its queue (for after unfailsafe), not lost
    assert code == 0, err
    daemon.expect("stderr", "2 messages in memory go back to its queue")
    assert transit.stat("Hang").messages == 2
    assert [m["n"] for m in receive_n(transit, "Hang", 2)] == [1, 2]
    # And the daemon still stops in order
    daemon.stop_ok()


def test_config_for_a_task_in_failsafe_is_checked_against_its_model(mm, transit):
    mm.task("Typed", """
        from pydantic import BaseModel
        from multimodule import Task

        class Typed(Task):
            class Config(BaseModel):
                n: int

            def message(self, message):
                self.emit({"n": self.settings.n})
    """)
    mm.config("[Typed]\nn = 2\n" + router_section(route("Typed", "out")))
    mm.start(*FAST)
    assert mm.mmctl("failsafe", "Typed")[0] == 0
    # When a bad config is sent while it is stopped: refused, naming the field
    code, _, err = mm.mmctl("config", "Typed", '{"n": "abc"}')
    assert code == 1 and "Typed.n" in err
    # And a good one is taken, and used once it runs again
    assert mm.mmctl("config", "Typed", '{"n": 5}')[0] == 0
    assert mm.mmctl("unfailsafe", "Typed")[0] == 0
    transit.send("Typed", {})
    assert receive_n(transit, "out", 1)[0]["n"] == 5


def test_a_malformed_failsafe_file_is_read_as_far_as_it_makes_sense(mm, transit):
    mm.task("Counter", COUNTER)
    mm.config("[Counter]\n" + router_section(route("Counter", "out")))
    mm.state_dir.mkdir(exist_ok=True)
    (mm.state_dir / "failsafe.json").write_text(
        '{"Counter": {"since": "yesterday", "reason": "line\\nbreak"}, "Router": {}}')
    # Then the daemon starts, holds Counter (the odd date dropped), and never the Router
    daemon = mm.start(*FAST)
    daemon.wait_line("stdout", "task Counter stays stopped: in failsafe (line break)")
    daemon.wait_line("stderr", "the Router is never held in failsafe; ignored", start=0)
    assert status(mm)["failsafe"]["Counter"]["since"] is None
    assert mm.mmctl("unfailsafe", "Counter")[0] == 0
    transit.send("Counter", {"n": 1})
    assert receive_n(transit, "out", 1)[0]["n"] == 1
