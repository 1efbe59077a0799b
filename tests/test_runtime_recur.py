"""named_recur in a running daemon: the config's intervals.NAME override, replacing a schedule
by calling again, config changes restarting schedules, failures, cancellation at stop.

The daemon runs in-process (see tests/inprocess.py). Rates are checked loosely, by counting
ticks against generous time bounds; that a slow schedule is gone is read from the schedules
alive on the loop, not from waiting for a tick that should not come."""

from __future__ import annotations

import asyncio
import json

from helpers import router_section, route, saved_state

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


async def next_until(inproc, predicate, timeout: float = 3.0) -> dict:
    """Await messages on "out" until one satisfies ``predicate`` (bounded); return it."""
    async with asyncio.timeout(timeout):
        while True:
            message = await inproc.next("out", meta=True)
            if predicate(message):
                return message


async def next_n(inproc, count: int, timeout: float = 10.0) -> list[dict]:
    """The next ``count`` messages on "out" (each waited for at most ``timeout`` s)."""
    return [await inproc.next("out", timeout, meta=True) for _ in range(count)]


def live_schedules(task: str) -> list[asyncio.Task]:
    """The schedule coroutines of ``task`` still alive on this loop."""
    return [t for t in asyncio.all_tasks()
            if t.get_name().startswith(f"recur:{task}:") and not t.done()]


async def test_config_interval_overrides_the_requested_one(inproc):
    # Given a task asking for 30 s ticks, with intervals.tick = 0.05 in its config
    inproc.task("Rec", RECUR)
    inproc.config("[Rec]\nintervals = { tick = 0.05 }\n\n" + router_section(route("Rec", "out")))
    inproc.capture("out")
    await inproc.start()
    # When ten ticks are taken
    await next_until(inproc, is_tick)
    ticks = await next_n(inproc, 10, timeout=2)
    # Then they were sent about every 0.05 s (the Router's send times): 9 intervals in about
    # 0.45 s, never 30 s apart
    assert all(is_tick(m) for m in ticks)
    sent = [m[".ipc_transit_meta"]["send_ts"] for m in ticks]
    assert 0.3 < sent[-1] - sent[0] < 2.0, sent


async def test_interval_change_in_config_restarts_the_schedule(inproc):
    # Given the override at 30 s (no tick comes soon)
    inproc.task("Rec", RECUR)
    inproc.config("[Rec]\nintervals = { tick = 30 }\n\n" + router_section(route("Rec", "out")))
    inproc.capture("out")
    daemon = await inproc.start()
    await next_until(inproc, lambda m: "configured" in m)
    # When the config file sets 0.01 s
    inproc.config("[Rec]\nintervals = { tick = 0.01 }\n\n"
                  + router_section(route("Rec", "out")), atomic=True)
    # Then ticks come at the new rate soon after
    await next_until(inproc, lambda m: m.get("configured", {}).get("intervals")
                     == {"tick": 0.01})
    started = asyncio.get_running_loop().time()
    await next_n(inproc, 10, timeout=2)
    assert asyncio.get_running_loop().time() - started < 2.5
    # When it goes back to 30 s
    inproc.config("[Rec]\nintervals = { tick = 30 }\n\n"
                  + router_section(route("Rec", "out")), atomic=True)
    await next_until(inproc, lambda m: m.get("configured", {}).get("intervals")
                     == {"tick": 30})
    await inproc.quiet()
    # Then the fast schedule is gone: the one schedule left waits 30 s for its next tick
    assert len(live_schedules("Rec")) == 1, live_schedules("Rec")
    assert daemon.runners["Rec"].schedules.by_name["tick"].running_interval == 30
    assert [m for m in inproc.taken("out") if is_tick(m)] == []


