"""Messages through a running daemon: into an internal task from another process, through the
Router, to an on-demand stateful task, out to a System V queue; failing and slow handlers.

The daemon runs in-process (see tests/inprocess.py); "another process" is a second Transit on
the same directory (the ``transit`` fixture), whose sends go over System V through the
daemon's receiver threads."""

from __future__ import annotations

import importlib.util
import re
import sys

from helpers import router_section, route, strip_meta

UPPER = """
    from multimodule import Task

    class Upper(Task):
        def message(self, message):
            self.emit({"text": message["text"].upper(), "n": message["n"]})
"""

PRODUCER = """
    from multimodule import Task

    class Producer(Task):
        # {"count": N} makes it emit N numbered messages at once.
        def message(self, message):
            for i in range(message["count"]):
                self.emit({"i": i})
"""

COUNTER = """
    from multimodule import Task

    class Counter(Task):
        is_stateful = True

        # Numbers each message from its saved counter and passes it on.
        def message(self, message):
            ct = self.state.get("ct", 0) + 1
            self.state["ct"] = ct
            message.pop(".ipc_transit_meta", None)
            message["counter"] = ct
            self.emit(message)
"""


async def next_n(inproc, qname: str, count: int) -> list[dict]:
    """The next ``count`` messages on capture queue ``qname`` (with their transit meta)."""
    return [await inproc.next(qname, meta=True) for _ in range(count)]


async def test_message_into_internal_task_transformed_and_routed_out(inproc, transit):
    # Given a daemon with task Upper, whose output the Router sends (match on source) to "out"
    inproc.task("Upper", UPPER)
    inproc.config("[Upper]\n\n" + router_section(route("Upper", "out"),
                                                 route("Nobody", "never")))
    inproc.capture("out")
    await inproc.start()
    # When another process sends messages to Upper's queue over System V
    for n, text in enumerate(["hello", "wörld", "x" * 2000]):
        transit.send("Upper", {"text": text, "n": n})
    # Then they come out on "out", transformed, marked as from Upper, in order
    got = await next_n(inproc, "out", 3)
    assert [strip_meta(m) for m in got] == [
        {"text": "HELLO", "n": 0, "source": "Upper"},
        {"text": "WÖRLD", "n": 1, "source": "Upper"},
        {"text": "X" * 2000, "n": 2, "source": "Upper"},
    ]
    assert all(".ipc_transit_meta" in m for m in got)


async def test_producer_to_on_demand_stateful_counter_nothing_lost_or_duplicated(
        inproc, transit):
    # Given a configured Producer, a stateful Counter with NO config section (loaded on demand
    # when the Router first forwards to it), and routes Producer -> Counter -> "out"
    count = 500
    inproc.task("Producer", PRODUCER)
    inproc.task("Counter", COUNTER)
    inproc.config("[Producer]\n\n[Router]\nroutes = [\n"
                  f'  {route("Producer", "Counter")},\n'
                  f'  {route("Counter", "out")},\n'
                  "]\n")
    inproc.capture("out")
    daemon = await inproc.start()
    assert "Counter" not in inproc.records_of("log", "running (pid")[0].text
    assert "Counter" not in daemon.runners
    # When the producer is asked for 500 messages
    transit.send("Producer", {"count": count})
    got = await next_n(inproc, "out", count)
    # Then each went through Counter once, in order, with contiguous counters
    assert [m["source"] for m in got] == ["Counter"] * count
    assert [m["previous_source"] for m in got] == ["Producer"] * count
    assert [m["i"] for m in got] == list(range(count))
    assert [m["counter"] for m in got] == list(range(1, count + 1))
    # and nothing more comes (no duplicates): once all is quiet, nothing else is there
    await inproc.quiet()
    assert inproc.taken("out") == []
    # and the daemon's figures agree
    tasks = (await inproc.control(query="status"))["status"]["tasks"]
    assert tasks["Counter"]["messages_in"] == count and tasks["Counter"]["emitted"] == count
    assert tasks["Producer"]["emitted"] == count
    assert tasks["Router"]["messages_in"] == 2 * count
    assert (await inproc.control(query="state", task="Counter"))["state"] == {"ct": count}


