"""The daemon's logic, run in-process (see tests/inprocess.py): control answers, config
reloads, schedules, migrations rolled back, backend calls off the loop, and a bounded stop.
Each test waits on quiescence or on a message, never on time."""

from __future__ import annotations

import asyncio
import threading
import time

import orjson

from helpers import route, router_section
from multimodule.errors import BackendError
from multimodule.runtime import registry as registry_module

ECHO = """
    from multimodule import Task

    class Echo(Task):
        def message(self, message):
            message.pop(".ipc_transit_meta", None)
            self.emit(message)
"""

KEEPER = """
    from multimodule import Task

    class Keeper(Task):
        is_stateful = True

        def message(self, message):
            self.state["n"] = self.state.get("n", 0) + 1
            self.send("out", {"n": self.state["n"], "got": message.get("i")})
"""

MODELLED = """
    from pydantic import BaseModel
    from multimodule import Task

    class Modelled(Task):
        class Config(BaseModel):
            outstr: str = "x"
            count: int = 1

        def message(self, message):
            pass
"""


async def test_status_answers_right_after_unfailsafe(inproc):
    # Given a task the monitor has sampled while it was in failsafe
    inproc.task("Echo", ECHO)
    inproc.config("[Echo]\n" + router_section(route("Echo", "out")))
    daemon = await inproc.start()
    assert await inproc.control(failsafe="Echo") == {"ok": True}
    await daemon.monitor.sample()
    # When it is cleared and status is asked for at once
    assert await inproc.control(unfailsafe="Echo") == {"ok": True}
    reply = await inproc.control(query="status")
    # Then the answer comes, with the task running again
    assert reply is not None and "status" in reply, inproc.records_of("error")
    rows = {row["name"]: row for row in reply["status"]["rows"]}
    assert rows["Echo"]["state"] == "running"
    assert not inproc.records_of("error", "control message failed")


async def test_a_control_command_that_fails_still_gets_an_error_answer(inproc, monkeypatch):
    # Given a daemon whose status query breaks
    daemon = await inproc.start()

    async def broken(what, name):
        raise RuntimeError("status exploded")

    monkeypatch.setattr(daemon, "query", broken)
    # When status is asked for / Then the answer is an error naming what broke
    reply = await inproc.control(query="status")
    assert reply == {"error": "control message failed: RuntimeError: status exploded"}
    assert inproc.records_of("error", "status exploded")


async def test_config_query_of_a_task_with_a_model_and_a_monitor_table_answers(inproc):
    # Given a task with a Config model and its own monitor thresholds
    inproc.task("Modelled", MODELLED)
    inproc.config("""
        [Modelled]
        outstr = "y"
        [Modelled.monitor.open_fds]
        warn = 50
    """)
    await inproc.start()
    # When its config is asked for
    reply = await inproc.control(query="config", task="Modelled")
    # Then the answer is plain JSON: the model's values and the monitor table
    assert reply is not None, inproc.records_of("error")
    assert reply["config"]["outstr"] == "y" and reply["config"]["count"] == 1
    assert reply["config"]["monitor"]["open_fds"]["warn"] == 50
    orjson.dumps(reply)


async def test_config_for_an_unknown_task_is_refused_as_no_such_task(inproc):
    await inproc.start()
    reply = await inproc.control(config={"Nosuchtask": {"a": 1}})
    assert reply["error"].startswith("no task 'Nosuchtask'"), reply
    assert "Nosuchtask" not in inproc.daemon.configs.overrides


