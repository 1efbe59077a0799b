"""External tasks with the detached-process backend (no systemd): started by the daemon,
outliving it, adopted by the next one, restarted on a crash, stopped on request."""

from __future__ import annotations

import json
import os
import random
import signal
import threading

import psutil
import pytest

from helpers import receive_until, router_section, route, saved_state

COUNTER = """
    from multimodule import Task

    class Counter(Task):
        is_stateful = True

        def set_config(self, config):
            self.named_recur("tick", 0.05, self.tick)

        def tick(self):
            ct = self.state.get("ct", 0)
            self.emit({"ct": ct, "pid": __import__("os").getpid()})
            self.state["ct"] = ct + 1
"""

CONFIG = ("[Counter]\nis_external = true\nintervals = { save_state = 0.05 }\n\n"
          + router_section(route("Counter", "out")))


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie whose parent exited does not count: on some machines
    PID 1 never reaps)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def external_status(mm, name="Counter"):
    status, out, err = mm.mmctl("status", "--json")
    assert status == 0, err
    return json.loads(out)["externals"][name]


def next_count(transit, after_pid=None, above=-1):
    """The next count routed to "out" (from a process other than ``after_pid``, above
    ``above``)."""
    return receive_until(transit, "out", lambda m: m["pid"] != after_pid and m["ct"] > above,
                         timeout=20)[0]


def test_external_task_runs_detached_and_its_emits_are_routed(mm, transit):
    mm.task("Counter", COUNTER)
    mm.config(CONFIG)
    # Given a daemon whose config marks the stateful Counter external
    daemon = mm.start("--task-backend", "detached")
    # Then Counter runs in its own process, whose emits the daemon's Router routes to "out"
    first = next_count(transit)
    assert first["pid"] != daemon.pid
    ext = external_status(mm)
    assert ext["backend"] == "detached" and ext["state"] == "active"
    assert ext["pid"] == first["pid"] and os.getsid(ext["pid"]) == ext["pid"]
    status, out, _ = mm.mmctl("status", "--json")
    assert "Counter" not in json.loads(out)["tasks"]  # not loaded in the daemon


def test_external_task_outlives_the_daemon_and_is_adopted_by_the_next(mm, transit):
    mm.task("Counter", COUNTER)
    mm.config(CONFIG)
    daemon = mm.start()
    pid = next_count(transit)["pid"]
    # When the daemon stops without exit_externals
    daemon.stop_ok()
    daemon.expect("stdout", "external tasks keep running: Counter")
    # Then the task process goes on
    assert alive(pid)
    # When a new daemon starts
    second = mm.start()
    # Then it adopts the running process instead of starting another, and routing resumes
    second.wait_line("stdout", f"external task Counter: adopted running process {pid}")
    assert external_status(mm)["pid"] == pid
    assert next_count(transit)["pid"] == pid
    # When it is told to exit with its externals
    status, _, err = mm.mmctl("stop", "--externals")
    assert status == 0, err
    assert second.wait_exit(20) == 0, second.output()
    # Then the task process is gone and its state saved
    second.expect("stdout", "external task Counter stopped")
    assert not alive(pid), f"task process {pid} still runs"
    assert saved_state(mm.state_file("Counter"))["ct"] > 0


def test_crashed_external_task_restarts_and_resumes_from_saved_state(mm, transit):
    mm.task("Counter", COUNTER)
    mm.config(CONFIG)
    daemon = mm.start()
    seen = next_count(transit, above=5)
    # When the task's process is killed
    os.kill(seen["pid"], signal.SIGKILL)
    # Then the daemon notices, starts it again, and the count resumes from the saved state
    daemon.expect("stdout", "external task Counter: process exited", timeout=10)
    resumed = next_count(transit, after_pid=seen["pid"])
    assert resumed["ct"] >= seen["ct"] - 3, (seen, resumed)  # not from 0: from saved state
    assert external_status(mm)["restarts"] == 1


SEQ = """
    from multimodule import Task

    class Seq(Task):
        is_stateful = True

        def message(self, message):
            self.state["handled"] = self.state.get("handled", 0) + 1
            self.emit({"n": message["n"], "pid": __import__("os").getpid()})
"""


