"""The resource monitor in a real daemon: alerts on level changes, failsafe (automatic, by
hand, across restarts), flapping, per-task thresholds, status and top, Prometheus.

Figures of real processes (memory, CPU and descriptors of an external task), status and top
with an external task, and Prometheus over HTTP run a daemon subprocess whose external tasks
are detached processes (the systemd backend is covered in the container tests); there the
monitor samples every 0.1 s over a 1 s window, so levels move within a second or two. The
monitor's logic (queue fill, flapping from the restarts a backend reports, message failures,
failsafe by hand and from a file, a hung handler) runs the daemon in-process (see
tests/inprocess.py) with a manual clock: each sample is taken by the test, after moving the
clock. Alerts are read where an operator's Router would send them: each test routes
``source = "MultiModule"`` to the queue ``alerts``.
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.request

import pytest

from multimodule.errors import QueueFull
from multimodule.runtime.runner import TaskRunner

from helpers import receive_n, receive_until, route, router_section, saved_state
from inprocess import ManualClock
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


# -- the in-process daemon -------------------------------------------------------------------

#: Seconds the manual clock moves between two samples (the harness's window is 7200 s).
STEP_S = 60.0


async def sample(inproc, clock: ManualClock, step: float = STEP_S,
                 ignoring: tuple[str, ...] = ()) -> None:
    """Once what was sent is handled, move the clock by ``step``, take one sample, and wait
    until its alerts are routed (``ignoring``: tasks held up on purpose, see
    ``inproc.quiet``)."""
    await inproc.quiet(ignoring=ignoring)
    clock.advance(step)
    await inproc.daemon.monitor.sample()
    await inproc.quiet(ignoring=ignoring)


def alerts_about(inproc, task, predicate=lambda m: True) -> list[dict]:
    """The alerts about ``task`` routed to "alerts" since the last call that satisfy
    ``predicate`` (the others taken away with them)."""
    return [m for m in inproc.taken("alerts") if m.get("task") == task and predicate(m)]


async def inproc_status(inproc, ignoring: tuple[str, ...] = ()) -> dict:
    return (await inproc.control(query="status", ignoring=ignoring))["status"]


async def inproc_row(inproc, name, ignoring: tuple[str, ...] = ()) -> dict | None:
    rows = (await inproc_status(inproc, ignoring))["rows"]
    return {r["name"]: r for r in rows}.get(name)


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
                self.hoard.append(b"x" * 8_000_000)  # touched: resident at once
            self.emit({"ticks": self.state["ticks"], "pid": os.getpid()})
"""

MEMORY_LEVELS = ("[Leaker.monitor.memory_bytes]\nwarn = 150e6\nsevere = 200e6\n"
                 "failsafe = 250e6\n")