async def test_failing_handler_reported_counted_and_next_message_handled(inproc, transit):
    # Given a task whose handler raises on messages with "boom"
    inproc.task("Flaky", """
        from multimodule import Task

        class Flaky(Task):
            def message(self, message):
                if message.get("boom"):
                    raise ValueError("kaboom " + str(message["id"]))
                self.emit({"id": message["id"]})
    """)
    inproc.config("[Flaky]\n\n" + router_section(route("Flaky", "out")))
    inproc.capture("out")
    await inproc.start()
    # When a failing message and then a good one are sent
    transit.send("Flaky", {"boom": True, "id": 1})
    transit.send("Flaky", {"id": 2})
    # Then the good one is handled
    assert (await inproc.next("out"))["id"] == 2
    # and the failure is on the error channel naming the task, the exception and the message
    line = inproc.records_of("error", "kaboom 1")[0].line
    assert line.startswith("error: Flaky: message handler raised ValueError: kaboom 1"), line
    assert "'boom': True" in line and "'id': 1" in line, line
    # and it is counted in the status
    flaky = (await inproc.control(query="status"))["status"]["tasks"]["Flaky"]
    assert flaky["task_message_failure"] == 1
    assert flaky["messages_in"] == 2
    assert "kaboom 1" in flaky["last_error"]


async def test_async_handler_failure_also_reported(inproc, transit):
    inproc.task("AFlaky", """
        import asyncio
        from multimodule import Task

        class AFlaky(Task):
            async def message(self, message):
                await asyncio.sleep(0)
                if message.get("boom"):
                    raise KeyError("async-kaboom")
                self.emit({"id": message["id"]})
    """)
    # Given an async handler that raises on messages with "boom"
    inproc.config("[AFlaky]\n\n" + router_section(route("AFlaky", "out")))
    inproc.capture("out")
    await inproc.start()
    # When a failing and a good message are sent
    transit.send("AFlaky", {"boom": True, "id": 1})
    transit.send("AFlaky", {"id": 2})
    # Then the good one is handled, the failure reported and counted
    assert (await inproc.next("out"))["id"] == 2
    assert [line for line in inproc.lines("error") if line.startswith(
        "error: AFlaky: message handler raised KeyError: 'async-kaboom'")]
    status = (await inproc.control(query="status"))["status"]
    assert status["tasks"]["AFlaky"]["task_message_failure"] == 1


async def test_handler_holding_the_loop_gets_a_warning_naming_task_and_duration(inproc, transit):
    # Given a threshold of 0.1 s and a task that sleeps (blocking) 0.2 s on "slow" messages
    inproc.task("Sleepy", """
        import time
        from multimodule import Task

        class Sleepy(Task):
            def message(self, message):
                if message.get("slow"):
                    time.sleep(0.2)
                self.emit({"id": message["id"]})
    """)
    inproc.config("[Sleepy]\n\n" + router_section(route("Sleepy", "out")))
    inproc.capture("out")
    await inproc.start(slow_handler_s=0.1)
    # When a slow and then a fast message are handled
    transit.send("Sleepy", {"slow": True, "id": 1})
    transit.send("Sleepy", {"id": 2})
    assert [m["id"] for m in await next_n(inproc, "out", 2)] == [1, 2]
    # Then one warning names the task and a duration of at least 0.2 s
    line = inproc.records_of("error", "held the event loop")[0].line
    assert line.startswith("error: Sleepy: warning: message handler held the event loop for "), \
        line
    duration = float(re.search(r"for (\d+\.\d+) s", line).group(1))
    assert 0.2 <= duration < 5, line
    assert "threshold 0.1 s" in line
    sleepy = (await inproc.control(query="status"))["status"]["tasks"]["Sleepy"]
    assert sleepy["slow_handlers"] == 1
    assert len(inproc.records_of("error", "held the event loop")) == 1


async def test_unroutable_forward_to_unknown_name_goes_to_system_v_queue(inproc, transit):
    # Given a route to a name that is no task (no module of that name)
    inproc.task("Upper", UPPER)
    inproc.config("[Upper]\n\n" + router_section(route("Upper", "plain_queue_name")))
    await inproc.start()
    # When a message passes / Then it lands on the System V queue of that name
    inproc.send("Upper", {"text": "a", "n": 0})
    await inproc.quiet()
    assert transit.receive("plain_queue_name", timeout=0)["text"] == "A"
    inproc.send("Upper", {"text": "b", "n": 1})
    await inproc.quiet()
    assert transit.receive("plain_queue_name", timeout=0)["text"] == "B"