def test_migration_both_ways_keeps_state_and_every_message_in_order(mm, transit):
    # Given a stateful task Seq running in the daemon, its emits routed to "out"
    mm.task("Seq", SEQ)
    mm.config("[Seq]\nintervals = { save_state = 0.05 }\n\n" + router_section(route("Seq", "out")))
    daemon = mm.start()
    sent = [0]
    progress = threading.Condition()
    stop = threading.Event()

    def sender():  # a steady stream, about one message per millisecond
        while not stop.is_set():
            transit.send("Seq", {"n": sent[0]})
            with progress:
                sent[0] += 1
                progress.notify_all()
            stop.wait(0.001)

    def wait_sent(count):
        with progress:
            assert progress.wait_for(lambda: sent[0] >= count, 30), sent[0]

    thread = threading.Thread(target=sender)
    # When messages stream to it while it migrates out, runs outside, and migrates back in
    thread.start()
    try:
        wait_sent(50)
        status, _, err = mm.mmctl("migrate", "Seq", "--external", "--wait", "20")
        assert status == 0, err
        daemon.wait_line("stdout", "task Seq now runs in its own process", timeout=20)
        pid_external = external_status(mm, "Seq")["pid"]
        wait_sent(sent[0] + 200)
        status, _, err = mm.mmctl("migrate", "Seq", "--internal", "--wait", "20")
        assert status == 0, err
        daemon.wait_line("stdout", "task Seq now runs in the daemon", timeout=20)
        wait_sent(sent[0] + 50)
    finally:
        stop.set()
        thread.join(30)
    total = sent[0]
    # Then every message came out exactly once, in order, some handled by each process
    got = [transit.receive("out", timeout=20) for _ in range(total)]
    assert [m["n"] for m in got] == list(range(total))
    pids = {m["pid"] for m in got}
    assert pid_external in pids and daemon.pid in pids
    assert transit.stat("out").messages == 0
    # and the state came along both ways: every message counted once
    status, out, _ = mm.mmctl("state", "Seq")
    assert status == 0 and json.loads(out)["handled"] == total
    assert not alive(pid_external)


def test_is_external_changed_in_the_config_file_migrates(mm, transit):
    mm.task("Counter", COUNTER)
    mm.config(CONFIG.replace("is_external = true", "is_external = false"))
    daemon = mm.start()
    seen = next_count(transit, above=3)
    assert seen["pid"] == daemon.pid
    # When the file switches the task to external
    mm.config(CONFIG, atomic=True)
    # Then it moves to its own process and counts on from its state
    moved = next_count(transit, after_pid=daemon.pid)
    assert moved["ct"] >= seen["ct"] and external_status(mm)["pid"] == moved["pid"]


def test_several_externals_beside_an_internal_task(mm, transit):
    # Given two external counters and one internal, all routed to "out"
    for name in ("CountA", "CountB", "CountC"):
        mm.task(name, COUNTER.replace("class Counter", f"class {name}"))
    mm.config("[CountA]\nis_external = true\n\n[CountB]\nis_external = true\n\n[CountC]\n\n"
              + router_section(route("CountA", "out"), route("CountB", "out"),
                               route("CountC", "out")))
    daemon = mm.start()
    # Then each runs where configured: A and B in processes of their own, C in the daemon
    pids: dict[str, int] = {}
    while len(pids) < 3:
        message = transit.receive("out", timeout=20)
        pids[message["source"]] = message["pid"]
    assert pids["CountC"] == daemon.pid
    assert len({pids["CountA"], pids["CountB"], daemon.pid}) == 3
    status, out, _ = mm.mmctl("status", "--json")
    report = json.loads(out)
    assert sorted(report["externals"]) == ["CountA", "CountB"]
    assert "CountC" in report["tasks"]


def test_config_change_reaches_an_external_task(mm, transit):
    mm.task("Counter", COUNTER.replace('self.emit({"ct": ct,',
                                       'self.emit({"ct": ct, "outstr": self.config.get("outstr"),'))
    mm.config(CONFIG.replace("is_external = true\n", 'is_external = true\noutstr = "one"\n'))
    mm.start()
    assert next_count(transit)["outstr"] == "one"
    # When the file changes the external task's config
    mm.config(CONFIG.replace("is_external = true\n", 'is_external = true\noutstr = "two"\n'),
              atomic=True)
    # Then the task's own process takes it
    receive_until(transit, "out", lambda m: m.get("outstr") == "two", timeout=20)


