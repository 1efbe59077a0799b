"""Acceptance: messages keep their order across processes, in both directions."""

from __future__ import annotations

import json

import pytest

from multimodule.transit import Empty

N = 2000

SENDER = """
import sys
from multimodule import transit
from multimodule.transit import lowlevel
qname, n = sys.argv[1], int(sys.argv[2])
lowlevel.default().sysv_queue(qname)
print("ready", flush=True)
for i in range(n):
    transit.send(qname, {"i": i, "text": "message %d" % i}, timeout=30)
print("done", flush=True)
"""

RECEIVER = """
import json, sys
from multimodule import transit
from multimodule.transit import lowlevel
qname, n = sys.argv[1], int(sys.argv[2])
lowlevel.default().sysv_queue(qname)
print("ready", flush=True)
got = []
for _ in range(n):
    msg = transit.receive(qname, timeout=30)
    got.append([msg["i"], msg["text"]])
print(json.dumps(got), flush=True)
"""


def test_child_sends_2000_parent_receives_in_order(transit, spawn):
    # Given a child process sending 2000 numbered messages (more than the queue holds at once,
    # so it has to wait for room while the parent reads)
    child = spawn(SENDER, "fifo-up", N)
    child.expect("ready")

    # When the parent receives 2000 messages
    got = [transit.receive("fifo-up", timeout=15) for _ in range(N)]

    # Then every message arrived exactly once, in the order sent
    assert [m["i"] for m in got] == list(range(N))
    assert all(m["text"] == f"message {m['i']}" for m in got)
    child.expect("done")
    assert child.finish() == 0
    # And nothing else is left on the queue
    with pytest.raises(Empty):
        transit.receive("fifo-up", timeout=0)


def test_parent_sends_2000_child_receives_in_order(transit, spawn):
    # Given a child process waiting for 2000 messages
    child = spawn(RECEIVER, "fifo-down", N)
    child.expect("ready")

    # When the parent sends 2000 numbered messages
    for i in range(N):
        transit.send("fifo-down", {"i": i, "text": f"message {i}"}, timeout=15)

    # Then the child reports all of them, in the order sent
    got = json.loads(child.readline(timeout=30))
    assert got == [[i, f"message {i}"] for i in range(N)]
    assert child.finish() == 0
    assert transit.stat("fifo-down").messages == 0
