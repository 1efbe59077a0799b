"""The daemon's control queue and mmctl: config set and read back, state transforms, status,
stop, and mmctl's exit statuses. The control logic runs in-process (see tests/inprocess.py;
mmctl there runs in a worker thread over the real control queue); mmctl's exit statuses, the
daemon exiting on ``mmctl stop`` and a daemon that answers late run a real daemon subprocess.
Every test has real System V queues in its own transit directory."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

from helpers import router_section, route, saved_state

CONFIG_ECHO = """
    from multimodule import Task

    class Cfg(Task):
        # Every config it is given goes out (to the Router) so the test can see it.
        def set_config(self, config):
            self.emit({"config": dict(config)})

        def message(self, message):
            pass
"""

KEEPER = """
    from multimodule import Task

    class Keeper(Task):
        is_stateful = True

        # Every message it handles goes out with a copy of its state at that moment.
        def message(self, message):
            message.pop(".ipc_transit_meta", None)
            self.emit({"got": message, "state": dict(self.state)})
"""


def test_config_set_by_mmctl_reaches_set_config_and_reads_back(mm, transit):
    # Given a daemon running task Cfg with a config from the file, routed to queue "out"
    mm.task("Cfg", CONFIG_ECHO)
    mm.config('[Cfg]\noutstr = "from-file"\n\n' + router_section(route("Cfg", "out")))
    mm.start()
    assert transit.receive("out", timeout=10)["config"] == {"outstr": "from-file"}
    # When mmctl replaces Cfg's config
    status, _, err = mm.mmctl("config", "Cfg", '{"outstr": "from-mmctl", "n": 2}')
    assert status == 0, err
    # Then the task's set_config sees it
    seen = transit.receive("out", timeout=10)
    assert seen["config"] == {"outstr": "from-mmctl", "n": 2}
    assert seen["source"] == "Cfg"
    # and mmctl config Cfg prints it
    status, out, err = mm.mmctl("config", "Cfg")
    assert status == 0, err
    assert json.loads(out) == {"outstr": "from-mmctl", "n": 2}


async def test_raw_control_message_sets_config(inproc, transit):
    # Given a running Cfg task
    inproc.task("Cfg", CONFIG_ECHO)
    inproc.config('[Cfg]\noutstr = "a"\n\n' + router_section(route("Cfg", "out")))
    inproc.capture("out")
    await inproc.start()
    assert (await inproc.next("out"))["config"] == {"outstr": "a"}
    # When the raw control message is sent to MultiModule_control (over System V)
    transit.send("MultiModule_control",
                        {".multimodule": {"config": {"Cfg": {"outstr": "b",
                                                             "intervals": {"x": 2}}}}})
    # Then set_config gets the new table, and a config query returns it
    assert (await inproc.next("out"))["config"] == {"outstr": "b", "intervals": {"x": 2}}
    reply = await inproc.control(query="config", task="Cfg")
    assert reply["config"] == {"outstr": "b", "intervals": {"x": 2}}, reply


async def test_control_config_loads_an_unconfigured_task(inproc):
    # Given a task module with no section in the config file (so not loaded at start)
    inproc.task("Cfg", CONFIG_ECHO)
    inproc.config(router_section(route("Cfg", "out")))
    inproc.capture("out")
    daemon = await inproc.start()
    assert "Cfg" not in daemon.runners
    assert "Cfg" not in inproc.records_of("log", "running (pid")[0].text
    # When a config for it arrives by control message
    assert await inproc.control(config={"Cfg": {"k": 1}}) == {"ok": True}
    # Then it is loaded with that config
    assert (await inproc.next("out"))["config"] == {"k": 1}


async def test_bad_config_by_control_message_refused_old_kept(inproc):
    # Given a running Cfg task
    inproc.task("Cfg", CONFIG_ECHO)
    inproc.config('[Cfg]\noutstr = "good"\n\n' + router_section(route("Cfg", "out")))
    inproc.capture("out")
    await inproc.start()
    assert (await inproc.next("out"))["config"] == {"outstr": "good"}
    # When a config with a bad reserved key arrives
    status, _, err = await inproc.mmctl("config", "Cfg",
                                        '{"outstr": "bad", "intervals": {"tick": -1}}')
    # Then mmctl reports the daemon's refusal (exit 1), naming the field
    assert status == 1 and "Cfg.intervals.tick" in err, err
    # and the daemon says so on its error channel too, and keeps the old config
    line = (await inproc.record("error", "config for Cfg refused")).line
    assert "Cfg.intervals.tick" in line, line
    status, out, _ = await inproc.mmctl("config", "Cfg")
    assert status == 0 and json.loads(out) == {"outstr": "good"}
    await inproc.quiet()
    assert inproc.taken("out") == []  # set_config never saw the bad table


async def test_state_transform_sets_state_without_reaching_message(inproc, transit):
    # Given a stateful task Keeper (state saved every 0.1 s), routed to "out"
    inproc.task("Keeper", KEEPER)
    inproc.config("[Keeper]\nintervals = { save_state = 0.1 }\n\n"
                  + router_section(route("Keeper", "out")))
    inproc.capture("out")
    await inproc.start()
    # When a transform message and then an ordinary one go to Keeper's queue (System V)
    transit.send("Keeper", {".multimodule": {"transform": {"ct": 500}}})
    transit.send("Keeper", {"probe": 1})
    # Then message() sees only the ordinary one, with the transform already applied
    first = await inproc.next("out")
    assert first["got"] == {"probe": 1}
    assert first["state"] == {"ct": 500}
    # and mmctl state shows it
    status, out, err = await inproc.mmctl("state", "Keeper")
    assert status == 0, err
    assert json.loads(out) == {"ct": 500}

    # When mmctl state --set sets another key (a transform on Keeper's own queue)
    status, _, err = await inproc.mmctl("state", "Keeper", "--set", '{"x": "y", "ct": 501}')
    assert status == 0, err
    transit.send("Keeper", {"probe": 2})  # queued behind the transform: handled after it
    second = await inproc.next("out")
    # Then the task sees the merged state, and so does mmctl state
    assert second["got"] == {"probe": 2}
    assert second["state"] == {"ct": 501, "x": "y"}
    status, out, _ = await inproc.mmctl("state", "Keeper")
    assert json.loads(out) == {"ct": 501, "x": "y"}
    # and after a clean stop the state file holds it
    assert await inproc.stop() == 0
    assert saved_state(inproc.state_dir / "Keeper.state.json") == \
        {"ct": 501, "x": "y"}


async def test_transform_to_a_stateless_task_is_refused(inproc, transit):
    # Given a stateless task that echoes what it handles
    inproc.task("Echo", """
        from multimodule import Task

        class Echo(Task):
            def message(self, message):
                self.emit({"got": {k: v for k, v in message.items()
                                   if k != ".ipc_transit_meta"}})
    """)
    inproc.config("[Echo]\n\n" + router_section(route("Echo", "out")))
    inproc.capture("out")
    await inproc.start()
    # When a transform is sent to it, then a normal message
    transit.send("Echo", {".multimodule": {"transform": {"ct": 1}}})
    transit.send("Echo", {"n": 1})
    # Then the transform is reported and not delivered; the next message is
    record = await inproc.record("error", "state transform sent to a stateless task")
    assert record.line.startswith("error: Echo: state transform sent to a stateless task")
    assert (await inproc.next("out"))["got"] == {"n": 1}
    await inproc.quiet()
    assert inproc.taken("out") == []


async def test_status_json_lists_tasks_and_pid(inproc, transit):
    inproc.task("Keeper", KEEPER)
    # Given a daemon that has passed one message through Keeper and the Router
    inproc.config("[Keeper]\n\n" + router_section(route("Keeper", "out")))
    inproc.capture("out")
    await inproc.start()
    transit.send("Keeper", {"probe": 1})
    await inproc.next("out")
    # When mmctl status --json asks / Then it gets the daemon's pid and per-task counters
    status, out, err = await inproc.mmctl("status", "--json")
    assert status == 0, err
    report = json.loads(out)
    assert report["pid"] == os.getpid()
    assert set(report["tasks"]) == {"Keeper", "Router"}
    keeper = report["tasks"]["Keeper"]
    assert (keeper["stateful"], keeper["messages_in"], keeper["emitted"]) == (True, 1, 1)
    assert report["tasks"]["Router"]["messages_in"] == 1
    # and the plain form names the pid and the tasks
    status, out, _ = await inproc.mmctl("status")
    assert status == 0
    assert f"pid {os.getpid()}" in out and "Keeper" in out


def test_mmctl_stop_exits_cleanly_with_state_saved(mm, transit):
    # Given a stateful task with state set
    mm.task("Keeper", KEEPER)
    mm.config("[Keeper]\n\n" + router_section(route("Keeper", "out")))
    daemon = mm.start()
    transit.send("Keeper", {".multimodule": {"transform": {"ct": 7}}})
    transit.send("Keeper", {"probe": 1})
    transit.receive("out", timeout=10)
    # When mmctl stop is run
    status, _, err = mm.mmctl("stop")
    assert status == 0, err
    # Then it returned once the daemon had exited (as systemctl stop does), 0, state saved
    assert daemon.proc.poll() == 0, daemon.output()
    assert daemon.wait_exit(15) == 0, daemon.output()
    daemon.expect("stdout", "cleanly_exit requested")
    assert saved_state(mm.state_file("Keeper")) == {"ct": 7}
    assert not (mm.state_dir / "multimodule.status.json").exists()


async def test_unknown_control_item_reported_daemon_keeps_serving(inproc, transit):
    # Given a running daemon
    inproc.config(router_section())
    await inproc.start()
    # When malformed control messages arrive (over System V)
    transit.send("MultiModule_control",
                        {".multimodule": {"control": [{"type": "dance"}]}})
    transit.send("MultiModule_control", {"no": "key"})
    await inproc.quiet()
    # Then each is reported, in order, and the daemon still answers queries
    refused = [r.line for r in inproc.records_of("error", "control message refused")]
    assert len(refused) == 2, refused
    assert refused[0].startswith(
        "error: MultiModule: control message refused: .multimodule.control.0.type: Input "
        "should be 'cleanly_exit' or 'reload' (got 'dance')"), refused
    assert refused[1].startswith(
        "error: MultiModule: control message refused: a control message needs a "
        "'.multimodule' object"), refused
    reply = await inproc.control(query="status")
    assert reply["status"]["pid"] == os.getpid()


# -- mmctl exit statuses ----------------------------------------------------------------------


def test_mmctl_status_against_a_stopped_daemon_exits_3(mm):
    # Given no daemon running on this transit directory
    # When mmctl status waits 0.3 s
    result = mm.mmctl_proc("status", "--wait", "0.3")
    # Then it exits 3 (not running) saying the daemon did not answer
    assert result.returncode == 3, result
    assert "did not answer" in result.stderr


def test_mmctl_state_and_config_of_unknown_task_exit_4(mm):
    # Given a running daemon / When mmctl asks about a task it does not run
    # Then mmctl exits 4 (no such task)
    mm.config(router_section())
    mm.start()
    for command in ("state", "config"):
        result = mm.mmctl_proc(command, "NoSuchTask")
        assert result.returncode == 4, result
        assert "no task 'NoSuchTask' is loaded" in result.stderr


def test_mmctl_state_of_stateless_task_exits_1(mm):
    # Given a running daemon / When mmctl asks for a stateless task's state / Then it fails
    mm.config(router_section())
    mm.start()
    status, _, err = mm.mmctl("state", "Router")
    assert status == 1
    assert "task Router is not stateful" in err


def test_mmctl_bad_json_exits_2(mm):
    # Given a running daemon / When mmctl gets bad JSON / Then it exits 2 (usage)
    mm.config(router_section())
    mm.start()
    status, _, err = mm.mmctl("config", "Router", "{nope")
    assert status == 2 and "not valid JSON" in err
    status, _, err = mm.mmctl("state", "Router", "--set", "[1]")
    assert status == 2 and "must be a JSON object" in err


def test_mmctl_state_set_for_unknown_task_exits_4_and_creates_no_queue(mm, transit):
    # Given a running daemon
    mm.config(router_section())
    mm.start()
    # When mmctl state --set names a task the daemon does not run
    status, _, err = mm.mmctl("state", "NoSuch", "--set", '{"a": 1}')
    # Then it exits 4 (no such task), and no transform was sent: no queue "NoSuch" exists
    assert status == 4, err
    assert "no task 'NoSuch' is loaded" in err
    assert not transit.exists("NoSuch")
    assert "NoSuch" not in os.listdir(mm.transit_dir)


def test_mmctl_state_set_for_stateless_task_exits_1(mm):
    # Given a running daemon / When mmctl state --set names a stateless task
    mm.config(router_section())
    mm.start()
    status, _, err = mm.mmctl("state", "Router", "--set", '{"a": 1}')
    # Then it exits 1 saying the task is not stateful
    assert status == 1, err
    assert "task Router is not stateful" in err


# -- expiry and reply queues ------------------------------------------------------------------


def _reply_queues(mmctl_status_out: tuple[int, str, str], transit_dir: Path) -> list[str]:
    """Names starting with ``mmctl-reply-`` in the transit dir and in the output of
    ``mmctl queues --json``."""
    status, out, err = mmctl_status_out
    assert status == 0, err
    listed = [row["name"] for row in json.loads(out)]
    files = os.listdir(transit_dir)
    return [n for n in listed + files if n.startswith("mmctl-reply-")]


def _wait_stopped(pid: int, timeout: float = 5.0) -> None:
    """Wait (bounded) until process ``pid`` is stopped (state T after SIGSTOP)."""
    deadline = time.monotonic() + timeout
    while True:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state in ("T", "t"):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} not stopped within {timeout} s (state {state})")
        time.sleep(0.002)


async def test_commands_given_while_no_daemon_runs_expire_instead_of_firing_later(
        inproc, transit):
    # Given no daemon running, and a task module Cfg that has no config section
    inproc.task("Cfg", CONFIG_ECHO)
    inproc.config(router_section(route("Cfg", "out")))
    # When mmctl stop, reload and config are run, each waiting 0.2 s
    for args in (("stop",), ("reload",), ("config", "Cfg", '{"k": 1}')):
        status, _, err = await inproc.mmctl(*args, "--wait", "0.2")
        # Then each exits 3 (not running), leaving no reply queue behind
        assert status == 3, (args, err)
        assert "did not answer" in err, err
    assert _reply_queues(await inproc.mmctl("queues", "--json"), inproc.transit.path) == []
    # (their messages are still on the control queue)
    assert transit.stat("MultiModule_control").messages == 3

    # When a daemon is started afterwards on that transit dir
    daemon = await inproc.start()
    # Then it logs the three messages as expired, ignored
    assert len(inproc.records_of("log", "ignored an expired control message")) == 3
    # and keeps running: it answers status (handled after the stale messages, in order)
    status, out, err = await inproc.mmctl("status", "--json")
    assert status == 0, err
    assert json.loads(out)["pid"] == os.getpid()
    assert inproc.running
    assert not inproc.records_of("log", "cleanly_exit requested"), inproc.lines()
    # and the stale config did not load Cfg
    status, _, err = await inproc.mmctl("config", "Cfg")
    assert status == 4, err
    assert "Cfg" not in daemon.runners
    assert await inproc.stop() == 0


def test_query_that_timed_out_leaves_no_reply_queue_when_the_daemon_answers_late(mm, transit):
    # Given a running daemon, stopped with SIGSTOP
    mm.config(router_section())
    daemon = mm.start()
    os.kill(daemon.pid, signal.SIGSTOP)
    try:
        _wait_stopped(daemon.pid)
        # When mmctl status gives up after 0.5 s
        status, _, err = mm.mmctl("status", "--wait", "0.5")
        assert status == 3, err
        # and a query that has not expired names a reply queue that is gone by the time
        # the daemon reads it
        transit.sysv_queue("mmctl-reply-gone")
        transit.send("MultiModule_control", {".multimodule": {
            "query": "status", "reply_to": "mmctl-reply-gone", "expires_at": time.time() + 600}})
        transit.remove("mmctl-reply-gone")
    finally:
        # and the daemon is let go
        os.kill(daemon.pid, signal.SIGCONT)
    # Then once it has handled those messages (control messages are handled in order, so a
    # later status that succeeds comes after them)
    status, out, err = mm.mmctl("status", "--json")
    assert status == 0, err
    assert json.loads(out)["pid"] == daemon.pid
    daemon.expect("stdout", "ignored an expired control message")
    # no mmctl-reply-* queue exists: neither mmctl's nor the vanished one was re-created
    assert _reply_queues(mm.mmctl("queues", "--json"), mm.transit_dir) == []
    daemon.stop_ok()


# -- control message validation ---------------------------------------------------------------

REFUSED = [
    ({".multimodule": "x"}, "a control message needs a '.multimodule' object"),
    ({".multimodule": {}}, "the '.multimodule' object is empty"),
    ({".multimodule": {"control": "notalist"}},
     ".multimodule.control: Input should be a valid list"),
    ({".multimodule": {"control": [{"type": "bogus"}]}}, ".multimodule.control.0.type: "),
    ({".multimodule": {"config": {"1bad": {}}}},
     ".multimodule.config.1bad: Value error, '1bad' is not a task name"),
    ({".multimodule": {"query": "state"}}, "query 'state' needs a task"),
    ({".multimodule": {"query": "state", "task": ["x"]}},
     ".multimodule.task: Input should be a valid string"),
]


def errors_logged(caplog) -> list[str]:
    """What the event loop logged at ERROR (an exception nobody handled: a traceback on the
    daemon's standard error)."""
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def test_invalid_control_messages_refused_naming_the_field_daemon_keeps_serving(
        inproc, caplog):
    # Given a running daemon
    inproc.config(router_section())
    await inproc.start()
    # When each invalid control message arrives
    for message, words in REFUSED:
        before = len(inproc.records_of("error", "control message refused: "))
        await inproc.raw_control(message)
        # Then it is refused with a line naming what is wrong
        refused = inproc.records_of("error", "control message refused: ")
        assert len(refused) == before + 1, (message, inproc.lines())
        assert words in refused[-1].line, (message, refused[-1].line)
    # and the daemon still answers, without a traceback anywhere
    reply = await inproc.control(query="status")
    assert reply["status"]["pid"] == os.getpid()
    assert not [line for line in inproc.lines() if "Traceback" in line], inproc.lines()
    assert not inproc.records_of("error", "control message failed"), inproc.lines()
    assert not errors_logged(caplog)
    assert await inproc.stop() == 0


async def test_refused_control_message_answered_on_its_reply_queue(inproc):
    # Given a running daemon and a reply queue
    inproc.config(router_section())
    await inproc.start()
    # When a control message with a bad query names that reply queue
    reply = await inproc.raw_control(
        {".multimodule": {"query": "bogus", "reply_to": "reply-here"}}, reply_to="reply-here")
    # Then the refusal comes back there, naming the field
    assert reply["error"].startswith("control message refused: .multimodule.query"), reply


async def test_control_message_with_a_bad_reply_queue_name_refused_without_traceback(
        inproc, caplog):
    # Given a running daemon
    inproc.config(router_section())
    await inproc.start()
    # When a control message names a reply queue that is no valid queue name
    await inproc.raw_control({".multimodule": {"query": "status", "reply_to": "a/b"}})
    # Then it is refused naming reply_to, with no traceback, and the daemon still answers
    line = inproc.records_of("error", "control message")[0].line
    assert "control message refused: .multimodule.reply_to" in line, line
    reply = await inproc.control(query="status")
    assert reply is not None and "status" in reply, inproc.lines()
    assert not [line for line in inproc.lines() if "Traceback" in line], inproc.lines()
    assert not errors_logged(caplog)


def test_mmctl_config_for_an_unknown_task_exits_4_and_sets_nothing(mm):
    # Given a running daemon with no task Nosuchtask
    mm.config(router_section())
    mm.start()
    # When mmctl sets a config for it / Then it exits 4 (no such task), as other commands do
    status, _, err = mm.mmctl("config", "Nosuchtask", '{"a": 1}')
    assert status == 4 and "Nosuchtask" in err, (status, err)
    status, _, _ = mm.mmctl("config", "Nosuchtask")
    assert status == 4


def test_mmctl_stop_no_block_returns_once_the_daemon_has_the_request(mm):
    # Given a daemon
    mm.config("")
    daemon = mm.start()
    # When mmctl stop --no-block is run
    status, _, err = mm.mmctl("stop", "--no-block")
    # Then it exits 0, and the daemon exits 0 on its own
    assert status == 0, err
    assert daemon.wait_exit(15) == 0, daemon.output()
