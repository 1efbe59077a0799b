"""Acceptance: names declared local stay in memory (with System V's copy semantics); other
names go over System V."""

from __future__ import annotations

import datetime
import json

import pytest

from multimodule.transit import (
    META_KEY,
    Empty,
    Transit,
    TransitError,
    UnserializableMessage,
)


def strip_meta(message: dict) -> dict:
    return {k: v for k, v in message.items() if k != META_KEY}


def test_local_sends_do_not_touch_system_v(transit, transit_dir):
    # Given a name declared local in this process
    transit.declare_local("x")

    # When this process sends to it
    for i in range(3):
        transit.send("x", {"i": i})

    # Then the messages wait in memory
    st = transit.stat("x")
    assert st.kind == "local" and st.messages == 3
    assert transit.is_local("x")
    # And System V was never involved: no name file, no queue another process could see
    assert not (transit_dir / "x").exists()
    assert Transit(transit_dir).directory.lookup_key("x") is None
    with pytest.raises(TransitError):
        Transit(transit_dir).stat("x")
    assert [transit.receive("x", timeout=1)["i"] for _ in range(3)] == [0, 1, 2]


def test_local_receive_gets_a_deep_copy(transit):
    # Given a local name and a message with nested lists, dicts and tuples
    transit.declare_local("x")
    inner = [2, 3]
    message = {"items": [1, inner, {"k": [4]}], "pair": (1, (2, 3)), "d": {"e": {"f": 1}}}

    # When it is sent and received
    transit.send("x", message)
    got = transit.receive("x", timeout=1)

    # Then the receiver has its own copy at every level
    assert got["items"] is not message["items"]
    assert got["items"][1] is not inner
    assert got["d"] is not message["d"] and got["d"]["e"] is not message["d"]["e"]
    got["items"][2]["k"].append(5)
    got["items"][1].append(99)
    got["d"]["e"]["f"] = 2
    assert message == {"items": [1, [2, 3], {"k": [4]}], "pair": (1, (2, 3)),
                       "d": {"e": {"f": 1}}}
    # And changes the sender makes afterwards do not reach the receiver's copy
    fresh = {"items": [[1]]}
    transit.send("x", fresh)
    fresh["items"][0].append(2)
    assert transit.receive("x", timeout=1)["items"] == [[1]]
    # And tuples arrived as lists, exactly as over System V
    assert got["pair"] == [1, [2, 3]]


EDGE_VALUES = {
    "tuple": (1, (2, "three")),
    "nested": {"a": [{"b": (None, True, 1.5)}]},
    "datetime": datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.timezone.utc),
    "date": datetime.date(2024, 5, 6),
    "unicode": "naïve ✓ \U0001f600",
    "float": 0.1,
    "negative_zero": -0.0,
    "big_int": 2**63 - 1,
    "max_int": 2**64 - 1,
    "min_int": -2**63,
}


@pytest.mark.parametrize("value", list(EDGE_VALUES.values()), ids=list(EDGE_VALUES))
def test_local_path_delivers_what_system_v_delivers(transit, value):
    # Given the same message sent on a local name and on a System V name
    transit.declare_local("via-local")
    transit.send("via-local", {"v": value})
    transit.send("via-sysv", {"v": value})

    # When both are received
    local = strip_meta(transit.receive("via-local", timeout=1))
    sysv = strip_meta(transit.receive("via-sysv", timeout=5))

    # Then the receiver sees exactly the same thing (same types, same values)
    assert repr(local) == repr(sysv)


SENDER_TO_X = """
import sys
from multimodule import transit
transit.send(sys.argv[1], {"from": "child"})
print("sent", flush=True)
"""

RECEIVER = """
import json, sys
from multimodule import transit
msg = transit.receive(sys.argv[1], timeout=15)
print(json.dumps(msg), flush=True)
"""


def test_names_not_declared_local_go_over_system_v(transit, spawn):
    # Given a process that declared "x" local
    transit.declare_local("x")

    # When it sends to another name, "y"
    transit.send("y", {"to": "y", "n": [1, 2]})

    # Then "y" went over System V: a child process receives it
    assert not transit.is_local("y")
    child = spawn(RECEIVER, "y")
    msg = json.loads(child.readline())
    assert strip_meta(msg) == {"to": "y", "n": [1, 2]}
    assert child.finish() == 0


def test_declaring_local_is_per_process(transit, transit_dir, spawn):
    # Given "x" declared local in this process
    transit.declare_local("x")

    # When a child process sends to "x"
    child = spawn(SENDER_TO_X, "x")
    child.expect("sent")

    # Then the child's message is on the System V queue, not in this process's local queue
    assert Transit(transit_dir).stat("x").messages == 1
    with pytest.raises(Empty):
        transit.receive("x", timeout=0)
    assert Transit(transit_dir).receive("x", timeout=5)["from"] == "child"
    assert child.finish() == 0


class Opaque:
    pass


BAD_MESSAGES = {
    "list": [1, 2],
    "str": "text",
    "none": None,
    "int_key": {1: "a"},
    "nested_int_key": {"a": {2: "b"}},
    "tuple_key": {("a",): 1},
    "object_value": {"a": Opaque()},
    "set_value": {"a": {1, 2}},
    "bytes_value": {"a": b"bytes"},
    "nested_object": {"a": [1, {"b": Opaque()}]},
    "int_too_big": {"a": 2**64},
    "int_too_small": {"a": -2**63 - 1},
    "nan": {"a": float("nan")},
    "inf": {"a": [float("inf")]},
    "lone_surrogate": {"a": "\ud800"},
    "lone_surrogate_key": {"\udc80": 1},
}


@pytest.mark.parametrize("path", ["sysv", "local"])
@pytest.mark.parametrize("message", list(BAD_MESSAGES.values()), ids=list(BAD_MESSAGES))
def test_unserialisable_messages_are_refused_on_both_paths(transit, path, message):
    # Given a System V or a local name
    qname = f"refuse-{path}"
    if path == "local":
        transit.declare_local(qname)

    # When sending something that is not a JSON object
    with pytest.raises(UnserializableMessage):
        transit.send(qname, message)

    # Then nothing was queued
    with pytest.raises(Empty):
        transit.receive(qname, timeout=0)


def test_undeclare_local_returns_waiting_messages_in_order(transit, transit_dir):
    # Given a local name with five messages sent and one received
    transit.declare_local("x")
    for i in range(5):
        transit.send("x", {"i": i})
    assert transit.receive("x", timeout=1)["i"] == 0

    # When it is undeclared
    left = transit.undeclare_local("x")

    # Then the four waiting messages come back, oldest first, with their meta
    assert [m["i"] for m in left] == [1, 2, 3, 4]
    assert all(META_KEY in m for m in left)
    assert not transit.is_local("x")
    assert transit.undeclare_local("x") == []
    # And later sends to the name go over System V
    transit.send("x", {"i": 5})
    assert Transit(transit_dir).stat("x").messages == 1
    assert transit.receive("x", timeout=5)["i"] == 5
