"""Levels, windows and alerts, with an injected clock (no waiting)."""

from __future__ import annotations

import pytest

from multimodule.monitor.levels import (
    DEFAULT_THRESHOLDS,
    LevelTracker,
    Thresholds,
    Window,
)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_threshold_levels():
    t = Thresholds(1.4, 1.6, 1.9)
    assert [t.level(v) for v in (None, 0.0, 1.39, 1.4, 1.6, 1.95)] == [
        "ok", "ok", "ok", "warn", "severe", "failsafe"]
    assert Thresholds(warn=5).level(100) == "warn"
    with pytest.raises(ValueError, match="must not decrease"):
        Thresholds(2, 1, 3)


def test_defaults_follow_the_original():
    assert DEFAULT_THRESHOLDS["cpu_cores"] == Thresholds(1.4, 1.6, 1.9)
    assert DEFAULT_THRESHOLDS["open_fds"] == Thresholds(100, 150, 200)
    assert DEFAULT_THRESHOLDS["memory_share"] == Thresholds(0.1, 0.15, 0.3)
    assert DEFAULT_THRESHOLDS["queue_fill"].stops is False
    assert all(t.stops for name, t in DEFAULT_THRESHOLDS.items() if name != "queue_fill")


def test_window_mean_and_rate_over_the_span():
    clock = Clock()
    w = Window(60.0, clock)
    assert w.mean() is None and w.rate() is None
    for value in (10.0, 20.0, 30.0):  # a counter growing 10 every 10 s
        w.add(value)
        clock.now += 10
    assert w.mean() == 20.0
    assert w.rate() == pytest.approx(1.0)
    # Samples older than the span fall out
    clock.now += 100
    w.add(40.0)
    assert list(w.samples) == [(1130.0, 40.0)] and w.rate() is None


def test_counter_reset_counts_from_the_new_value():
    clock = Clock()
    w = Window(60.0, clock)
    w.add(500.0)
    clock.now += 10
    w.add(20.0)  # the process restarted: its counter began again
    assert w.rate() == pytest.approx(2.0)


def test_alerts_only_on_change_in_both_directions_with_per_task_overrides():
    tracker = LevelTracker()
    # Given readings rising then falling
    seen = [tracker.update("A", "open_fds", v) for v in (10, 120, 130, 160, 210, 50)]
    # Then an alert at each change and none for the steady 120 -> 130
    changes = [(a.old, a.new) for a in seen if a]
    assert changes == [("ok", "warn"), ("warn", "severe"), ("severe", "failsafe"),
                       ("failsafe", "ok")]
    assert seen[2] is None
    assert "open_fds 160: warn -> severe" == seen[3].text
    # A task's own thresholds change its level
    tracker.overrides["B"] = {"open_fds": Thresholds(warn=5)}
    assert tracker.update("B", "open_fds", 10).new == "warn"
    assert tracker.update("A", "open_fds", 10) is None
    # The task's level is its worst metric
    tracker.update("A", "threads", 160)
    assert tracker.level("A") == "severe" and tracker.level("C") == "ok"