def test_memory_leak_alerts_in_order_then_failsafe_survives_restart_until_unfailsafe(
        mm, transit):
    mm.task("Leaker", LEAKER)
    mm.config("[Leaker]\nis_external = true\nintervals = { save_state = 0.05 }\n"
              + MEMORY_LEVELS + router_section(ALERTS, route("Leaker", "out")))
    # Given an external task leaking 8 MB every 50 ms, with its own memory levels
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
    ticks = saved_state(mm.state_file("Leaker"))["ticks"]
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
                self.named_recur("open", 0.02, self.open_two)
                self.emit({"pid": os.getpid()})

            def open_two(self):
                self.files += [open(os.devnull), open(os.devnull)]
    """)
    mm.config("[Opener]\nis_external = true\n"
              "[Opener.monitor.open_fds]\nwarn = 60\nsevere = 90\nfailsafe = 120\n"
              + router_section(ALERTS, route("Opener", "out")))
    # Given an external task opening 100 files a second
    mm.start(*FAST)
    pid = receive_until(transit, "out", lambda m: True)[0]["pid"]
    # Then open_fds goes warn, severe, failsafe, and the task is stopped
    assert levels_seen(transit, "Opener", "open_fds", "failsafe") == \
        ["warn", "severe", "failsafe"]
    assert _wait_gone(pid)
    assert row(mm, "Opener")["state"] == "failsafe"


async def test_queue_filling_alerts_but_never_stops_the_task(inproc, transit):
    inproc.task("Slow", """
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
    inproc.config("[Slow]\n" + router_section(ALERTS, route("Slow", "out")))
    inproc.capture("alerts")
    inproc.capture("out")
    clock = ManualClock()
    # Given a task that handles nothing until its gate opens
    await inproc.start(clock=clock)
    # When another process fills its System V queue (past what the daemon takes into memory)
    queue = transit.sysv_queue("Slow")

    def fill() -> int:
        sent = 0
        pad = "x" * 300
        while True:
            try:
                # The daemon takes 256 into memory, then stops taking: the queue stays full.
                transit.send("Slow", {"n": sent, "pad": pad}, timeout=0.5)
            except QueueFull:
                return sent
            sent += 1

    sent = await asyncio.to_thread(fill)
    assert sent > 256 and queue.stat().fill > 0.95
    # Then the fill alerts rise to the top level (once the sample at start, of an empty
    # queue, has left the window), and the task is not stopped
    await sample(inproc, clock, step=7201, ignoring=("Slow",))
    levels = [m["level"] for m in alerts_about(inproc, "Slow", lambda m: m["type"] == "alert"
                                               and m["metric"] == "queue_fill")]
    assert levels[-1] == "failsafe", levels
    r = await inproc_row(inproc, "Slow", ignoring=("Slow",))
    assert r["state"] == "running" and r["levels"]["queue_fill"] == "failsafe"
    assert (await inproc_status(inproc, ignoring=("Slow",)))["failsafe"] == {}
    assert "Slow" in inproc.daemon.runners
    # When the gate opens, everything is delivered in order and the level goes back to ok
    assert await inproc.control(config={"Slow": {"open": True}}) == {"ok": True}
    assert [m["n"] for m in inproc.taken("out")] == list(range(sent))
    await sample(inproc, clock, step=7201)  # the full queue's samples have left the window
    levels = [m["level"] for m in alerts_about(inproc, "Slow", lambda m: m["type"] == "alert"
                                               and m["metric"] == "queue_fill")]
    assert levels[-1] == "ok", levels


async def test_flapping_task_is_put_in_failsafe(inproc):
    inproc.task("Crasher", """
        from multimodule import Task

        class Crasher(Task):
            is_stateful = True

            def message(self, message):
                pass
    """)
    inproc.config("[Crasher]\nis_external = true\n"
                  "[Crasher.monitor.restarts]\nwarn = 1\nsevere = 1\nfailsafe = 2\n"
                  + router_section(ALERTS))
    inproc.capture("alerts")
    clock = ManualClock()
    # Given an external task seen running, whose backend then reports it restarted once, then
    # twice (the detached backend's own count of real crashes: test_runtime_external)
    daemon = await inproc.start(clock=clock)
    assert "Crasher" in daemon.externals
    seen = []
    for restarts in (0, 1, 2):
        inproc.backend.restarts["Crasher"] = restarts
        await sample(inproc, clock)
        seen += alerts_about(inproc, "Crasher")
    # Then after its second restart it is flapping: failsafe, with an alert that says so
    levels = [m["level"] for m in seen if m["type"] == "alert" and m["metric"] == "restarts"]
    assert levels[-1] == "failsafe", seen
    stopped = [m for m in seen if m["type"] == "failsafe"]
    assert stopped and stopped[0]["reason"].startswith("flapping: 2 restarts"), seen
    assert inproc.records_of("log", "task Crasher stopped (failsafe)")
    # And it is not started again: its process stopped, no start after the stop
    assert (await inproc_row(inproc, "Crasher"))["state"] == "failsafe"
    assert "Crasher" not in (await inproc_status(inproc))["externals"]
    calls = [(method, task) for method, task, _ in inproc.backend.calls if task == "Crasher"]
    assert ("stop", "Crasher") in calls
    assert ("start", "Crasher") not in calls[calls.index(("stop", "Crasher")):]
    assert "Crasher" not in inproc.backend.active


KEEPER = """
    from multimodule import Task

    class {name}(Task):
        is_stateful = True

        def set_config(self, config):
            self.kept = []

        def message(self, message):
            if message.get("keep") == "state":
                self.state.setdefault("kept", []).append("x" * message["size"])
            elif message.get("keep") == "attribute":
                self.kept.append(b"x" * message["size"])
            self.emit({{"n": message["n"]}})
"""

