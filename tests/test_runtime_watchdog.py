"""The handler watchdog: a handler or scheduled work that holds the event loop is reported while
it does, interrupted at its task's ``handler_timeout_s`` (a failure of that handler), and a task
cut off repeatedly goes to failsafe; ``mmctl status`` is answered meanwhile, from a snapshot.

The logic runs in-process (see tests/inprocess.py: the daemon on this test's own loop and main
thread, so its handlers block this loop as they would the daemon's); the signal and the
blocking as a daemon sees them run in a real daemon process (the ``mm`` fixture). Handlers
``time.sleep(30)``: a test that ends in seconds shows they were cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import signal
import threading
import time

import pytest

from helpers import route, router_section
from multimodule.cli import mmctl as mmctl_cli
from multimodule.errors import HandlerTimeout
from multimodule.oob import Channels, parse_spec
from multimodule.runtime.watchdog import CUT_REPEAT_S, CUT_SIGNAL, HandlerWatchdog, exempt

SLEEPY = """
    import time
    from multimodule import Task

    class Sleepy(Task):
        # {"hang": true} blocks the loop for 30 s; anything else is echoed at once.
        def message(self, message):
            if message.get("hang"):
                time.sleep(30)
            self.emit({"id": message.get("id")})
"""

ECHO = """
    from multimodule import Task

    class Echo(Task):
        def message(self, message):
            self.emit({"echo": message.get("id")})
"""


def sleepy_config(timeout_s: float, *more: str) -> str:
    return (f"[Sleepy]\nhandler_timeout_s = {timeout_s}\n\n[Echo]\n\n"
            + router_section(route("Sleepy", "out"), route("Echo", "out"), *more))


async def next_out(inproc, timeout: float = 5) -> dict:
    """The next message on "out", without the Router's hop count and its source."""
    message = await inproc.next("out", timeout=timeout)
    return {k: v for k, v in message.items() if k not in (".router_hops", "source")}


async def task_figures(inproc, name: str) -> dict:
    return (await inproc.control(query="status"))["status"]["tasks"][name]


def on_record(inproc, text: str) -> threading.Event:
    """An event set (from whatever thread emits it) when a record containing ``text`` comes:
    the watchdog writes from its own thread while this test's loop is blocked."""
    seen = threading.Event()
    emit = inproc.channels.emit

    def watching(channel, task, record, /, **fields):
        emit(channel, task, record, **fields)
        if text in str(record):
            seen.set()

    inproc.channels.emit = watching
    return seen


