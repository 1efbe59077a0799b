"""The monitor's arithmetic with an injected clock: rates, means, failures and restarts in
their windows, baselines for adopted processes, a new process starting afresh, alerts."""

from __future__ import annotations

import pytest

from multimodule.monitor.levels import Thresholds
from multimodule.monitor.monitor import Monitor, TaskView
from multimodule.monitor.sources import Figures


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def monitor(clock):
    return Monitor(window_s=10.0, clock=clock, memory_total=1_000_000, started_at=500.0)


def internal(n_in, failures=0, cpu=0.0, since=600.0):
    return TaskView("T", "internal", "running", pid=1, counters={
        "messages_in": n_in, "messages_out": n_in * 2, "task_message_failure": failures,
        "handler_cpu_seconds": cpu, "handler_seconds": cpu, "queue_depth": 3},
        counters_since=since)


def test_rates_and_cpu_of_an_internal_task(monitor, clock):
    # Given samples 1 s apart: 100 messages and 0.5 s of handler CPU per second
    for second in range(4):
        monitor.tick([internal(100 * second, cpu=0.5 * second)], {}, {"T": 0.25})
        clock.now += 1
    row = monitor.rows["T"]
    # Then the rates are per second over the window and the gauges are means
    assert row["messages_in_per_s"] == pytest.approx(100.0)
    assert row["messages_out_per_s"] == pytest.approx(200.0)
    assert row["cpu_percent"] == pytest.approx(50.0)
    assert row["queue_depth"] == 3 and row["windows"]["queue_fill"]["short"] == 0.25


def test_emitted_and_router_route_rates(monitor, clock):
    # Given a Router matching 10 messages per second on route 1 and 1 on route 2, and
    # emitting 5 per second
    def router(second, matches):
        return TaskView("Router", "internal", "running", pid=1, counters={
            "emitted": 5 * second, "route_matches": matches, "unrouted": 7})

    for second in range(3):
        monitor.tick([router(second, [10 * second, second])], {}, {})
        clock.now += 1
    row = monitor.rows["Router"]
    # Then its row has the rates per route, in route order, and its counters as they are
    assert row["route_matches_per_s"] == [pytest.approx(10.0), pytest.approx(1.0)]
    assert row["emitted_per_s"] == pytest.approx(5.0) and row["emitted"] == 10
    assert row["route_matches"] == [20, 2] and row["unrouted"] == 7
    # When its routes change (three now, counting afresh), their rates start afresh too
    monitor.tick([router(3, [4, 0, 0])], {}, {})
    assert monitor.rows["Router"]["route_matches_per_s"] == [None, None, None]
    clock.now += 2
    monitor.tick([router(5, [8, 2, 0])], {}, {})
    assert monitor.rows["Router"]["route_matches_per_s"] == [2.0, 1.0, 0.0]
    # and a task that is no Router has no such figures
    monitor.tick([internal(1)], {}, {})
    assert "route_matches_per_s" not in monitor.rows["T"]


def test_failures_count_within_the_window_and_alert_both_ways(monitor, clock):
    # Given a task loaded after the monitor started, with one failure already
    alerts = monitor.tick([internal(1, failures=1)], {}, {})
    # Then that failure counts: warn at once
    assert [(a.metric, a.new) for a in alerts] == [("message_failures", "warn")]
    # When 10 more come, severe
    clock.now += 1
    alerts = monitor.tick([internal(20, failures=11)], {}, {})
    assert [(a.old, a.new, a.value) for a in alerts] == [("warn", "severe", 11.0)]
    # When the window passes with no new failure, back to ok in one alert
    clock.now += 11
    alerts = monitor.tick([internal(20, failures=11)], {}, {})
    assert [(a.old, a.new) for a in alerts] == [("severe", "ok")]
    assert monitor.rows["T"]["message_failures"] == 11
    assert monitor.rows["T"]["message_failures_in_window"] == 0


