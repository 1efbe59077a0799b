"""State in a running daemon: saved at SIGTERM after delivering what is in memory, saved
periodically, restored at start, and a corrupt state file moved aside.

SIGTERM, a killed daemon and many receiver threads stopping run a real daemon subprocess; the
stop during an async handler and the corrupt state file run the daemon in-process (see
tests/inprocess.py)."""

from __future__ import annotations

import asyncio

import json
import signal

from helpers import (
    receive_n,
    receive_until,
    saved_state,
    router_section,
    route,
    wait_for_file,
)

FEEDER = """
    from multimodule import Task

    class Feeder(Task):
        # {"count": N}: sends N numbered messages straight to Slow (in memory, at once).
        def message(self, message):
            for i in range(message["count"]):
                self.send("Slow", {"i": i})
"""

#: The first message blocks (holding the loop) until the file "go" exists, after saying so
#: with the file "started"; by then every message the Feeder sent is in Slow's memory queue.
SLOW_SYNC = """
    import os, time
    from multimodule import Task

    class Slow(Task):
        is_stateful = True

        def message(self, message):
            i = message["i"]
            if i == 0:
                open(os.path.join(self.config["dir"], "started"), "w").close()
                deadline = time.monotonic() + 10
                while not os.path.exists(os.path.join(self.config["dir"], "go")):
                    if time.monotonic() > deadline:
                        raise RuntimeError("no go file")
                    time.sleep(0.005)
            self.state["handled"] = self.state.get("handled", 0) + 1
            self.state["last"] = i
            self.emit({"i": i})
"""

#: The same with an async handler that awaits, so the loop (and the shutdown) runs while a
#: message is in progress; it records handlers that overlap. The first message sets
#: ``started`` and awaits ``go`` (asyncio events the test reaches through the task instance,
#: for the in-process daemon).
SLOW_EVENTS = """
    import asyncio
    from multimodule import Task

    class Slow(Task):
        is_stateful = True
        busy = False

        def set_config(self, config):
            self.started, self.go = asyncio.Event(), asyncio.Event()

        async def message(self, message):
            i = message["i"]
            if self.busy:
                self.state["overlaps"] = self.state.get("overlaps", 0) + 1
            self.busy = True
            try:
                if i == 0:
                    self.started.set()
                    await self.go.wait()
                await asyncio.sleep(0.001)
                self.state["handled"] = self.state.get("handled", 0) + 1
                self.state["last"] = i
                self.emit({"i": i})
            finally:
                self.busy = False
"""


def _slow_setup(mm, slow_source: str) -> None:
    mm.task("Feeder", FEEDER)
    mm.task("Slow", slow_source)
    # save_state = 60: no periodic save happens during the test; the file comes from the exit
    mm.config(f'[Feeder]\n\n[Slow]\ndir = "{mm.tmp}"\nintervals = {{ save_state = 60 }}\n\n'
              + router_section(route("Slow", "out")))


def test_sigterm_delivers_messages_in_memory_and_saves_state(mm, transit):
    # Given 600 messages in Slow's memory queue, the first being handled (holding the loop)
    count = 600
    _slow_setup(mm, SLOW_SYNC)
    daemon = mm.start("--slow-handler-s", "30")
    transit.send("Feeder", {"count": count})
    wait_for_file(mm.tmp / "started")
    # When SIGTERM arrives while the handler is busy (then the handler is let go)
    daemon.proc.send_signal(signal.SIGTERM)
    (mm.tmp / "go").touch()
    # Then every message is still handled, in order, and routed out
    got = receive_n(transit, "out", count)
    assert [m["i"] for m in got] == list(range(count))
    # and the daemon exits 0 with the state at exit in the state file
    assert daemon.wait_exit(15) == 0, daemon.output()
    daemon.expect("stdout", "stopping: delivering messages in memory, saving state")
    assert saved_state(mm.state_file("Slow")) == {"handled": count,
                                                             "last": count - 1}
    assert not daemon.lines_matching("stderr", "error"), daemon.output()


