"""Acceptance: messages far larger than a System V message cross processes intact (spilled)."""

from __future__ import annotations

import hashlib
import os
import stat

import orjson

from multimodule.transit import META_KEY

MIB = 1048576

# The child builds the same structures from this code, so both sides agree on the content.
BUILD = """
def build_big():
    return {"data": "x" * 1048576}

def build_nested():
    rows = [{"id": i, "name": "row-%d" % i, "tags": ["a", "b", i % 7], "score": i / 3,
             "ok": i % 2 == 0, "none": None, "text": "\\u00e9\\u2713\\U0001f600"}
            for i in range(12000)]
    return {"rows": rows, "deep": {"a": {"b": {"c": [[1, 2], [3, {"d": "end"}]]}}},
            "blob": "y" * 300000}
"""
_ns: dict = {}
exec(BUILD, _ns)
build_big, build_nested = _ns["build_big"], _ns["build_nested"]

SENDER = BUILD + """
import sys
from multimodule import transit
qname = sys.argv[1]
transit.send(qname, build_big())
transit.send(qname, build_nested())
print("sent", flush=True)
"""

RECEIVER = """
import hashlib, orjson, sys
from multimodule import transit
qname = sys.argv[1]
print("ready", flush=True)
for _ in range(2):
    msg = transit.receive(qname, timeout=30)
    del msg[".ipc_transit_meta"]
    print(hashlib.sha256(orjson.dumps(msg, option=orjson.OPT_SORT_KEYS)).hexdigest(), flush=True)
"""


def digest(message: dict) -> str:
    return hashlib.sha256(orjson.dumps(message, option=orjson.OPT_SORT_KEYS)).hexdigest()


def strip_meta(message: dict) -> dict:
    return {k: v for k, v in message.items() if k != META_KEY}


def test_large_messages_from_child_arrive_intact(transit, transit_dir, spawn):
    big, nested = build_big(), build_nested()
    assert len(orjson.dumps(nested)) > MIB

    # Given a child that sends a 1 MiB string and a >1 MiB nested structure
    child = spawn(SENDER, "large-up")
    child.expect("sent", timeout=30)

    # When the parent receives both
    first = transit.receive("large-up", timeout=15)
    second = transit.receive("large-up", timeout=15)

    # Then they are exactly what was sent, in order
    assert strip_meta(first) == big
    assert strip_meta(second) == nested
    assert first[META_KEY]["source_hostname"]
    # And no spill file is left behind
    assert os.listdir(transit_dir / ".spill") == []
    assert child.finish() == 0


def test_large_messages_to_child_arrive_intact(transit, transit_dir, spawn):
    # Given a child waiting for two messages
    child = spawn(RECEIVER, "large-down")
    child.expect("ready")

    # When the parent sends a 1 MiB message and a large nested one
    transit.send("large-down", build_big())
    transit.send("large-down", build_nested())

    # Then the child received both intact (same digest of the content)
    assert child.readline(timeout=30) == digest(build_big())
    assert child.readline(timeout=30) == digest(build_nested())
    assert child.finish() == 0
    # And the spill area is empty again
    assert os.listdir(transit_dir / ".spill") == []


def test_waiting_spilled_message_is_private_and_removed_on_receive(transit, transit_dir):
    # Given a 1 MiB message sent but not yet received
    transit.send("large-wait", {"data": "z" * MIB})

    # Then it waits on the queue as one small pointer and one spill file, readable only by us
    st = transit.stat("large-wait")
    assert st.messages == 1
    assert st.bytes < 1024
    spilled = os.listdir(transit_dir / ".spill")
    assert len(spilled) == 1
    info = os.stat(transit_dir / ".spill" / spilled[0])
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_uid == os.geteuid()
    assert info.st_size > MIB

    # When it is received
    msg = transit.receive("large-wait", timeout=5)

    # Then it is intact and the spill file is gone
    assert msg["data"] == "z" * MIB
    assert os.listdir(transit_dir / ".spill") == []


def test_sizes_around_the_system_v_limit(transit, transit_dir):
    # Given messages whose encoded size runs from well below to well above one System V message
    limit = transit.sysv_queue("large-edge").limit
    overhead = len(orjson.dumps({"p": "", META_KEY: {"send_ts": 1.0, "source_hostname": "h"}}))
    sizes = list(range(limit - overhead - 150, limit - overhead + 150, 7))

    # When each is sent and received (one at a time: two such messages fill a queue)
    got, spilled = [], 0
    for n in sizes:
        transit.send("large-edge", {"p": "q" * n}, timeout=5)
        spilled += len(os.listdir(transit_dir / ".spill"))
        got.append(transit.receive("large-edge", timeout=5)["p"])

    # Then each arrives intact, and both paths were exercised (some sizes went as one System V
    # message, the larger ones through a spill file)
    assert [len(p) for p in got] == sizes
    assert all(set(p) == {"q"} for p in got)
    assert 0 < spilled < len(sizes)
    assert os.listdir(transit_dir / ".spill") == []