async def test_failed_start_of_a_migration_rolls_back_to_the_daemon(inproc):
    # Given a stateful task that handled two messages in the daemon
    inproc.task("Keeper", KEEPER)
    inproc.config("[Keeper]\n")
    inproc.capture("out")
    daemon = await inproc.start()
    for i in range(2):
        inproc.send("Keeper", {"i": i})
    await inproc.quiet()
    assert [m["n"] for m in inproc.taken("out")] == [1, 2]
    # When it is migrated out and its process cannot be started
    inproc.backend.fail_start = BackendError("no such unit", status=5)
    reply = await inproc.control(migrate={"task": "Keeper", "to": "external"})
    # Then the answer says why, and the task runs in the daemon again with its state
    assert "no such unit" in reply["error"] and "runs in the daemon again" in reply["error"]
    assert "Keeper" in daemon.runners and "Keeper" not in daemon.externals
    assert daemon.configs.effective("Keeper")["is_external"] is False
    inproc.send("Keeper", {"i": 2})
    await inproc.quiet()
    assert inproc.taken("out") == [{"n": 3, "got": 2}]


async def test_bad_limits_refuse_a_migration_and_the_task_stays(inproc):
    inproc.task("Keeper", KEEPER)
    inproc.config("[Keeper]\n")
    daemon = await inproc.start()
    reply = await inproc.control(config={"Keeper": {"is_external": True,
                                                    "limits": {"nice": 99}}})
    assert "Keeper.limits.nice" in reply["error"], reply
    assert "Keeper" in daemon.runners
    assert [call for call in inproc.backend.calls if call[0] == "start"] == []


async def test_backend_calls_never_run_on_the_event_loop(inproc):
    # Given an external task, and a backend whose status waits for the loop to go on
    inproc.task("Keeper", KEEPER)
    inproc.config("[Keeper]\nis_external = true\n")
    daemon = await inproc.start()
    assert "Keeper" in daemon.externals
    gate = inproc.backend.status_gate = threading.Event()
    asked = len(inproc.backend.calls)

    async def open_the_gate_once_asked() -> None:
        while not any(call[0] == "status" for call in inproc.backend.calls[asked:]):
            await asyncio.sleep(0.001)
        gate.set()

    # When status is asked for, and the loop opens the gate once the backend is asked
    opener = asyncio.get_running_loop().create_task(open_the_gate_once_asked())
    reply = await inproc.control(query="status")
    await opener
    # Then the backend was asked from a worker thread: the loop was free to open the gate
    assert not inproc.backend.gate_timed_out
    assert reply["status"]["externals"]["Keeper"]["state"] == "active"
    # When a stateful task is loaded on first use (is it running outside already?)
    inproc.task("Later", KEEPER.replace("Keeper", "Later"))
    inproc.send("Later", {"i": 1})
    assert "Later" in daemon.runners
    loop_thread = threading.get_ident()
    assert inproc.backend.calls and all(
        thread != loop_thread for _, _, thread in inproc.backend.calls)


SCHEDULED = """
    import asyncio
    from multimodule import Task

    class Sched(Task):
        def set_config(self, config):
            if not hasattr(self, "gate"):
                self.gate = asyncio.Event()
                self.ticks = 0
            self.named_recur("slow", 0.01, self.slow)

        async def slow(self):
            if getattr(self, "free", False):
                return
            self.ticks += 1
            tick = self.ticks
            self.send("out", {"begin": tick})
            await self.gate.wait()
            self.gate.clear()
            self.send("out", {"end": tick})
"""


async def test_a_config_change_lets_scheduled_work_in_progress_finish(inproc):
    # Given scheduled async work waiting inside an await
    inproc.task("Sched", SCHEDULED)
    inproc.config("[Sched]\n")
    inproc.capture("out")
    daemon = await inproc.start()
    assert await inproc.next("out") == {"begin": 1}
    # When the task's config changes (its schedule's interval does not)
    daemon.set_task_config("Sched", {"other": 1})
    # Then the work in progress is not cancelled: it finishes when released
    daemon.runners["Sched"].task.gate.set()
    assert await inproc.next("out") == {"end": 1}
    assert await inproc.next("out") == {"begin": 2}
    daemon.runners["Sched"].task.free = True
    daemon.runners["Sched"].task.gate.set()


