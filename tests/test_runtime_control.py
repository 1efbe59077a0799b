"""The daemon's control queue and mmctl: config set and read back, state transforms, status,
stop, and mmctl's exit statuses. Each test runs a real daemon subprocess over real System V
queues in its own transit directory."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from helpers import router_section, route

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


def test_raw_control_message_sets_config(mm, transit):
    # Given a running Cfg task
    mm.task("Cfg", CONFIG_ECHO)
    mm.config('[Cfg]\noutstr = "a"\n\n' + router_section(route("Cfg", "out")))
    mm.start()
    assert transit.receive("out", timeout=10)["config"] == {"outstr": "a"}
    # When the raw control message is sent to MultiModule_control
    transit.send("MultiModule_control",
                 {".multimodule": {"config": {"Cfg": {"outstr": "b", "intervals": {"x": 2}}}}})
    # Then set_config gets the new table, and a config query returns it
    assert transit.receive("out", timeout=10)["config"] == {"outstr": "b", "intervals": {"x": 2}}
    status, out, _ = mm.mmctl("config", "Cfg")
    assert status == 0 and json.loads(out) == {"outstr": "b", "intervals": {"x": 2}}


def test_control_config_loads_an_unconfigured_task(mm, transit):
    # Given a task module with no section in the config file (so not loaded at start)
    mm.task("Cfg", CONFIG_ECHO)
    mm.config(router_section(route("Cfg", "out")))
    daemon = mm.start()
    assert "Cfg" not in daemon.lines_matching("stdout", "running (pid")[0]
    # When a config for it arrives by control message
    status, _, err = mm.mmctl("config", "Cfg", '{"k": 1}')
    assert status == 0, err
    # Then it is loaded with that config
    assert transit.receive("out", timeout=10)["config"] == {"k": 1}


def test_bad_config_by_control_message_refused_old_kept(mm, transit):
    # Given a running Cfg task
    mm.task("Cfg", CONFIG_ECHO)
    mm.config('[Cfg]\noutstr = "good"\n\n' + router_section(route("Cfg", "out")))
    daemon = mm.start()
    assert transit.receive("out", timeout=10)["config"] == {"outstr": "good"}
    # When a config with a bad reserved key arrives
    status, _, err = mm.mmctl("config", "Cfg", '{"outstr": "bad", "intervals": {"tick": -1}}')
    # Then mmctl reports the daemon's refusal (exit 1), naming the field
    assert status == 1 and "Cfg.intervals.tick" in err, err
    # and the daemon says so on its error channel too, and keeps the old config
    line = daemon.expect("stderr", "config for Cfg refused")
    assert "Cfg.intervals.tick" in line, line
    status, out, _ = mm.mmctl("config", "Cfg")
    assert status == 0 and json.loads(out) == {"outstr": "good"}


def test_state_transform_sets_state_without_reaching_message(mm, transit):
    # Given a stateful task Keeper (state saved every 0.1 s), routed to "out"
    mm.task("Keeper", KEEPER)
    mm.config("[Keeper]\nintervals = { save_state = 0.1 }\n\n"
              + router_section(route("Keeper", "out")))
    daemon = mm.start()
    # When a transform message and then an ordinary one go to Keeper's queue
    transit.send("Keeper", {".multimodule": {"transform": {"ct": 500}}})
    transit.send("Keeper", {"probe": 1})
    # Then message() sees only the ordinary one, with the transform already applied
    first = transit.receive("out", timeout=10)
    assert first["got"] == {"probe": 1}
    assert first["state"] == {"ct": 500}
    # and mmctl state shows it
    status, out, err = mm.mmctl("state", "Keeper")
    assert status == 0, err
    assert json.loads(out) == {"ct": 500}

    # When mmctl state --set sets another key (a transform on Keeper's own queue)
    status, _, err = mm.mmctl("state", "Keeper", "--set", '{"x": "y", "ct": 501}')
    assert status == 0, err
    transit.send("Keeper", {"probe": 2})  # queued behind the transform: handled after it
    second = transit.receive("out", timeout=10)
    # Then the task sees the merged state, and so does mmctl state
    assert second["got"] == {"probe": 2}
    assert second["state"] == {"ct": 501, "x": "y"}
    status, out, _ = mm.mmctl("state", "Keeper")
    assert json.loads(out) == {"ct": 501, "x": "y"}
    # and after a clean stop the state file holds it
    daemon.stop_ok()
    assert json.loads(mm.state_file("Keeper").read_text()) == {"ct": 501, "x": "y"}


def test_transform_to_a_stateless_task_is_refused(mm, transit):
    # Given a stateless task that echoes what it handles
    mm.task("Echo", """
        from multimodule import Task

        class Echo(Task):
            def message(self, message):
                self.emit({"got": {k: v for k, v in message.items()
                                   if k != ".ipc_transit_meta"}})
    """)
    mm.config("[Echo]\n\n" + router_section(route("Echo", "out")))
    daemon = mm.start()
    # When a transform is sent to it, then a normal message
    transit.send("Echo", {".multimodule": {"transform": {"ct": 1}}})
    transit.send("Echo", {"n": 1})
    # Then the transform is reported and not delivered; the next message is
    daemon.expect("stderr", "error: Echo: state transform sent to a stateless task")
    assert transit.receive("out", timeout=10)["got"] == {"n": 1}


def test_status_json_lists_tasks_and_pid(mm, transit):
    mm.task("Keeper", KEEPER)
    # Given a daemon that has passed one message through Keeper and the Router
    mm.config("[Keeper]\n\n" + router_section(route("Keeper", "out")))
    daemon = mm.start()
    transit.send("Keeper", {"probe": 1})
    transit.receive("out", timeout=10)
    # When mmctl status --json asks / Then it gets the daemon's pid and per-task counters
    status, out, err = mm.mmctl("status", "--json")
    assert status == 0, err
    report = json.loads(out)
    assert report["pid"] == daemon.pid
    assert set(report["tasks"]) == {"Keeper", "Router"}
    keeper = report["tasks"]["Keeper"]
    assert (keeper["stateful"], keeper["messages_in"], keeper["emitted"]) == (True, 1, 1)
    assert report["tasks"]["Router"]["messages_in"] == 1
    # and the plain form names the pid and the tasks
    status, out, _ = mm.mmctl("status")
    assert status == 0
    assert f"pid {daemon.pid}" in out and "Keeper" in out


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
    # Then the daemon exits 0 on its own, having saved the state
    assert daemon.wait_exit(15) == 0, daemon.output()
    daemon.expect("stdout", "cleanly_exit requested")
    assert json.loads(mm.state_file("Keeper").read_text()) == {"ct": 7}
    assert not (mm.state_dir / "multimodule.status.json").exists()


def test_unknown_control_item_reported_daemon_keeps_serving(mm, transit):
    # Given a running daemon
    mm.config(router_section())
    daemon = mm.start()
    # When malformed control messages arrive
    transit.send("MultiModule_control", {".multimodule": {"control": [{"type": "dance"}]}})
    transit.send("MultiModule_control", {"no": "key"})
    # Then each is reported, and the daemon still answers queries
    daemon.expect("stderr", "control message refused: .multimodule.control.0.type: Input "
                            "should be 'cleanly_exit' or 'reload' (got 'dance')")
    daemon.expect("stderr", "control message refused: a control message needs a "
                            "'.multimodule' object")
    status, out, _ = mm.mmctl("status", "--json")
    assert status == 0 and json.loads(out)["pid"] == daemon.pid


# -- mmctl exit statuses ----------------------------------------------------------------------


def test_mmctl_status_against_a_stopped_daemon_exits_3(mm):
    # Given no daemon running on this transit directory
    # When mmctl status waits 1 s
    result = mm.mmctl_proc("status", "--wait", "1")
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


def _reply_queues(mm) -> list[str]:
    """Names starting with ``mmctl-reply-`` in the transit dir and in ``mmctl queues``."""
    status, out, err = mm.mmctl("queues", "--json")
    assert status == 0, err
    listed = [row["name"] for row in json.loads(out)]
    files = os.listdir(mm.transit_dir)
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


def test_commands_given_while_no_daemon_runs_expire_instead_of_firing_later(mm, transit):
    # Given no daemon running, and a task module Cfg that has no config section
    mm.task("Cfg", CONFIG_ECHO)
    mm.config(router_section(route("Cfg", "out")))
    # When mmctl stop, reload and config are run, each waiting 0.5 s
    for args in (("stop",), ("reload",), ("config", "Cfg", '{"k": 1}')):
        status, _, err = mm.mmctl(*args, "--wait", "0.5")
        # Then each exits 3 (not running), leaving no reply queue behind
        assert status == 3, (args, err)
        assert "did not answer" in err, err
    assert _reply_queues(mm) == []
    # (their messages are still on the control queue)
    assert transit.stat("MultiModule_control").messages == 3

    # When a daemon is started afterwards on that transit dir
    daemon = mm.start()
    # Then it logs the three messages as expired, ignored
    for _ in range(3):
        daemon.expect("stdout", "ignored an expired control message")
    # and keeps running: it answers status (handled after the stale messages, in order)
    status, out, err = mm.mmctl("status", "--json")
    assert status == 0, err
    assert json.loads(out)["pid"] == daemon.pid
    assert daemon.proc.poll() is None
    assert not daemon.lines_matching("stdout", "cleanly_exit requested"), daemon.output()
    # and the stale config did not load Cfg
    status, _, err = mm.mmctl("config", "Cfg")
    assert status == 4, err
    daemon.stop_ok()


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
    assert _reply_queues(mm) == []
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


def test_invalid_control_messages_refused_naming_the_field_daemon_keeps_serving(mm, transit):
    # Given a running daemon
    mm.config(router_section())
    daemon = mm.start()
    # When each invalid control message arrives
    for message, words in REFUSED:
        transit.send("MultiModule_control", message)
        # Then it is refused with a line naming what is wrong
        line = daemon.expect("stderr", "control message refused: ")
        assert words in line, (message, line)
    # and the daemon still answers, without a traceback anywhere
    status, out, err = mm.mmctl("status", "--json")
    assert status == 0, err
    assert json.loads(out)["pid"] == daemon.pid
    assert not daemon.lines_matching("stderr", "Traceback"), daemon.output()
    assert not daemon.lines_matching("stderr", "control message failed"), daemon.output()
    daemon.stop_ok()


def test_refused_control_message_answered_on_its_reply_queue(mm, transit):
    # Given a running daemon and a reply queue
    mm.config(router_section())
    mm.start()
    transit.sysv_queue("reply-here")
    # When a control message with a bad query names that reply queue
    transit.send("MultiModule_control",
                 {".multimodule": {"query": "bogus", "reply_to": "reply-here"}})
    # Then the refusal comes back there, naming the field
    reply = transit.receive("reply-here", timeout=10)
    assert reply["error"].startswith("control message refused: .multimodule.query"), reply


def test_control_message_with_a_bad_reply_queue_name_refused_without_traceback(mm, transit):
    # Given a running daemon
    mm.config(router_section())
    daemon = mm.start()
    # When a control message names a reply queue that is no valid queue name
    transit.send("MultiModule_control",
                 {".multimodule": {"query": "status", "reply_to": "a/b"}})
    # Then it is refused naming reply_to, with no traceback, and the daemon still answers
    line = daemon.expect("stderr", "control message")
    assert "control message refused: .multimodule.reply_to" in line, line
    status, _, err = mm.mmctl("status")
    assert status == 0, err
    assert not daemon.lines_matching("stderr", "Traceback"), daemon.output()


def test_mmctl_config_for_an_unknown_task_exits_4_and_sets_nothing(mm):
    # Given a running daemon with no task Nosuchtask
    mm.config(router_section())
    mm.start()
    # When mmctl sets a config for it / Then it exits 4 (no such task), as other commands do
    status, _, err = mm.mmctl("config", "Nosuchtask", '{"a": 1}')
    assert status == 4 and "Nosuchtask" in err, (status, err)
    status, _, _ = mm.mmctl("config", "Nosuchtask")
    assert status == 4
