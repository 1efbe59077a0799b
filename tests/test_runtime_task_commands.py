"""``mmctl restart|start|stop TASK``: one task stopped, started, or restarted with its module
imported afresh (its state kept, no message lost), the other tasks untouched; a new version
that does not import or start leaves the old one running."""

from __future__ import annotations

import asyncio

COUNTER = """
    from multimodule import Task

    class Counter(Task):
        is_stateful = True

        def set_config(self, config):
            {set_config}

        def message(self, message):
            self.state["n"] = self.state.get("n", 0) + 1
            self.send("out", {{"n": self.state["n"], "version": {version}}})
"""


def counter(version: int, set_config: str = "pass") -> str:
    return COUNTER.format(version=version, set_config=set_config)


OTHER = """
    from multimodule import Task

    class Other(Task):
        def set_config(self, config):
            self.started = getattr(self, "started", 0) + 1

        def message(self, message):
            pass
"""


async def test_restart_takes_new_code_keeps_state_and_loses_no_message(inproc):
    # Given a stateful task (version 1) beside another task
    inproc.task("Counter", counter(1))
    inproc.task("Other", OTHER)
    inproc.config("[Counter]\n[Other]\n")
    inproc.capture("out")
    daemon = await inproc.start()
    other = daemon.runners["Other"]
    for _ in range(3):
        inproc.send("Counter", {})
    await inproc.quiet()
    assert inproc.taken("out") == [{"n": n, "version": 1} for n in (1, 2, 3)]
    # When its source changes and it is restarted while messages keep coming
    inproc.task("Counter", counter(2))
    restart = asyncio.ensure_future(inproc.mmctl("restart", "Counter"))
    for _ in range(200):
        inproc.send("Counter", {})
        await asyncio.sleep(0)
    code, _, err = await restart
    assert code == 0, err
    for _ in range(2):
        inproc.send("Counter", {})
    await inproc.quiet()
    # Then every message was handled once, in order, the count going on from the state,
    # version 1 up to the restart and version 2 after it
    out = inproc.taken("out")
    assert [m["n"] for m in out] == list(range(4, 206)), out
    versions = [m["version"] for m in out]
    assert versions == sorted(versions) and versions[-1] == 2, versions
    # and the other task was not touched
    assert daemon.runners["Other"] is other and other.task.started == 1
    assert inproc.records_of("log", "task Counter restarted with its module imported afresh")


async def test_a_new_version_that_does_not_import_or_start_leaves_the_old_one(inproc):
    inproc.task("Counter", counter(1))
    inproc.config("[Counter]\n")
    inproc.capture("out")
    daemon = await inproc.start()
    inproc.send("Counter", {})
    await inproc.quiet()
    for broken, said in (("class Counter(Task:\n", "failed to import"),
                         (counter(2, "raise RuntimeError('bad config')"),
                          "the new version did not start, the old one runs again")):
        # When the module is broken (a syntax error; a set_config that raises) and the task
        # is restarted
        inproc.task("Counter", broken)
        code, _, err = await inproc.mmctl("restart", "Counter")
        # Then mmctl exits 1 saying why
        assert code == 1 and said in err, (code, err)
        await inproc.quiet()
        # and version 1 runs on with its state
        inproc.send("Counter", {})
        await inproc.quiet()
        assert inproc.taken("out")[-1]["version"] == 1
    assert [m["n"] for m in inproc.taken("out")] == []  # (taken above)
    assert daemon.runners["Counter"].task.state["n"] == 3


async def test_stop_keeps_a_task_stopped_its_messages_waiting_until_start(inproc, transit):
    inproc.task("Counter", counter(1))
    inproc.config("[Counter]\n")
    inproc.capture("out")
    daemon = await inproc.start()
    inproc.send("Counter", {})
    await inproc.quiet()
    # When it is stopped by hand and messages are sent to it
    code, _, err = await inproc.mmctl("stop", "Counter")
    assert code == 0, err
    for _ in range(5):
        inproc.send("Counter", {})  # as a task in the daemon would: not loaded again
    await inproc.quiet(ignoring=("Counter",))
    # Then it is not loaded, its messages wait in its System V queue, its state is saved
    assert "Counter" not in daemon.runners
    assert transit.stat("Counter").messages == 5
    # and once started, it gets them all, its count going on
    code, _, err = await inproc.mmctl("start", "Counter")
    assert code == 0, err
    await inproc.quiet()
    assert [m["n"] for m in inproc.taken("out")] == [1, 2, 3, 4, 5, 6]


async def test_task_commands_refuse_what_they_cannot_do(inproc):
    inproc.task("Counter", counter(1))
    inproc.config("[Counter]\n")
    await inproc.start()
    # An unknown task: exit 4; the Router cannot be stopped
    for args, code_wanted, said in ((("restart", "Nope"), 4, "no task 'Nope'"),
                                    (("start", "Nope"), 4, "no task 'Nope'"),
                                    (("stop", "Nope"), 4, "no task 'Nope'"),
                                    (("stop", "Router"), 1, "the Router is not stopped")):
        code, _, err = await inproc.mmctl(*args)
        assert code == code_wanted and said in err, (args, code, err)