async def test_a_task_leaving_the_config_is_unloaded_and_the_change_is_logged(inproc):
    # Given two configured tasks
    inproc.task("Echo", ECHO)
    inproc.task("Keeper", KEEPER)
    inproc.config("[Echo]\n[Keeper]\n")
    daemon = await inproc.start()
    assert {"Echo", "Keeper"} <= set(daemon.runners)
    # When Keeper's section is removed and Echo's changed
    inproc.config("[Echo]\nx = 1\n")
    assert daemon.reload() is None
    await inproc.quiet()
    # Then Keeper is stopped, Echo has its new config, and the log says what changed
    assert "Keeper" not in daemon.runners
    assert daemon.runners["Echo"].task.config == {"x": 1}
    assert inproc.records_of("log", "config reloaded from")[-1].text.endswith(
        "Echo changed, Keeper removed")
    assert inproc.records_of("log", "task Keeper left the config")


HUNG = """
    import asyncio
    from multimodule import Task

    class Hung{n}(Task):
        async def message(self, message):
            await asyncio.Event().wait()
"""


async def test_stop_with_hung_handlers_is_bounded_and_keeps_their_messages(inproc, monkeypatch):
    # Given four tasks whose handlers hang, each with a message in hand and one waiting
    monkeypatch.setattr(registry_module, "STOP_GRACE_S", 1.0)
    for n in range(4):
        inproc.task(f"Hung{n}", HUNG.format(n=n))
    inproc.config("".join(f"[Hung{n}]\n" for n in range(4)))
    await inproc.start()
    for n in range(4):
        inproc.send(f"Hung{n}", {"first": n})
        inproc.send(f"Hung{n}", {"second": n})
    await asyncio.sleep(0)
    # When the daemon stops
    started = time.monotonic()
    assert await inproc.stop() == 0
    # Then the grace periods ran side by side, not one after another
    assert time.monotonic() - started < 3.0
    # and what the hung tasks had not handled (the message in hand, the one waiting) is in
    # their journals past their checkpoints, to be given to them first at the next start
    for n in range(4):
        assert [(m.get("first"), m.get("second")) for m in inproc.journaled(f"Hung{n}")] == \
            [(n, None), (None, n)]


async def test_without_journals_what_hung_tasks_held_goes_back_to_their_queues(
        inproc, monkeypatch):
    monkeypatch.setattr(registry_module, "STOP_GRACE_S", 0.5)
    inproc.task("Hung0", HUNG.format(n=0))
    inproc.config("[Hung0]\n")
    await inproc.start(journal=False)
    inproc.send("Hung0", {"first": 0})
    inproc.send("Hung0", {"second": 0})
    await asyncio.sleep(0)
    assert await inproc.stop() == 0
    assert inproc.transit.receive("Hung0", timeout=0)["second"] == 0
    assert not (inproc.state_dir / "journal").exists()


async def test_requests_still_waiting_when_the_daemon_stops_get_an_answer(inproc, transit):
    # Given a status query in hand, held up by a slow backend
    inproc.task("Keeper", KEEPER)
    inproc.config("[Keeper]\nis_external = true\n")
    daemon = await inproc.start()
    gate = inproc.backend.status_gate = threading.Event()
    control = inproc.transit.local_queue(daemon.options.control_queue)
    replies = [f"stop-reply-{i}" for i in range(4)]
    for reply_to in replies:
        inproc.transit.sysv_queue(reply_to)
    control.put({".multimodule": {"query": "status", "reply_to": replies[0]}})
    async with asyncio.timeout(10):
        while not any(call[0] == "status" for call in inproc.backend.calls):
            await asyncio.sleep(0.001)  # the worker thread has entered the backend
    # and, behind it, two requests in memory and one still in the System V queue
    control.put({".multimodule": {"query": "config", "task": "Keeper",
                                  "reply_to": replies[1]}})
    control.put({".multimodule": {"control": [{"type": "cleanly_exit"}],
                                  "reply_to": replies[2]}})
    transit.send(daemon.options.control_queue,  # another process's send: not in memory
                 {".multimodule": {"query": "status", "reply_to": replies[3]}})
    # When the daemon stops, and the backend answers
    daemon.request_stop()
    gate.set()
    assert await inproc.stop() == 0
    # Then the request in hand got its answer and each waiting one was told
    answers = [inproc.transit.receive(r, timeout=0) for r in replies]
    assert "status" in answers[0]
    assert "stopping" in answers[1]["error"]
    assert answers[2]["ok"] is True  # asked to exit: it does
    assert "stopping" in answers[3]["error"]
    for reply_to in replies:
        inproc.transit.remove(reply_to)


