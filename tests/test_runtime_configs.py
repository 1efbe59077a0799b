"""A config reload as a pure diff: plan_reload says what to do for each task from the configs
in force before and after and where each task runs, touching nothing."""

from __future__ import annotations

from multimodule.runtime.configs import Act, Action, Placement, describe_changes, plan_reload

INTERNAL, EXTERNAL, ABSENT, HELD = (Placement.INTERNAL, Placement.EXTERNAL, Placement.ABSENT,
                                    Placement.HELD)


def where(**placements: Placement):
    return lambda name: placements.get(name, ABSENT)


def test_only_what_changed_gets_an_action():
    before = {"Router": {"routes": []}, "A": {"x": 1}, "B": {"y": 1}}
    after = {"Router": {"routes": []}, "A": {"x": 2}, "B": {"y": 1}}
    placement = where(Router=INTERNAL, A=INTERNAL, B=INTERNAL)
    assert plan_reload(before, after, placement) == [Action(Act.APPLY, "A")]


def test_added_removed_and_moved_tasks():
    before = {"Gone": {}, "GoneOut": {"is_external": True}, "Out": {}, "In": {"is_external": True}}
    after = {"New": {}, "Out": {"is_external": True}, "In": {}}
    placement = where(Gone=INTERNAL, GoneOut=EXTERNAL, Out=INTERNAL, In=EXTERNAL)
    assert plan_reload(before, after, placement) == [
        Action(Act.UNLOAD, "Gone"), Action(Act.UNLOAD, "GoneOut"),
        Action(Act.MIGRATE_IN, "In"), Action(Act.LOAD, "New"),
        Action(Act.MIGRATE_OUT, "Out")]


def test_held_tasks_are_left_alone_and_the_router_is_never_unloaded():
    before = {"Router": {"routes": [1]}, "Held": {"x": 1}}
    after = {"Held": {"x": 2}}
    placement = where(Router=INTERNAL, Held=HELD)
    assert plan_reload(before, after, placement) == [Action(Act.APPLY, "Router")]


def test_an_external_task_whose_table_changed_only_has_its_thresholds_applied_here():
    before = {"T": {"is_external": True}}
    after = {"T": {"is_external": True, "monitor": {"open_fds": {"warn": 5}}}}
    assert plan_reload(before, after, where(T=EXTERNAL)) == [Action(Act.THRESHOLDS, "T")]


def test_a_configured_task_that_is_not_running_is_loaded_even_unchanged():
    tables = {"Failed": {"x": 1}}
    assert plan_reload(tables, tables, where()) == [Action(Act.LOAD, "Failed")]


def test_describe_changes():
    assert describe_changes({"A": {}, "B": {"x": 1}, "C": {}},
                            {"B": {"x": 2}, "C": {}, "D": {}}) == \
        "A removed, B changed, D added"
    assert describe_changes({"A": {}}, {"A": {}}) == "no task changed"
