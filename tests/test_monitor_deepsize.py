"""Memory attributed to internal tasks: the deep size of a task's objects (what is counted,
what is not followed, estimates of large containers within the budget) and the walks of many
tasks spread over samples."""

from __future__ import annotations

import asyncio
import sys
import threading

import pytest

from multimodule.monitor.deepsize import MemoryAttribution, deep_size
from multimodule.monitor.levels import Thresholds


class Holder:
    """Stands for a task instance: a class of a module outside the standard library."""

    def __init__(self, **attributes):
        self.__dict__.update(attributes)


def growth(holder: Holder, container: list, value) -> int:
    """How much the deep size of ``holder`` grows when ``value`` is appended to ``container``
    (a list it reaches), less the list's own growth."""
    before, list_before = deep_size(holder), sys.getsizeof(container)
    container.append(value)
    after = deep_size(holder)
    assert before.exact and after.exact
    return after.bytes - before.bytes - (sys.getsizeof(container) - list_before)


def test_what_a_task_keeps_is_counted_once_each():
    holder = Holder(hoard=[], state={"seen": []})
    blob = b"x" * 100_000
    # A new object counts its own size, whether in an attribute or in the state
    assert growth(holder, holder.hoard, blob) == sys.getsizeof(blob)
    assert growth(holder, holder.state["seen"], "y" * 5_000) == sys.getsizeof("y" * 5_000)
    # The same object reached again counts nothing more
    assert growth(holder, holder.state["seen"], blob) == 0
    assert growth(holder, holder.hoard, blob) == 0


def test_the_program_the_framework_and_the_standard_librarys_objects_are_not_followed():
    big = [str(i) * 10 for i in range(10_000)]
    base = deep_size(Holder(x=None)).bytes - sys.getsizeof(None)

    def charged(value) -> int:
        """What ``value`` in an attribute adds to the figure."""
        return deep_size(Holder(x=value)).bytes - base

    class Local:
        pass

    # Modules, classes, functions and framework objects count nothing
    assert charged(sys) == 0 and charged(Local) == 0 and charged(growth) == 0
    assert charged(Thresholds(1, 2, 3)) == 0
    # A standard library object is a leaf: its shallow size, not what it holds (an event
    # loop, a thread: the whole process hangs off them)
    thread = threading.Thread(target=lambda: None)
    thread.payload = big
    assert charged(thread) == sys.getsizeof(thread)
    loop = asyncio.new_event_loop()
    try:
        assert charged(loop) == sys.getsizeof(loop)
    finally:
        loop.close()
    # But a class of the task's own (or a third party's) is followed, slots too
    mine = Local()
    mine.payload = big
    assert charged(mine) > sys.getsizeof(big) * 2

    class Slotted:
        __slots__ = ("payload",)

    slotted = Slotted()
    slotted.payload = big
    assert charged(slotted) > sys.getsizeof(big) * 2


def test_no_code_of_the_task_runs_during_the_walk():
    class Trap(list):
        def __iter__(self):
            raise AssertionError("__iter__ called")

        def __len__(self):
            raise AssertionError("__len__ called")

    class Lazy:
        def __getattr__(self, name):
            raise AssertionError("__getattr__ called")

        @property
        def computed(self):
            raise AssertionError("property called")

    trap = Trap([b"y" * 1000])
    estimate = deep_size(Holder(trap=trap, lazy=Lazy()))
    assert estimate.exact and estimate.bytes > 1000


def test_a_large_container_is_estimated_within_the_budget():
    rows = [{"n": i, "text": "x" * (40 + i % 7), "tags": ["a", str(i)]} for i in range(50_000)]
    table = {f"key{i}": [i, str(i) * 3] for i in range(20_000)}
    holder = Holder(state={"rows": rows}, table=table)
    full = deep_size(holder, max_objects=10**9, sample_items=10**9)
    assert full.exact and full.objects > 100_000
    # A sampled walk visits few objects and lands near the full walk
    estimate = deep_size(holder)
    assert not estimate.exact and estimate.objects < 2_000
    assert estimate.bytes == pytest.approx(full.bytes, rel=0.1)
    # A budget of objects cuts it short, and what was not visited is still estimated
    cut = deep_size(holder, max_objects=100)
    assert not cut.exact and cut.objects <= 100
    assert cut.bytes == pytest.approx(full.bytes, rel=0.3)
    # A container that grew from small items to large ones is not judged by its first items
    def grown() -> list:
        return [str(i) for i in range(1_000)] + [b"%d" % i * 2_000 for i in range(1_000)]

    for holder in (Holder(log=grown()), Holder(index=dict(enumerate(grown())))):
        full = deep_size(holder, max_objects=10**9, sample_items=10**9)
        assert deep_size(holder).bytes == pytest.approx(full.bytes, rel=0.15)
    # Nothing is estimated of a small task
    small = deep_size(Holder(state={"ct": 1, "seen": [1, 2, 3]}))
    assert small.exact


def test_attribution_walks_tasks_in_turn_within_the_budget_per_sample():
    tasks = {name: Holder(state={"rows": [[i] for i in range(20)]}) for name in "ABC"}
    cost = deep_size(tasks["A"]).objects
    # Given a budget of objects per sample that one task's walk spends
    attribution = MemoryAttribution(objects_per_sample=cost)
    # Then each sample walks one task, the others in the next samples, until all have one
    seen = [set(attribution.measure(tasks)) for _ in range(3)]
    assert [len(s) for s in seen] == [1, 2, 3] and attribution.last_walked == 1
    # And a task's figure follows its growth once its turn comes again
    before = attribution.measure(tasks)["A"]
    tasks["A"].state["rows"].append(b"z" * 50_000)
    figures = [attribution.measure(tasks)["A"] for _ in range(3)]
    assert figures[-1] > before + 50_000
    # A new instance under the same name starts unmeasured and is walked first
    tasks["B"] = Holder(state={})
    assert attribution.measure(tasks)["B"] < before
    # A task gone is forgotten
    del tasks["C"]
    assert set(attribution.measure(tasks)) == {"A", "B"}


def test_a_walk_that_fails_keeps_the_last_figure_and_says_why():
    class Odd:
        broken = False

        def __sizeof__(self):
            if Odd.broken:
                raise ValueError("no size today")
            return 64

    task = Holder(odd=Odd(), blob=b"x" * 10_000)
    attribution = MemoryAttribution()
    first = attribution.measure({"T": task})["T"]
    Odd.broken = True
    assert attribution.measure({"T": task}) == {"T": first}
    assert attribution.failures == {"T": "ValueError: no size today"}
    Odd.broken = False
    attribution.measure({"T": task})
    assert attribution.failures == {}