#: Memory levels set low for the tasks of the memory tests, bytes.
SMALL_MEMORY_LEVELS = "warn = 500e3\nsevere = 1e6\nfailsafe = 2e6\n"


def prometheus_lines(daemon, loop) -> list[str]:
    """The Prometheus exposition of ``daemon``'s monitor rows, as a scrape would get it (the
    collector runs in the server's thread, here a worker thread, and asks ``loop``)."""
    from prometheus_client import generate_latest
    from prometheus_client.registry import CollectorRegistry

    from multimodule.runtime.metrics import PrometheusCollector

    registry = CollectorRegistry()
    registry.register(PrometheusCollector(daemon.monitor.rows, loop))
    return generate_latest(registry).decode().splitlines()


@pytest.mark.parametrize("keep", ["state", "attribute"])
async def test_an_internal_task_keeping_memory_goes_to_failsafe_and_a_quiet_one_does_not(
        inproc, keep):
    for name in ("Keeper", "Quiet"):
        inproc.task(name, KEEPER.format(name=name))
    inproc.config("[Keeper]\n[Keeper.monitor.memory_bytes]\n" + SMALL_MEMORY_LEVELS
                  + "[Quiet]\n[Quiet.monitor.memory_bytes]\n" + SMALL_MEMORY_LEVELS
                  + router_section(ALERTS, route("Keeper", "out"), route("Quiet", "out")))
    inproc.capture("alerts")
    inproc.capture("out")
    clock = ManualClock()
    # Given two internal tasks with memory levels of 0.5, 1 and 2 MB, sampled small at start
    daemon = await inproc.start(clock=clock)
    for name in ("Keeper", "Quiet"):
        row = await inproc_row(inproc, name)
        assert 0 < row["memory_bytes"] < 100_000 and row["levels"]["memory_bytes"] == "ok"
    # When one keeps 3 MB (in its state, or in an attribute of its own) and the other
    # handles as many messages without keeping them
    for n in range(30):
        inproc.send("Keeper", {"n": n, "keep": keep, "size": 100_000})
        inproc.send("Quiet", {"n": n, "size": 100_000})
    await sample(inproc, clock, step=7201)  # the sample at start has left the window
    # Then the keeper's memory level goes to failsafe, and it is put in failsafe and stopped
    alerts = alerts_about(inproc, "Keeper")
    levels = [(m["metric"], m["level"]) for m in alerts if m["type"] == "alert"]
    assert levels == [("memory_bytes", "failsafe")], alerts
    value = alerts[0]["value"]
    assert 3_000_000 <= value < 3_600_000
    stopped = [m for m in alerts if m["type"] == "failsafe"]
    assert len(stopped) == 1 and stopped[0]["reason"].startswith("memory_bytes reached")
    assert inproc.records_of("log", "task Keeper stopped (failsafe)")
    assert "Keeper" not in daemon.runners
    assert (await inproc_row(inproc, "Keeper"))["state"] == "failsafe"
    # And the quiet one runs on, its figure small and its levels ok, with no alert
    assert alerts_about(inproc, "Quiet") == []
    quiet = await inproc_row(inproc, "Quiet")
    assert quiet["state"] == "running" and quiet["level"] == "ok"
    assert 0 < quiet["memory_bytes"] < 100_000
    # And its figure is in the status table and the Prometheus exposition
    code, out, _ = await inproc.mmctl("status")
    line = next(line.split() for line in out.splitlines() if line.startswith("Quiet "))
    assert code == 0 and line[1] == "internal" and line[8].endswith("KiB"), out
    exposition = await asyncio.to_thread(prometheus_lines, daemon,
                                         asyncio.get_running_loop())
    assert any(line.startswith('multimodule_task_memory_bytes{kind="internal",task="Quiet"}')
               for line in exposition), exposition
    assert any(line.startswith('multimodule_task_process_memory_bytes{kind="daemon"')
               for line in exposition)


FAULTY = """
    from multimodule import Task

    class {name}(Task):
        def message(self, message):
            raise ValueError("bad input " + str(message.get("n")))
"""