async def test_calling_named_recur_again_replaces_work_and_interval(inproc):
    # Given a task ticking "v1" every 0.05 s, which re-schedules "tick" on a message
    inproc.task("Rep", """
        from multimodule import Task

        class Rep(Task):
            def set_config(self, config):
                self.named_recur("tick", 0.05, lambda: self.emit({"v": 1}))

            def message(self, message):
                v, interval = message["v"], message["interval"]
                self.named_recur("tick", interval, lambda: self.emit({"v": v}))
                self.emit({"replaced": v})
    """)
    inproc.config("[Rep]\n\n" + router_section(route("Rep", "out")))
    inproc.capture("out")
    daemon = await inproc.start()
    await next_until(inproc, lambda m: m.get("v") == 1)
    # When the schedule is replaced with new work at the same name (every 0.01 s)
    inproc.send("Rep", {"v": 2, "interval": 0.01})
    await next_until(inproc, lambda m: m.get("replaced") == 2)
    # Then only the new work runs (one schedule per name)
    assert [m.get("v") for m in await next_n(inproc, 10)] == [2] * 10
    assert len(live_schedules("Rep")) == 1
    # When it is replaced with a 30 s interval
    inproc.send("Rep", {"v": 3, "interval": 30})
    await next_until(inproc, lambda m: m.get("replaced") == 3)
    await inproc.quiet()
    # Then no tick follows soon: the one schedule left waits 30 s (the fast one is gone)
    assert len(live_schedules("Rep")) == 1, live_schedules("Rep")
    assert daemon.runners["Rep"].schedules.by_name["tick"].running_interval == 30
    assert [m for m in inproc.taken("out") if "v" in m] == []


async def test_failing_scheduled_work_reported_and_schedule_goes_on(inproc):
    inproc.task("Fails", """
        from multimodule import Task

        class Fails(Task):
            n = 0

            def set_config(self, config):
                self.named_recur("tick", 0.01, self.tick)

            def tick(self):
                self.n += 1
                if self.n % 2:
                    raise RuntimeError(f"odd tick {self.n}")
                self.emit({"n": self.n})
    """)
    # Given scheduled work that raises on every other tick
    inproc.config("[Fails]\n\n" + router_section(route("Fails", "out")))
    inproc.capture("out")
    await inproc.start()
    # Then the schedule goes on: the good ticks come through
    assert [m["n"] for m in await next_n(inproc, 3)] == [2, 4, 6]
    # and the failures are reported naming the task and the schedule, and counted
    line = inproc.records_of("error", "scheduled work 'tick' raised")[0].line
    assert line.startswith("error: Fails: scheduled work 'tick' raised RuntimeError: odd tick 1")
    status = (await inproc.control(query="status"))["status"]
    assert status["tasks"]["Fails"]["recur_failure"] >= 3


async def test_schedules_cancelled_at_stop_before_the_final_save(inproc):
    # Given a stateful task counting fast ticks in its state (no periodic save)
    inproc.task("Count", """
        from multimodule import Task

        class Count(Task):
            is_stateful = True

            def set_config(self, config):
                self.named_recur("tick", 0.01, self.tick)

            def tick(self):
                self.state["ticks"] = self.state.get("ticks", 0) + 1
                self.emit({"n": self.state["ticks"]})
    """)
    inproc.config("[Count]\nintervals = { save_state = 60 }\n\n"
                  + router_section(route("Count", "out")))
    inproc.capture("out")
    await inproc.start()
    numbers = [m["n"] for m in await next_n(inproc, 5)]
    # When the daemon is stopped (as on SIGTERM)
    assert await inproc.stop() == 0, inproc.lines("error")
    # Then no tick ran after the final save: the saved count is the last tick emitted
    numbers += [m["n"] for m in inproc.taken("out")]
    assert numbers == list(range(1, len(numbers) + 1))
    saved = saved_state(inproc.state_dir / "Count.state.json")
    assert saved == {"ticks": numbers[-1]}


async def test_scheduled_work_raising_systemexit_or_keyboardinterrupt_reported_schedule_goes_on(
        inproc):
    inproc.task("Quits", """
        from multimodule import Task

        class Quits(Task):
            n = 0

            def set_config(self, config):
                self.named_recur("tick", 0.01, self.tick)

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
    inproc.config("[Quits]\n\n" + router_section(route("Quits", "out")))
    inproc.capture("out")
    await inproc.start()
    # Then the schedule goes on: the even ticks come through
    assert [m["n"] for m in await next_n(inproc, 3)] == [2, 4, 6]
    # and the failures are reported naming the task, the schedule and the exception
    line = inproc.records_of("error", "scheduled work 'tick' raised SystemExit")[0].line
    assert line.startswith("error: Quits: scheduled work 'tick' raised SystemExit: tick 1"), line
    line = inproc.records_of("error", "scheduled work 'tick' raised KeyboardInterrupt")[0].line
    assert line.startswith("error: Quits: scheduled work 'tick' raised KeyboardInterrupt: "
                           "tick 3"), line
    status = (await inproc.control(query="status"))["status"]
    assert status["tasks"]["Quits"]["recur_failure"] >= 3
    # and the daemon still runs, and exits 0 when stopped (as on SIGTERM)
    assert inproc.running
    assert await inproc.stop() == 0
