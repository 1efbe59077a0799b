"""named_recur in a running daemon: the config's intervals.NAME override, replacing a schedule
by calling again, config changes restarting schedules, failures, cancellation at stop.

Rates are checked loosely, by counting ticks against generous time bounds."""

from __future__ import annotations

import json
import signal
import time

from multimodule.errors import Empty

from helpers import receive_n, receive_until, router_section, route

RECUR = """
    from multimodule import Task

    class Rec(Task):
        # Asks for one tick every 30 s; the config's intervals.tick may override that.
        def set_config(self, config):
            self.named_recur("tick", 30.0, self.tick)
            self.emit({"configured": dict(config)})

        def tick(self):
            self.emit({"tick": True})
"""


def is_tick(message) -> bool:
    return message.get("tick") is True


def test_config_interval_overrides_the_requested_one(mm, transit):
    # Given a task asking for 30 s ticks, with intervals.tick = 0.05 in its config
    mm.task("Rec", RECUR)
    mm.config("[Rec]\nintervals = { tick = 0.05 }\n\n" + router_section(route("Rec", "out")))
    mm.start()
    # When ten ticks are taken
    receive_until(transit, "out", is_tick)
    ticks = receive_n(transit, "out", 10, timeout=2)
    # Then they were sent about every 0.05 s (the Router's send times, so a slow reader here
    # does not matter): 9 intervals in about 0.45 s, never 30 s apart
    assert all(is_tick(m) for m in ticks)
    sent = [m[".ipc_transit_meta"]["send_ts"] for m in ticks]
    assert 0.3 < sent[-1] - sent[0] < 2.0, sent


def test_interval_change_in_config_restarts_the_schedule(mm, transit):
    # Given the override at 30 s (no tick comes soon)
    mm.task("Rec", RECUR)
    mm.config("[Rec]\nintervals = { tick = 30 }\n\n" + router_section(route("Rec", "out")))
    mm.start()
    receive_until(transit, "out", lambda m: "configured" in m)
    # When the config file sets 0.05 s
    mm.config("[Rec]\nintervals = { tick = 0.05 }\n\n" + router_section(route("Rec", "out")),
              atomic=True)
    # Then ticks come at the new rate soon after
    receive_until(transit, "out", lambda m: m.get("configured", {}).get("intervals")
                  == {"tick": 0.05}, timeout=3)
    started = time.monotonic()
    receive_n(transit, "out", 10, timeout=2)
    assert time.monotonic() - started < 2.5
    # When it goes back to 30 s
    mm.config("[Rec]\nintervals = { tick = 30 }\n\n" + router_section(route("Rec", "out")),
              atomic=True)
    receive_until(transit, "out", lambda m: m.get("configured", {}).get("intervals")
                  == {"tick": 30}, timeout=3)
    # Then the fast schedule is gone: nothing more comes for a while
    try:
        extra = transit.receive("out", timeout=0.5)
    except Empty:
        extra = None
    assert extra is None, extra


def test_calling_named_recur_again_replaces_work_and_interval(mm, transit):
    # Given a task ticking "v1" every 0.05 s, which re-schedules "tick" on a message
    mm.task("Rep", """
        from multimodule import Task

        class Rep(Task):
            def set_config(self, config):
                self.named_recur("tick", 0.05, lambda: self.emit({"v": 1}))

            def message(self, message):
                v, interval = message["v"], message["interval"]
                self.named_recur("tick", interval, lambda: self.emit({"v": v}))
                self.emit({"replaced": v})
    """)
    mm.config("[Rep]\n\n" + router_section(route("Rep", "out")))
    mm.start()
    receive_until(transit, "out", lambda m: m.get("v") == 1)
    # When the schedule is replaced with new work at the same name
    transit.send("Rep", {"v": 2, "interval": 0.05})
    receive_until(transit, "out", lambda m: m.get("replaced") == 2)
    # Then only the new work runs (one schedule per name)
    assert [m.get("v") for m in receive_n(transit, "out", 10)] == [2] * 10
    # When it is replaced with a 30 s interval
    transit.send("Rep", {"v": 3, "interval": 30})
    receive_until(transit, "out", lambda m: m.get("replaced") == 3)
    # Then no tick follows soon (the old 0.05 s schedule is gone)
    try:
        extra = transit.receive("out", timeout=0.5)
    except Empty:
        extra = None
    assert extra is None, extra