async def test_message_failures_alert_with_a_per_task_override(inproc):
    inproc.task("FaultyA", FAULTY.format(name="FaultyA"))
    inproc.task("FaultyB", FAULTY.format(name="FaultyB"))
    inproc.config("[FaultyA]\n[FaultyB.monitor.message_failures]\nwarn = 3\n"
                  + router_section(ALERTS))
    inproc.capture("alerts")
    clock = ManualClock()
    # Given two tasks whose handler raises; B's own threshold is 3 failures, A's the default 1
    await inproc.start(clock=clock)
    # When each fails once
    inproc.send("FaultyB", {"n": 1})
    inproc.send("FaultyA", {"n": 1})
    await sample(inproc, clock)
    # Then A gets a message-failure alert at once
    alerts = alerts_about(inproc, "FaultyA", lambda m: m["metric"] == "message_failures")
    assert len(alerts) == 1, alerts
    alert = alerts[0]
    assert alert["level"] == "warn" and alert["value"] == 1
    assert alert["source"] == "MultiModule" and "message_failures 1: ok -> warn" in alert["text"]
    # And B, with the same one failure counted, stays ok
    b = await inproc_row(inproc, "FaultyB")
    assert b["message_failures"] == 1 and b["levels"]["message_failures"] == "ok"
    assert "ValueError: bad input 1" in b["last_error"]
    # When B fails twice more, it reaches its own level
    inproc.send("FaultyB", {"n": 2})
    inproc.send("FaultyB", {"n": 3})
    await sample(inproc, clock)
    alerts = alerts_about(inproc, "FaultyB", lambda m: m["metric"] == "message_failures")
    assert [(a["level"], a["value"]) for a in alerts] == [("warn", 3)], alerts
    # And with no more failures the window empties and both go back to ok
    await sample(inproc, clock, step=7201)
    alerts = inproc.taken("alerts")
    for task in ("FaultyA", "FaultyB"):
        assert [a["level"] for a in alerts if a["task"] == task
                and a["metric"] == "message_failures"] == ["ok"], alerts


COUNTER = """
    from multimodule import Task

    class Counter(Task):
        is_stateful = True

        def message(self, message):
            self.state["seen"] = self.state.get("seen", []) + [message["n"]]
            self.emit({"n": message["n"]})
"""


async def test_internal_task_failsafe_by_hand_keeps_messages_and_state(inproc, transit):
    inproc.task("Counter", COUNTER)
    inproc.config("[Counter]\nintervals = { save_state = 0.05 }\n"
                  + router_section(ALERTS, route("Counter", "out")))
    inproc.capture("alerts")
    inproc.capture("out")
    daemon = await inproc.start()
    inproc.send("Counter", {"n": 0})
    assert (await inproc.next("out"))["n"] == 0
    # When an operator puts the internal task in failsafe
    code, _, err = await inproc.mmctl("failsafe", "Counter", "--reason", "maintenance")
    assert code == 0, err
    await inproc.quiet()
    # Then it is unloaded and reported so, with an alert to the Router
    failsafe = alerts_about(inproc, "Counter", lambda m: m["type"] == "failsafe")
    assert [m["reason"] for m in failsafe] == ["maintenance"]
    assert (await inproc_row(inproc, "Counter"))["state"] == "failsafe"
    assert (await inproc_status(inproc))["failsafe"]["Counter"]["reason"] == "maintenance"
    assert "Counter" not in (await inproc_status(inproc))["tasks"]
    assert "Counter" not in daemon.runners
    code, out, err = await inproc.mmctl("state", "Counter")
    assert code == 0 and json.loads(out) == {"seen": [0]} and "as last saved" in err
    code, out, _ = await inproc.mmctl("config", "Counter")
    assert code == 0 and json.loads(out)["intervals"] == {"save_state": 0.05}
    # And messages sent to it meanwhile wait in its queue (also across a daemon restart)
    for n in (1, 2, 3):
        transit.send("Counter", {"n": n})
    mark = len(inproc.records)
    daemon = await inproc.restart()
    assert [r for r in inproc.records[mark:]
            if r.channel == "log" and r.text.startswith("task Counter stays stopped")]
    transit.send("Counter", {"n": 4})
    await inproc.quiet()
    assert transit.stat("Counter").messages == 4
    # A second failsafe is refused, and so is migrating it
    code, _, err = await inproc.mmctl("failsafe", "Counter")
    assert code == 1 and "already in failsafe" in err
    code, _, err = await inproc.mmctl("migrate", "Counter", "--external")
    assert code == 1 and "mmctl unfailsafe Counter" in err
    # When it is cleared
    assert (await inproc.mmctl("unfailsafe", "Counter"))[0] == 0
    # Then the waiting messages are handled in order and the state went on
    assert [(await inproc.next("out"))["n"] for _ in range(4)] == [1, 2, 3, 4]
    code, out, _ = await inproc.mmctl("state", "Counter")
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


