"""State in a running daemon: saved at SIGTERM after delivering what is in memory, saved
periodically, restored at start, a corrupt state file moved aside, and the temporary files of
saves interrupted by SIGKILL removed at the next start (by the daemon or the task's own process,
each its own).

SIGTERM, killed daemons and many receiver threads stopping run a real daemon subprocess; the
stop during an async handler and the corrupt state file run the daemon in-process (see
tests/inprocess.py)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

from multimodule.state import temp_owner_tag

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


#: A task whose state is about 5 MB of JSON and changes every 10 ms, saved every 10 ms: the
#: daemon is in the middle of a save most of the time.
BIG = """
    from multimodule import Task

    ITEMS = 100_000

    class Big(Task):
        is_stateful = True

        def set_config(self, config):
            if len(self.state.get("blob", ())) != ITEMS:
                self.state["blob"] = ["%07d" % i * 7 for i in range(ITEMS)]
            self.named_recur("bump", 0.01, self.bump)

        def bump(self):
            self.state["version"] = self.state.get("version", 0) + 1
"""

BIG_CONFIG = "[Big]\nintervals = { save_state = 0.01 }\n"


def temp_files(state_dir, owner: str) -> list[str]:
    """The temporary files of ``owner`` (a state lock's name) in ``state_dir`` now."""
    prefix = f"tmp-{temp_owner_tag(owner)}-"
    return sorted(name for name in os.listdir(state_dir)
                  if name.startswith(".") and prefix in name)


def kill_during_a_save(daemon, state_dir, timeout: float = 20.0) -> str | None:
    """SIGKILL ``daemon`` as soon as one of its state saves has a temporary file; return that
    file's name if it is still there once the daemon is dead (``None``: the save finished
    between the look and the kill)."""
    deadline = time.monotonic() + timeout
    while not (seen := [n for n in temp_files(state_dir, "multimodule")
                        if n.startswith(".Big.state.json.tmp-")]):
        assert time.monotonic() < deadline, "no save of Big seen in progress"
    daemon.proc.kill()
    assert daemon.wait_exit() == -signal.SIGKILL
    return seen[0] if (state_dir / seen[0]).exists() else None


def assert_whole_state(path) -> None:
    state = saved_state(path)
    assert isinstance(state["version"], int) and len(state["blob"]) == 100_000


def test_a_daemon_killed_during_saves_leaves_no_temporary_files_and_a_whole_state(
        mm, transit):
    mm.task("Big", BIG)
    mm.config(BIG_CONFIG)
    # Given the temporary file of an external task's save (not the daemon's to remove)
    mm.state_dir.mkdir(mode=0o700)
    external = mm.state_dir / f".Big.state.json.tmp-{temp_owner_tag('task-Big')}-{'0' * 16}"
    external.write_bytes(b"{")
    left: list[str] = []
    for _ in range(10):
        # Given a daemon saving a 5 MB state all the time, with a whole state saved once
        daemon = mm.start()
        wait_for_file(mm.state_file("Big"))
        # Then what an earlier daemon killed during a save left has been removed at start
        assert not [name for name in left if (mm.state_dir / name).exists()]
        if left:
            daemon.wait_line("stdout", "removed 1 temporary file (", start=0)
        # When it is killed (SIGKILL) during a save
        name = kill_during_a_save(daemon, mm.state_dir)
        # Then its temporary file is left, the only one of the daemon's, and the state file
        # holds a whole state, the one before that save
        assert_whole_state(mm.state_file("Big"))
        if name is not None:
            assert temp_files(mm.state_dir, "multimodule") == [name]
            left.append(name)
        if len(left) == 3:
            break
    assert len(left) == 3, "the kills never fell during a save"
    # When a daemon starts on the state dir and stops
    daemon = mm.start()
    daemon.wait_line("stdout", "removed 1 temporary file (", start=0)
    daemon.stop_ok()
    # Then none of the daemon's temporary files is left, the external task's is, and the
    # state is whole
    assert temp_files(mm.state_dir, "multimodule") == []
    assert external.read_bytes() == b"{"
    assert_whole_state(mm.state_file("Big"))
    assert not list(mm.state_dir.glob("Big.state.json.corrupt-*"))


def test_an_external_tasks_process_removes_its_own_temporary_files_only(mm, transit):
    mm.task("Big", BIG)
    mm.config(BIG_CONFIG)
    mm.state_dir.mkdir(mode=0o700)
    # Given temporary files left by a killed process of task Big and by a killed daemon
    own = mm.state_dir / f".Big.state.json.tmp-{temp_owner_tag('task-Big')}-{'1' * 16}"
    daemons = mm.state_dir / f".Big.state.json.tmp-{temp_owner_tag('multimodule')}-{'2' * 16}"
    own.write_bytes(b"x" * 5000)
    daemons.write_bytes(b"y")
    # When the task's own process starts (as its unit or the detached backend starts it)
    process = mm.start("-m", "Big")
    process.stop_ok()
    # Then it removed its own, said so, and left the daemon's
    assert not own.exists() and daemons.read_bytes() == b"y"
    assert "removed 1 temporary file (5000 bytes)" in process.output()


async def test_one_timer_takes_every_tasks_periodic_checkpoint(inproc):
    import asyncio

    from helpers import saved_state

    # Given 50 stateful tasks that save every 0.05 s
    source = """
        from multimodule import Task
        class {name}(Task):
            is_stateful = True
            def message(self, message):
                self.state["n"] = message["n"]
    """
    names = [f"Keep{i}" for i in range(50)]
    for name in names:
        inproc.task(name, source.format(name=name))
    inproc.config("".join(f"[{name}]\nintervals = {{ save_state = 0.05 }}\n" for name in names))
    await inproc.start()
    # Then one timer serves them all (no task per runner waking every interval)
    running = [t.get_name() for t in asyncio.all_tasks()]
    assert running.count("checkpoints") == 1
    assert not [name for name in running if name.startswith("save:")]
    # And each task's checkpoint still follows its state while the daemon runs
    for name in names:
        inproc.send(name, {"n": 7})
    await inproc.quiet()
    deadline = asyncio.get_running_loop().time() + 5
    def saved(name: str) -> int | None:
        path = inproc.state_dir / f"{name}.state.json"  # replaced whole, never half-written
        return saved_state(path).get("n") if path.exists() else None

    while any(saved(name) != 7 for name in names):
        assert asyncio.get_running_loop().time() < deadline, "checkpoints not taken"
        await asyncio.sleep(0.02)