def mmctl_in_this_thread(*args: str) -> tuple[int, str, str]:
    """``mmctl ARGS`` in the calling (worker) thread; ``(status, stdout, stderr)``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = mmctl_cli.main(list(args))
    return code, out.getvalue(), err.getvalue()


# -- in-process: the logic -------------------------------------------------------------------


async def test_a_blocking_handler_is_reported_while_it_blocks_then_cut_at_its_timeout(
        inproc, transit):
    # Given a task whose handler sleeps 30 s, limited to 0.5 s, and a slow threshold of 0.1 s
    inproc.task("Sleepy", SLEEPY)
    inproc.task("Echo", ECHO)
    inproc.config(sleepy_config(0.5))
    inproc.capture("out")
    await inproc.start(slow_handler_s=0.1)
    began = time.monotonic()
    # When it gets a message that hangs, then one that does not
    inproc.send("Sleepy", {"hang": True, "id": 1})
    inproc.send("Sleepy", {"id": 2})
    # Then the next message is handled within seconds, not 30 s: the hung one was cut
    assert await next_out(inproc) == {"id": 2}
    assert time.monotonic() - began < 5
    # And while it blocked (0.1 s in, before the cut at 0.5 s) a warning named the task, the
    # call, and where the main thread was: in the task's time.sleep
    live = inproc.records_of("error", "is holding the event loop")
    assert len(live) == 1, inproc.lines("error")
    assert live[0].line.startswith("error: Sleepy: warning: message handler is holding the "
                                   "event loop (0.1"), live[0].line
    assert 0.1 <= live[0].fields["held_s"] < 0.5
    assert "now in message at " in live[0].text and "Sleepy.py:" in live[0].text
    assert "time.sleep(30)" in live[0].fields["stack"]
    # And the cut is the handler's failure, with the traceback of where it was interrupted
    failed = inproc.records_of("error", "message handler raised HandlerTimeout")
    assert len(failed) == 1
    assert inproc.records.index(live[0]) < inproc.records.index(failed[0])
    assert failed[0].line.startswith(
        "error: Sleepy: message handler raised HandlerTimeout: message handler of task "
        "Sleepy held the event loop for 0.5"), failed[0].line
    assert "past its handler_timeout_s (0.5 s): interrupted" in failed[0].text
    assert "time.sleep(30)" in failed[0].fields["traceback"]
    assert failed[0].fields["failure"] == "task_message_failure"
    figures = await task_figures(inproc, "Sleepy")
    assert (figures["task_message_failure"], figures["handler_timeouts"]) == (1, 1)
    # And other tasks flow afterwards
    transit.send("Echo", {"id": 3})
    assert await next_out(inproc) == {"echo": 3}
    assert "Sleepy" in inproc.daemon.runners


async def test_blocking_scheduled_work_is_reported_and_cut_and_its_schedule_goes_on(inproc):
    # Given scheduled work every 50 ms whose first tick sleeps 30 s, limited to 0.3 s
    inproc.task("Ticker", """
        import time
        from multimodule import Task

        class Ticker(Task):
            def set_config(self, config):
                self.ticks = 0
                self.named_recur("tick", 0.05, self.tick)

            def tick(self):
                self.ticks += 1
                if self.ticks == 1:
                    time.sleep(30)
                self.emit({"tick": self.ticks})
    """)
    inproc.config("[Ticker]\nhandler_timeout_s = 0.3\n\n"
                  + router_section(route("Ticker", "out")))
    inproc.capture("out")
    await inproc.start(slow_handler_s=0.1)
    # Then the schedule goes on after the first tick was cut (the second tick comes)
    assert await next_out(inproc) == {"tick": 2}
    live = inproc.records_of("error", "is holding the event loop")
    assert live and live[0].line.startswith(
        "error: Ticker: warning: scheduled work 'tick' is holding the event loop"), live
    assert live[0].fields["held_s"] < 0.3
    failed = inproc.records_of("error", "scheduled work 'tick' raised HandlerTimeout")
    assert len(failed) == 1 and failed[0].fields["failure"] == "recur_failure"
    figures = await task_figures(inproc, "Ticker")
    assert (figures["recur_failure"], figures["handler_timeouts"]) == (1, 1)


async def test_an_async_handler_is_cut_when_a_step_blocks_not_while_it_awaits(inproc):
    # Given an async handler that awaits 0.6 s (the loop is free meanwhile), then blocks
    inproc.task("Stepper", """
        import asyncio
        import time
        from multimodule import Task

        class Stepper(Task):
            async def message(self, message):
                await asyncio.sleep(0.6)
                self.emit({"awaited": message["id"]})
                if message.get("block"):
                    time.sleep(30)
                self.emit({"done": message["id"]})
    """)
    inproc.config("[Stepper]\nhandler_timeout_s = 0.3\n\n"
                  + router_section(route("Stepper", "out")))
    inproc.capture("out")
    await inproc.start(slow_handler_s=0.1)
    # When one message only awaits and the next also blocks after its await
    inproc.send("Stepper", {"id": 1})
    inproc.send("Stepper", {"id": 2, "block": True})
    # Then awaiting longer than the limit is no cut; blocking in a step is
    assert [await next_out(inproc) for _ in range(3)] == \
        [{"awaited": 1}, {"done": 1}, {"awaited": 2}]
    await inproc.quiet()
    failed = inproc.records_of("error", "message handler raised HandlerTimeout")
    assert len(failed) == 1 and "time.sleep(30)" in failed[0].fields["traceback"]
    assert inproc.taken("out") == []


async def test_a_task_cut_off_three_times_goes_to_failsafe_and_keeps_its_messages(
        inproc, transit):
    # Given a task limited to 0.2 s, four messages that hang waiting for it in memory
    inproc.task("Sleepy", SLEEPY)
    inproc.config(sleepy_config(0.2, '{ match = { source = "MultiModule" }, '
                                     'forwards = [ { qname = "alerts" } ] }'))
    inproc.capture("alerts")
    await inproc.start(slow_handler_s=0.1)
    for n in range(4):
        inproc.send("Sleepy", {"hang": True, "id": n})
    # When three of them have been cut off
    await inproc.record("log", "task Sleepy stopped (failsafe)", timeout=5)
    await inproc.quiet()
    # Then the task is in failsafe, saying why, with an alert to the Router
    mark = inproc.daemon.failsafe.marks["Sleepy"]
    assert (mark["metric"], mark["value"]) == ("handler_timeouts", 3)
    assert "interrupted 3 times within 600 s" in mark["reason"]
    alert = (await inproc.next("alerts"))
    assert (alert["type"], alert["task"], alert["level"]) == ("failsafe", "Sleepy", "failsafe")
    # (each at its own limit: a call that follows a cut one is watched from its own start)
    cut = inproc.records_of("error", "raised HandlerTimeout")
    assert len(cut) == 3
    held = [float(re.search(r"held the event loop for (\d+\.\d+) s", r.text).group(1))
            for r in cut]
    assert all(0.2 <= h < 0.6 for h in held), held
    assert "Sleepy" not in inproc.daemon.runners
    # And the fourth message was not handed to it: it waits in its journal, past its
    # checkpoint, for after unfailsafe (the three cut off count as handled, as failures)
    assert [m["id"] for m in inproc.journaled("Sleepy")] == [3]


async def test_the_router_is_never_put_in_failsafe_for_cut_offs(inproc):
    await inproc.start()
    # When the Router's runner asks for failsafe after its cut-offs (as a runner does)
    being_stopped = inproc.daemon.failsafe_hung("Router", "its handlers were interrupted")
    # Then it is refused, said on error, and the Router goes on
    assert being_stopped is False
    assert inproc.records_of("error", "the Router is never put in failsafe")
    assert "Router" in inproc.daemon.runners and not inproc.daemon.failsafe.marks


async def test_status_is_answered_while_a_handler_blocks_the_loop(inproc):
    # Given a task limited to 1.5 s that hangs, and a status answered once before
    inproc.task("Sleepy", SLEEPY)
    inproc.config(sleepy_config(1.5))
    inproc.capture("out")
    await inproc.start(slow_handler_s=0.1)
    assert (await inproc.mmctl("status"))[0] == 0
    blocked = on_record(inproc, "is holding the event loop")

    def status_while_blocked():
        assert blocked.wait(10), "the watchdog did not report the blocked loop"
        return mmctl_in_this_thread("status", "--json", "--wait", "1")

    asking = asyncio.get_running_loop().run_in_executor(None, status_while_blocked)
    # When its handler blocks the loop
    inproc.send("Sleepy", {"hang": True, "id": 1})
    code, out, err = await asking
    # Then mmctl got an answer within its --wait, while the loop was blocked, saying so
    assert code == 0, err
    status = json.loads(out)
    assert status["blocked"]["task"] == "Sleepy"
    assert status["blocked"]["what"] == "message handler"
    assert 0.1 <= status["blocked"]["held_s"] < 1.5
    assert status["snapshot_at"] <= time.time()
    assert "Sleepy" in status["tasks"] and status["pid"] > 0
    # And once the handler is cut the loop answers again, fresh
    await inproc.record("error", "raised HandlerTimeout")
    code, out, _ = await inproc.mmctl("status", "--json")
    assert code == 0 and "blocked" not in json.loads(out)
    assert json.loads(out)["tasks"]["Sleepy"]["handler_timeouts"] == 1


async def test_a_status_request_handed_to_the_loop_before_it_blocked_is_answered_once(
        inproc, transit):
    # Given a handler that puts a status request on the control queue (as mmctl does, over
    # System V) and then blocks: the control receiver hands it to the loop, which is blocked
    inproc.task("Asker", """
        import time
        from multimodule import Task
        from multimodule.transit import Transit

        class Asker(Task):
            def message(self, message):
                Transit().send("MultiModule_control", {".multimodule": {
                    "query": "status", "reply_to": message["reply_to"]}})
                time.sleep(30)
    """)
    inproc.config("[Asker]\nhandler_timeout_s = 1.5\n")
    await inproc.start(slow_handler_s=0.5)
    transit.sysv_queue("asker-reply")
    try:
        inproc.send("Asker", {"reply_to": "asker-reply"})
        # Then the answer comes from the snapshot while the loop is blocked, and only once
        reply = await asyncio.get_running_loop().run_in_executor(
            None, lambda: transit.receive("asker-reply", timeout=5))
        assert reply["status"]["blocked"]["task"] == "Asker"
        assert reply["status"]["blocked"]["held_s"] < 1.5
        await inproc.record("error", "raised HandlerTimeout")
        await inproc.quiet()
        assert transit.stat("asker-reply").messages == 0
    finally:
        transit.remove("asker-reply")


# -- the watchdog on its own -----------------------------------------------------------------


class Watched:
    def __init__(self, timeout_s: float):
        self.name = "T"
        self.handler_timeout_s = timeout_s


class Kept(Channels):
    """Channels that keep records (any thread)."""

    def __init__(self):
        super().__init__(parse_spec("log:1,error:2,alert:2,debug:2"))
        self.kept: list[tuple[str, str, dict]] = []

    def emit(self, channel, task, text, /, **fields):
        self.kept.append((channel, text, fields))


@pytest.fixture
def watchdog():
    dog = HandlerWatchdog(Kept(), slow_s=0.05)
    dog.start()
    yield dog
    dog.close()


def test_a_pure_python_loop_is_cut_and_one_that_swallows_the_cut_is_cut_again(watchdog):
    who = Watched(0.2)
    generation = watchdog.began(who, "message handler")
    cuts = 0
    began = time.monotonic()
    try:
        with pytest.raises(HandlerTimeout, match=r"message handler of task T held the event "
                                                 r"loop for 1\.\d+ s, past its "
                                                 r"handler_timeout_s \(0\.2 s\)"):
            while True:  # swallows the first cut, and goes on
                try:
                    while True:
                        pass
                except HandlerTimeout:
                    cuts += 1
                    if cuts == 2:
                        raise
    finally:
        watchdog.ended(generation)
    assert CUT_REPEAT_S <= time.monotonic() - began < CUT_REPEAT_S + 2
    said = [text for _, text, _ in watchdog.channels.kept]
    assert any("still holds the event loop 1 s after it was interrupted" in t for t in said), said


def test_a_cut_landing_in_exempt_code_or_after_the_call_ended_does_nothing(watchdog):
    # Given code the runner runs around a handler (exempt), holding the loop past the limit
    def bookkeeping():
        time.sleep(0.4)

    exempt(bookkeeping)
    generation = watchdog.began(Watched(0.1), "message handler")
    try:
        bookkeeping()  # the signal comes while it sleeps: no HandlerTimeout here
    finally:
        watchdog.ended(generation)
    # And a stray signal, with no call in hand, does nothing either
    signal.pthread_kill(threading.get_ident(), CUT_SIGNAL)  # its handler runs before this returns
    assert watchdog.blocked() is None


def test_a_slow_call_that_ended_does_not_delay_watching_the_next(watchdog):
    # Given a limit of 1 s and a slow threshold of 50 ms, a call reported as slow that ends
    who = Watched(1.0)
    generation = watchdog.began(who, "first call")
    time.sleep(0.15)
    watchdog.ended(generation)
    # When the next call holds the loop 0.3 s (well before the first call's limit)
    generation = watchdog.began(who, "second call")
    time.sleep(0.3)
    watchdog.ended(generation)
    # Then it was reported too, at its own threshold
    said = [(text, fields) for _, text, fields in watchdog.channels.kept]
    assert [text.split(" is holding")[0] for text, _ in said] == \
        ["warning: first call", "warning: second call"], said
    assert said[1][1]["held_s"] < 0.3


def test_close_puts_the_previous_signal_handler_back():
    before = signal.getsignal(CUT_SIGNAL)
    dog = HandlerWatchdog(Kept(), slow_s=1)
    dog.start()
    assert signal.getsignal(CUT_SIGNAL) != before
    dog.close()
    assert signal.getsignal(CUT_SIGNAL) == before


# -- a real daemon: the signal, the blocking, mmctl meanwhile ---------------------------------


def test_a_daemon_reports_cuts_a_hung_handler_and_answers_status_meanwhile(mm, transit):
    mm.task("Sleepy", SLEEPY)
    mm.task("Echo", ECHO)
    mm.config(sleepy_config(2))
    daemon = mm.start("--slow-handler-s", "0.2")
    # When a handler hangs for 30 s
    transit.send("Sleepy", {"hang": True, "id": 1})
    began = time.monotonic()
    # Then the daemon says so while it hangs, naming where
    line = daemon.expect("stderr", "is holding the event loop", timeout=5)
    assert line.startswith("error: Sleepy: warning: message handler is holding the event "
                           "loop"), line
    assert "Sleepy.py:" in line
    # And mmctl status is answered meanwhile, within its --wait, saying the loop is blocked
    code, out, err = mm.mmctl("status", "--wait", "1")
    assert code == 0, err
    assert "EVENT LOOP BLOCKED: task Sleepy's message handler has held it for" in out
    # And at 2 s the handler is interrupted, reported as its failure
    daemon.expect("stderr", "message handler raised HandlerTimeout", timeout=5)
    assert time.monotonic() - began < 10
    # And the other tasks flow again
    transit.send("Echo", {"id": 2})
    assert transit.receive("out", timeout=5)["echo"] == 2
    code, out, _ = mm.mmctl("status", "--json")
    status = json.loads(out)
    assert "blocked" not in status
    sleepy = status["tasks"]["Sleepy"]
    assert (sleepy["task_message_failure"], sleepy["handler_timeouts"]) == (1, 1)
    daemon.stop_ok()


def test_an_external_task_cut_off_three_times_is_put_in_failsafe_by_its_daemon(mm, transit):
    # Given a stateful task in its own process whose handler hangs, limited to 0.2 s
    mm.task("Stuck", """
        import os
        import time
        from multimodule import Task

        class Stuck(Task):
            is_stateful = True

            def message(self, message):
                self.emit({"pid": os.getpid(), "n": message["n"]})
                time.sleep(30)
    """)
    mm.config("[Stuck]\nis_external = true\nhandler_timeout_s = 0.2\n\n"
              + router_section(route("Stuck", "out")))
    daemon = mm.start("--task-backend", "detached")
    # When three messages hang it
    for n in range(3):
        transit.send("Stuck", {"n": n})
    pid = transit.receive("out", timeout=20)["pid"]
    assert pid != daemon.pid
    # Then its process asks the daemon, which puts it in failsafe and stops it
    daemon.expect("stdout", "task Stuck stopped (failsafe)", timeout=20)
    code, out, err = mm.mmctl("status", "--json")
    assert code == 0, err
    reason = json.loads(out)["failsafe"]["Stuck"]["reason"]
    assert "were interrupted 3 times within 600 s" in reason, reason
    assert [transit.receive("out", timeout=5)["n"] for _ in range(2)] == [1, 2]