def test_counters_of_a_process_older_than_the_monitor_are_a_baseline(monitor, clock):
    # Given an external process adopted with 50 failures from before the daemon started
    view = TaskView("E", "external", "running", pid=7, counters={"task_message_failure": 50},
                    counters_since=100.0, restarts=3)
    # Then they raise nothing; only new ones count
    assert monitor.tick([view], {"E": Figures()}, {}) == []
    view.counters = {"task_message_failure": 51}
    clock.now += 1
    assert [a.value for a in monitor.tick([view], {"E": Figures()}, {})] == [1.0]


def test_restarts_in_the_long_window_flap_to_failsafe(monitor, clock):
    monitor.set_overrides("E", {"restarts": Thresholds(1, 2, 3)})
    levels = []
    # Given an external task whose backend restarted it once per tick (new pid each time)
    for restarts in range(5):
        view = TaskView("E", "external", "running", pid=100 + restarts,
                        counters={"task_message_failure": 0}, counters_since=2000.0,
                        restarts=restarts)
        levels += [a.new for a in monitor.tick([view], {"E": Figures()}, {})
                   if a.metric == "restarts"]
        clock.now += 5
    # Then the first count is a baseline, and the levels rise to failsafe
    assert levels == ["warn", "severe", "failsafe"]
    assert monitor.rows["E"]["restarts_in_window"] == 4


def test_a_new_process_starts_its_figures_afresh_and_startup_is_not_counted(monitor, clock):
    monitor.set_overrides("E", {"cpu_cores": Thresholds(0.5, 0.6, 0.7)})
    starting = TaskView("E", "external", "activating", pid=9, counters=None)
    # Given a process still starting (no counters yet) burning a full core
    assert monitor.tick([starting], {"E": Figures(cpu_seconds=0.0)}, {}) == []
    clock.now += 1
    assert monitor.tick([starting], {"E": Figures(cpu_seconds=1.0)}, {}) == []
    # When it runs the task and idles, the start-up CPU is not charged to it
    running = TaskView("E", "external", "running", pid=9,
                       counters={"task_message_failure": 0}, counters_since=2000.0)
    for cpu in (1.0, 1.1, 1.2):
        clock.now += 1
        assert monitor.tick([running], {"E": Figures(cpu_seconds=cpu)}, {}) == []
    assert monitor.rows["E"]["cpu_percent"] == pytest.approx(10.0)


def test_memory_share_and_queue_only_rows(monitor, clock):
    view = TaskView("E", "external", "running", pid=9, counters={}, counters_since=2000.0)
    alerts = monitor.tick([view], {"E": Figures(memory_bytes=200_000)}, {"E": 0.0, "Q": 0.9})
    # 0.2 of the machine: severe is 0.15; a queue no task owns has its own row and alert
    assert {(a.task, a.metric, a.new) for a in alerts} == {
        ("E", "memory_share", "severe"), ("Q", "queue_fill", "severe")}
    assert monitor.queue_rows["Q"]["level"] == "severe"
    # A task gone from the views is forgotten
    monitor.tick([], {}, {})
    assert "E" not in monitor.rows and "Q" not in monitor.queue_rows


def test_a_stopped_task_has_no_rates_but_its_queue_is_still_watched(monitor, clock):
    for second in range(3):
        monitor.tick([internal(10 * second)], {}, {"T": 0.0})
        clock.now += 1
    assert monitor.rows["T"]["messages_in_per_s"] == pytest.approx(10.0)
    # When the task is stopped (failsafe) and its queue fills
    stopped = TaskView("T", "internal", "failsafe")
    alerts = monitor.tick([stopped], {}, {"T": 0.9})
    # Then its rates are gone and the fill still raises an alert
    assert monitor.rows["T"]["messages_in_per_s"] is None
    assert [(a.metric, a.new) for a in alerts] == [("queue_fill", "severe")]