async def test_stop_during_async_handler_delivers_the_rest_after_it_in_order(inproc):
    # Given 50 messages in Slow's memory queue, the first in an async handler that awaits
    count = 50
    inproc.task("Feeder", FEEDER)
    inproc.task("Slow", SLOW_EVENTS)
    # save_state = 60: no periodic save happens during the test; the file comes from the exit
    inproc.config("[Feeder]\n\n[Slow]\nintervals = { save_state = 60 }\n\n"
                  + router_section(route("Slow", "out")))
    inproc.capture("out")
    daemon = await inproc.start()
    slow = daemon.runners["Slow"].task
    inproc.send("Feeder", {"count": count})
    async with asyncio.timeout(10):
        await slow.started.wait()
    # When the daemon is asked to stop (as on SIGTERM; the loop is free: the shutdown starts
    # while message 0 is in progress), then the handler is let go
    daemon.request_stop()
    await inproc.record("log", "stopping: delivering messages in memory")
    slow.go.set()
    # Then every message is handled once, in order, never two at a time
    assert await inproc.stop() == 0, inproc.lines("error")
    assert [m["i"] for m in inproc.taken("out")] == list(range(count))
    assert saved_state(inproc.state_dir / "Slow.state.json") == \
        {"handled": count, "last": count - 1}


def test_state_saved_periodically_and_restored_at_start(mm, transit):
    # Given a stateful counter saving every 0.1 s
    mm.task("Counter", """
        from multimodule import Task

        class Counter(Task):
            is_stateful = True

            def message(self, message):
                self.state["ct"] = self.state.get("ct", 0) + 1
                self.emit({"ct": self.state["ct"]})
    """)
    mm.config("[Counter]\nintervals = { save_state = 0.1 }\n\n"
              + router_section(route("Counter", "out")))
    daemon = mm.start()
    for _ in range(3):
        transit.send("Counter", {})
    assert [m["ct"] for m in receive_n(transit, "out", 3)] == [1, 2, 3]
    # Then the state file follows while the daemon runs
    wait_for_file(mm.state_file("Counter"),
                  lambda p: p.exists() and saved_state(p) == {"ct": 3})
    # When the daemon is killed (no chance to save) and started again
    daemon.proc.kill()
    assert daemon.wait_exit() == -signal.SIGKILL
    mm.start()
    # Then the count continues from the saved state (the Router, killed before its own
    # checkpoint, may forward again what it had forwarded: at-least-once, in order)
    transit.send("Counter", {})
    fourth, before = receive_until(transit, "out", lambda m: m["ct"] == 4)
    again = [m["ct"] for m in before]
    assert fourth["ct"] == 4 and again == [1, 2, 3][3 - len(again):], again


async def test_corrupt_state_file_moved_aside_task_starts_empty(inproc):
    # Given a stateful task whose state file is not JSON
    inproc.task("Counter", """
        from multimodule import Task

        class Counter(Task):
            is_stateful = True

            def message(self, message):
                self.state["ct"] = self.state.get("ct", 0) + 1
                self.emit({"ct": self.state["ct"]})
    """)
    inproc.config("[Counter]\n\n" + router_section(route("Counter", "out")))
    inproc.capture("out")
    inproc.state_dir.mkdir(mode=0o700)
    state_file = inproc.state_dir / "Counter.state.json"
    state_file.write_text('{"ct": 41, oops')
    # When the daemon starts
    await inproc.start()
    # Then an error names the file, and it was moved aside with its content kept
    line = [line for line in inproc.lines("error")
            if line.startswith("error: Counter: state file")][0]
    assert str(state_file) in line and "not valid JSON" in line, line
    aside = list(inproc.state_dir.glob("Counter.state.json.corrupt-*"))
    assert len(aside) == 1, list(inproc.state_dir.iterdir())
    assert aside[0].name in line
    assert aside[0].read_text() == '{"ct": 41, oops'
    # and the task starts with empty state and works
    assert (await inproc.control(query="state", task="Counter"))["state"] == {}
    inproc.send("Counter", {})
    assert (await inproc.next("out"))["ct"] == 1
    assert await inproc.stop() == 0
    assert saved_state(state_file) == {"ct": 1}
    assert aside[0].read_text() == '{"ct": 41, oops'


def test_sigterm_with_many_tasks_exits_0(mm):
    # Given a daemon running 30 tasks (each with a System V receiver thread)
    for i in range(30):
        mm.task(f"T{i}", f"""
            from multimodule import Task

            class T{i}(Task):
                def message(self, message):
                    pass
        """)
    mm.config("".join(f"[T{i}]\n" for i in range(30)) + router_section())
    for _ in range(3):
        daemon = mm.start()
        # When it gets SIGTERM / Then it exits 0 (every receiver stopped cleanly)
        status = daemon.terminate()
        assert status == 0, f"exit status {status}\n{daemon.output()}"