def test_failing_scheduled_work_reported_and_schedule_goes_on(mm, transit):
    mm.task("Fails", """
        from multimodule import Task

        class Fails(Task):
            n = 0

            def set_config(self, config):
                self.named_recur("tick", 0.05, self.tick)

            def tick(self):
                self.n += 1
                if self.n % 2:
                    raise RuntimeError(f"odd tick {self.n}")
                self.emit({"n": self.n})
    """)
    # Given scheduled work that raises on every other tick
    mm.config("[Fails]\n\n" + router_section(route("Fails", "out")))
    daemon = mm.start()
    # Then the schedule goes on: the good ticks come through
    assert [m["n"] for m in receive_n(transit, "out", 3)] == [2, 4, 6]
    # and the failures are reported naming the task and the schedule, and counted
    line = daemon.expect("stderr", "scheduled work 'tick' raised")
    assert line.startswith("error: Fails: scheduled work 'tick' raised RuntimeError: odd tick 1")
    status, out, _ = mm.mmctl("status", "--json")
    assert json.loads(out)["tasks"]["Fails"]["recur_failure"] >= 3


def test_schedules_cancelled_at_stop_before_the_final_save(mm, transit):
    # Given a stateful task counting fast ticks in its state (no periodic save)
    mm.task("Count", """
        from multimodule import Task

        class Count(Task):
            is_stateful = True

            def set_config(self, config):
                self.named_recur("tick", 0.01, self.tick)

            def tick(self):
                self.state["ticks"] = self.state.get("ticks", 0) + 1
                self.emit({"n": self.state["ticks"]})
    """)
    mm.config("[Count]\nintervals = { save_state = 60 }\n\n"
              + router_section(route("Count", "out")))
    daemon = mm.start()
    numbers = [m["n"] for m in receive_n(transit, "out", 5)]
    # When the daemon is stopped
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.wait_exit(10) == 0, daemon.output()
    # Then no tick ran after the final save: the saved count is the last tick emitted
    while True:
        try:
            numbers.append(transit.receive("out", timeout=0)["n"])
        except Empty:
            break
    assert numbers == list(range(1, len(numbers) + 1))
    saved = json.loads(mm.state_file("Count").read_text())
    assert saved == {"ticks": numbers[-1]}


def test_scheduled_work_raising_systemexit_or_keyboardinterrupt_reported_schedule_goes_on(
        mm, transit):
    mm.task("Quits", """
        from multimodule import Task

        class Quits(Task):
            n = 0

            def set_config(self, config):
                self.named_recur("tick", 0.05, self.tick)

            # Ticks 1, 5, 9... raise SystemExit, 3, 7, 11... KeyboardInterrupt; even ticks emit.
            def tick(self):
                self.n += 1
                if self.n % 4 == 1:
                    raise SystemExit(f"tick {self.n}")
                if self.n % 4 == 3:
                    raise KeyboardInterrupt(f"tick {self.n}")
                self.emit({"n": self.n})
    """)
    # Given scheduled work that raises SystemExit or KeyboardInterrupt on every odd tick
    mm.config("[Quits]\n\n" + router_section(route("Quits", "out")))
    daemon = mm.start()
    # Then the schedule goes on: the even ticks come through
    assert [m["n"] for m in receive_n(transit, "out", 3)] == [2, 4, 6]
    # and the failures are reported naming the task, the schedule and the exception
    line = daemon.expect("stderr", "scheduled work 'tick' raised SystemExit")
    assert line.startswith("error: Quits: scheduled work 'tick' raised SystemExit: tick 1"), line
    line = daemon.expect("stderr", "scheduled work 'tick' raised KeyboardInterrupt")
    assert line.startswith("error: Quits: scheduled work 'tick' raised KeyboardInterrupt: "
                           "tick 3"), line
    status, out, _ = mm.mmctl("status", "--json")
    assert json.loads(out)["tasks"]["Quits"]["recur_failure"] >= 3
    # and the daemon still runs, and exits 0 on SIGTERM
    assert daemon.proc.poll() is None
    daemon.stop_ok()