def test_the_daemon_row_has_no_thread_or_descriptor_levels(monitor, clock):
    me = TaskView("MultiModule", "daemon", "running", pid=1)
    # A daemon hosting 300 tasks has a receiver thread each: not a fault
    alerts = monitor.tick([me], {"MultiModule": Figures(tasks=300, open_fds=500,
                                                        memory_bytes=500_000)}, {})
    assert [(a.metric, a.new) for a in alerts] == [("memory_share", "failsafe")]
    assert monitor.rows["MultiModule"]["threads"] == 300


def test_a_task_moved_back_into_the_daemon_drops_its_process_figures(monitor, clock):
    # Given a task sampled in its own process, with memory, descriptors and threads
    external = TaskView("T", "external", "running", pid=4242, counters={"messages_in": 1})
    monitor.tick([external], {"T": Figures(memory_bytes=50_000, open_fds=40, tasks=7)}, {})
    assert monitor.rows["T"]["memory_bytes"] == 50_000
    # When it runs in the daemon again (no process figures of its own)
    clock.now += 1
    monitor.tick([internal(5)], {}, {})
    # Then its row no longer shows the other process's figures
    row = monitor.rows["T"]
    assert (row["memory_bytes"], row["open_fds"], row["threads"]) == (None, None, None)


def test_forget_drops_the_row_too(monitor, clock):
    monitor.tick([internal(1)], {}, {})
    monitor.forget("T")
    assert "T" not in monitor.rows


def test_a_leaking_internal_task_reaches_failsafe_not_the_daemon_that_hosts_it(monitor,
                                                                               clock):
    # Given a daemon whose process holds 40% of the machine, 35% of it attributed to an
    # internal task (the default memory_share levels: 0.1, 0.15, 0.3 failsafe)
    me = TaskView("MultiModule", "daemon", "running", pid=1)
    alerts = monitor.tick([me, internal(1)], {"MultiModule": Figures(memory_bytes=400_000),
                                              "T": Figures(memory_bytes=350_000)}, {})
    # Then the task reaches failsafe, and the daemon's own memory (the rest) stays ok
    assert {(a.task, a.metric, a.new) for a in alerts} == {("T", "memory_share", "failsafe")}
    rows = monitor.rows
    assert rows["T"]["memory_bytes"] == 350_000
    assert rows["MultiModule"]["memory_bytes"] == 50_000
    assert rows["MultiModule"]["process_memory_bytes"] == 400_000
    assert rows["MultiModule"]["level"] == "ok"
    # When the task is stopped, what its process still holds is the daemon's own
    clock.now += 20
    stopped = TaskView("T", "internal", "failsafe")
    alerts = monitor.tick([me, stopped], {"MultiModule": Figures(memory_bytes=400_000)}, {})
    assert [(a.task, a.metric, a.new) for a in alerts] == \
        [("MultiModule", "memory_share", "failsafe")]


def test_a_figures_short_and_long_windows_agree_with_two_windows_of_their_own():
    # The monitor keeps one series per figure for both windows (16 bytes a sample): its
    # means and rates must be those of two separate windows fed the same samples, across
    # gaps longer than either window and counters that restart
    import random

    from multimodule.monitor.levels import Window
    from multimodule.monitor.monitor import LONG_WINDOW_FACTOR, _Pair

    rng = random.Random(7)
    now = [1000.0]
    clock = lambda: now[0]  # noqa: E731
    pair = _Pair(60.0, clock)
    short, long_ = Window(60.0, clock), Window(60.0 * LONG_WINDOW_FACTOR, clock)
    value = 0.0
    for step in range(3000):
        now[0] += rng.choice([0.5, 5.0, 5.0, 5.0, 30.0, 400.0])
        value = value + rng.uniform(0, 50) if rng.random() > 0.01 else rng.uniform(0, 5)
        pair.add(value)
        short.add(value)
        long_.add(value)
        for got, want in zip(pair.mean() + pair.rate(),
                             (short.mean(), long_.mean(), short.rate(), long_.rate())):
            assert (got is None) == (want is None), step
            if want is not None:
                assert abs(got - want) <= 1e-6 * max(1.0, abs(want)), (step, got, want)
    assert len(pair.times) == len(long_.samples)
