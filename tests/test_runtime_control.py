"""The daemon's control queue and mmctl: config set and read back, state transforms, status,
stop, and mmctl's exit statuses. Each test runs a real daemon subprocess over real System V
queues in its own transit directory."""

from __future__ import annotations

import json

from helpers import mm, router_section, route  # noqa: F401 - mm is a fixture

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