async def test_an_external_task_leaving_the_config_is_stopped_not_moved_in(inproc):
    # Given a task running in its own process
    inproc.task("Keeper", KEEPER)
    inproc.config("[Keeper]\nis_external = true\n")
    daemon = await inproc.start()
    assert "Keeper" in daemon.externals
    # When its section is removed
    inproc.config("")
    assert daemon.reload() is None
    await inproc.quiet()
    # Then its process is stopped, and it runs nowhere (not in the daemon either)
    assert "Keeper" not in daemon.externals and "Keeper" not in daemon.runners
    assert ("stop", "Keeper") in [(m, t) for m, t, _ in inproc.backend.calls]
    assert not [m for m, t, _ in inproc.backend.calls if (m, t) == ("start", "Keeper")][1:]


async def test_unfailsafe_of_an_unknown_task_is_refused_as_no_such_task(inproc):
    await inproc.start()
    reply = await inproc.control(unfailsafe="Nosuchtask")
    assert reply["error"].startswith("no task 'Nosuchtask'"), reply


async def test_a_request_that_comes_while_the_daemon_stops_is_answered(inproc, monkeypatch):
    # Given a daemon whose stop takes a while (a handler hangs until its grace runs out)
    monkeypatch.setattr(registry_module, "STOP_GRACE_S", 1.0)
    inproc.task("Hung0", HUNG.format(n=0))
    inproc.config("[Hung0]\n")
    daemon = await inproc.start()
    inproc.send("Hung0", {"first": 0})
    await asyncio.sleep(0)
    control_queue = daemon.options.control_queue
    # When the daemon is stopping and the control server has stopped serving
    stopping = asyncio.get_running_loop().create_task(inproc.stop())
    async with asyncio.timeout(10):
        while inproc.transit.is_local(control_queue):
            await asyncio.sleep(0.001)  # the control server gives its queue back
    inproc.transit.sysv_queue("late-reply")
    inproc.transit.send(control_queue, {".multimodule": {"query": "status",
                                                         "reply_to": "late-reply"}})
    assert await stopping == 0
    # Then that request is answered too, before the daemon exits
    assert "stopping" in inproc.transit.receive("late-reply", timeout=0)["error"]
    inproc.transit.remove("late-reply")


async def test_a_long_command_without_a_reply_queue_runs_without_warnings(inproc, recwarn):
    # Given a task (the original's control messages carry no reply_to)
    inproc.task("Keeper", KEEPER)
    inproc.config("[Keeper]\n")
    daemon = await inproc.start()
    # When a migration is asked for with no reply queue
    inproc.transit.local_queue(daemon.options.control_queue).put(
        {".multimodule": {"migrate": {"task": "Keeper", "to": "external"}}})
    await inproc.quiet()
    # Then it is carried out, and nothing was left un-awaited
    assert "Keeper" in daemon.externals
    assert not [w for w in recwarn if "never awaited" in str(w.message)]


async def test_a_malformed_control_message_is_reported(inproc, transit):
    daemon = await inproc.start()
    transit.sysv_queue(daemon.options.control_queue).send_raw(b"MM\x01Jnot json")
    # (awaited, not quiet(): the receiver thread may hold the bytes between the kernel and
    # the loop when quiet() looks)
    record = await inproc.record("error", "control queue: bad message")
    assert "not valid JSON" in record.text