@pytest.mark.slow  # a soak over real processes: about 23 s by design
def test_fifty_random_migrations_while_messages_flow_lose_and_repeat_nothing(mm, transit):
    # Given Seq in the daemon, and a steady stream of numbered messages to it
    mm.task("Seq", SEQ)
    mm.config("[Seq]\nintervals = { save_state = 0.05 }\n\n" + router_section(route("Seq", "out")))
    daemon = mm.start()
    rng = random.Random(20261129)
    sent = [0]
    stop = threading.Event()
    received: list[int] = []

    def sender():
        while not stop.is_set():
            transit.send("Seq", {"n": sent[0]})
            sent[0] += 1
            stop.wait(0.002)

    def reader():  # keeps "out" from filling up while the migrations run
        while not stop.is_set() or len(received) < sent[0]:
            try:
                received.append(transit.receive("out", timeout=20)["n"])
            except Exception:
                return

    threads = [threading.Thread(target=sender), threading.Thread(target=reader)]
    for thread in threads:
        thread.start()
    try:
        # When it is migrated 50 times, each way at random moments
        external = False
        for _ in range(50):
            external = not external
            status, _, err = mm.mmctl("migrate", "Seq",
                                      "--external" if external else "--internal",
                                      "--wait", "30")
            assert status == 0, err
            stop.wait(rng.uniform(0, 0.1))
    finally:
        stop.set()
        threads[0].join(30)
        threads[1].join(60)
    # Then every message came out exactly once, in order
    assert received == list(range(sent[0])), (len(received), sent[0])
    status, out, _ = mm.mmctl("state", "Seq")
    assert json.loads(out)["handled"] == sent[0]
    assert daemon.lines_matching("stdout", "now runs in its own process")


def test_an_external_tasks_process_follows_only_its_own_section(mm, transit):
    mm.task("Follower", """
        import os
        from multimodule import Task

        class Follower(Task):
            is_stateful = True

            def set_config(self, config):
                self.emit({"tag": config.get("tag"), "pid": os.getpid()})
    """)
    mm.task("Aother", """
        import os
        from multimodule import Task

        class Aother(Task):
            def set_config(self, config):
                self.emit({"other": True, "pid": os.getpid()})
    """)
    routes = router_section(route("Follower", "out"), route("Aother", "out"))
    mm.config('[Follower]\nis_external = true\ntag = "a"\n' + routes)
    daemon = mm.start()
    external = receive_until(transit, "out", lambda m: m.get("tag") == "a")[0]["pid"]
    assert external != daemon.pid
    # When the file changes the external task's section and adds another task's
    mm.config('[Aother]\n[Follower]\nis_external = true\ntag = "b"\n' + routes, atomic=True)
    # Then the external process applies its own section; the other task runs in the daemon
    # only (had the process loaded it too, its message would have come before "b")
    tagged, before = receive_until(transit, "out", lambda m: m.get("tag") == "b")
    assert tagged["pid"] == external
    assert all(m["pid"] == daemon.pid for m in before if m.get("other"))
    if not any(m.get("other") for m in before):
        receive_until(transit, "out", lambda m: m.get("other") and m["pid"] == daemon.pid)


def test_a_task_migrated_out_stays_out_when_the_daemon_restarts(mm, transit):
    mm.task("Counter", COUNTER)
    mm.config("[Counter]\nintervals = { save_state = 0.05 }\n\n"
              + router_section(route("Counter", "out")))
    # Given a task the config runs in the daemon, moved out by hand
    daemon = mm.start()
    code, _, err = mm.mmctl("migrate", "Counter", "--external")
    assert code == 0, err
    outside = next_count(transit, after_pid=daemon.pid)
    # When the daemon restarts (the file still says internal)
    daemon.stop_ok()
    daemon = mm.start()
    # Then it adopts the running process instead of starting a second copy
    daemon.wait_line("stdout", "task Counter runs in its own process (moved there before",
                     start=0)
    later = next_count(transit, above=outside["ct"])
    assert later["pid"] == outside["pid"]
    _, skipped = receive_until(transit, "out", lambda m: m["ct"] > later["ct"] + 5)
    assert {m["pid"] for m in skipped} == {outside["pid"]}  # one copy only
    # And `mmctl migrate --internal` brings it back
    assert mm.mmctl("migrate", "Counter", "--internal")[0] == 0
    assert next_count(transit, after_pid=outside["pid"])["pid"] == daemon.pid