async def test_failsafe_of_a_hung_async_handler_keeps_the_rest_in_its_journal(
        inproc, transit, monkeypatch):
    # Given a stop whose grace period for a handler in progress is 0.3 s (not 10)
    monkeypatch.setattr(TaskRunner.stop_consumer, "__defaults__", (0.3,))
    inproc.task("Hang", """
        import asyncio
        from multimodule import Task

        class Hang(Task):
            async def message(self, message):
                self.emit({"n": message["n"]})
                await asyncio.sleep(3600)
    """)
    inproc.config("[Hang]\n" + router_section(ALERTS, route("Hang", "out")))
    inproc.capture("out")
    await inproc.start()
    # Given a handler that never returns, with two more messages behind it in memory
    for n in range(3):
        inproc.send("Hang", {"n": n})
    assert (await inproc.next("out"))["n"] == 0
    # When it is put in failsafe
    reply = await inproc.control(failsafe="Hang")
    # Then after the stop's grace period the hung handler is cancelled, the task stops, and
    # the messages it never finished or got are in its journal (for after unfailsafe)
    assert reply == {"ok": True}, reply
    assert inproc.records_of("error", "2 more messages in memory stay in its journal")
    assert [m["n"] for m in inproc.journaled("Hang")] == [0, 1, 2]
    # And the daemon still stops in order
    assert await inproc.stop() == 0, inproc.lines("error")


async def test_config_for_a_task_in_failsafe_is_checked_against_its_model(inproc):
    inproc.task("Typed", """
        from pydantic import BaseModel
        from multimodule import Task

        class Typed(Task):
            class Config(BaseModel):
                n: int

            def message(self, message):
                self.emit({"n": self.settings.n})
    """)
    inproc.config("[Typed]\nn = 2\n" + router_section(route("Typed", "out")))
    inproc.capture("out")
    await inproc.start()
    assert await inproc.control(failsafe="Typed") == {"ok": True}
    # When a bad config is sent while it is stopped: refused, naming the field
    code, _, err = await inproc.mmctl("config", "Typed", '{"n": "abc"}')
    assert code == 1 and "Typed.n" in err
    # And a good one is taken, and used once it runs again
    assert (await inproc.mmctl("config", "Typed", '{"n": 5}'))[0] == 0
    assert (await inproc.mmctl("unfailsafe", "Typed"))[0] == 0
    inproc.send("Typed", {})
    assert (await inproc.next("out"))["n"] == 5


async def test_a_malformed_failsafe_file_is_read_as_far_as_it_makes_sense(inproc):
    inproc.task("Counter", COUNTER)
    inproc.config("[Counter]\n" + router_section(route("Counter", "out")))
    inproc.capture("out")
    inproc.state_dir.mkdir(exist_ok=True)
    (inproc.state_dir / "failsafe.json").write_text(
        '{"Counter": {"since": "yesterday", "reason": "line\\nbreak"}, "Router": {}}')
    # Then the daemon starts, holds Counter (the odd date dropped), and never the Router
    await inproc.start()
    assert inproc.records_of("log", "task Counter stays stopped: in failsafe (line break)")
    assert inproc.records_of("error", "the Router is never held in failsafe; ignored")
    assert (await inproc_status(inproc))["failsafe"]["Counter"]["since"] is None
    assert await inproc.control(unfailsafe="Counter") == {"ok": True}
    inproc.send("Counter", {"n": 1})
    assert (await inproc.next("out"))["n"] == 1