QUITTER = """
    import asyncio
    from multimodule import Task

    class Quitter(Task):
        # {"exit": TEXT} raises SystemExit(TEXT), {"interrupt": TEXT} KeyboardInterrupt(TEXT),
        # from an async handler if "async" is set; any other message goes out with its id.
        def message(self, message):
            if message.get("async"):
                return self.later(message)
            self.act(message)

        async def later(self, message):
            await asyncio.sleep(0)
            self.act(message)

        def act(self, message):
            if "exit" in message:
                raise SystemExit(message["exit"])
            if "interrupt" in message:
                raise KeyboardInterrupt(message["interrupt"])
            self.emit({"id": message["id"]})
"""


async def test_handler_raising_systemexit_or_keyboardinterrupt_reported_daemon_goes_on(
        inproc, transit):
    # Given a task whose handler raises SystemExit or KeyboardInterrupt on request
    inproc.task("Quitter", QUITTER)
    inproc.config("[Quitter]\n\n" + router_section(route("Quitter", "out")))
    inproc.capture("out")
    await inproc.start()
    # When each kind is raised (by a plain and by an async handler), each followed by a
    # normal message
    for n, bad in enumerate([{"exit": "bye-1"}, {"interrupt": "ctrl-c-2"},
                             {"exit": "bye-3", "async": True},
                             {"interrupt": "ctrl-c-4", "async": True}], start=1):
        transit.send("Quitter", bad)
        transit.send("Quitter", {"id": n})
    # Then every next message is still handled, in order
    assert [m["id"] for m in await next_n(inproc, "out", 4)] == [1, 2, 3, 4]
    # and each failure is reported on the error channel naming the task and the exception
    for text in ("SystemExit: bye-1", "KeyboardInterrupt: ctrl-c-2", "SystemExit: bye-3",
                 "KeyboardInterrupt: ctrl-c-4"):
        line = inproc.records_of("error", text)[0].line
        assert line.startswith(f"error: Quitter: message handler raised {text}"), line
    # and counted as task_message_failure
    quitter = (await inproc.control(query="status"))["status"]["tasks"]["Quitter"]
    assert (quitter["task_message_failure"], quitter["messages_in"]) == (4, 8)
    # and the daemon is still running, and exits 0 when stopped (as on SIGTERM)
    assert inproc.running
    assert await inproc.stop() == 0


EVIL = """
open({marker!r}, "w").close()  # proof that this module was imported

from multimodule import Task


class evil(Task):
    def message(self, message):
        pass
"""


async def test_on_demand_loading_imports_nothing_outside_the_task_path(
        inproc, tmp_path, monkeypatch):
    # Given a module evil.py outside the task path but importable by the daemon (on its
    # sys.path), whose import would create a marker file
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    marker = tmp_path / "evil-was-imported"
    (elsewhere / "evil.py").write_text(EVIL.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(elsewhere))
    spec = importlib.util.find_spec("evil")  # the setup is effective (found, not imported)
    assert spec is not None and spec.origin == str(elsewhere / "evil.py")
    assert not marker.exists()
    # and a task module Upper in the task path with no config section
    inproc.task("Upper", UPPER)
    inproc.config(router_section(route("Upper", "out")))
    inproc.capture("out")
    await inproc.start()
    # When the Router is given a static forward to the name "evil"
    inproc.send("Router", {"static_forwards": [[{"forward": {"qname": "evil"}}]], "x": 1})
    await inproc.quiet()
    # Then the message lands on the System V queue "evil"
    landed = inproc.transit.receive("evil", timeout=0)
    assert landed["x"] == 1 and "static_forwards" not in landed
    # and evil.py was never imported
    assert not marker.exists()
    # When a static forward names the task in the task path
    inproc.send("Router", {"static_forwards": [[{"forward": {"qname": "Upper"}}]],
                           "text": "y", "n": 2})
    # Then that task is loaded on first use and handles it
    assert strip_meta(await inproc.next("out")) == {"text": "Y", "n": 2, "source": "Upper"}
    report = (await inproc.control(query="status"))["status"]
    assert "Upper" in report["tasks"]
    assert "evil" not in report["tasks"] and "evil" not in report["import_failures"]
    assert not marker.exists()
    assert "evil" not in sys.modules
    assert await inproc.stop() == 0
