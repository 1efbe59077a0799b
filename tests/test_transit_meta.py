"""Acceptance: every message carries ``.ipc_transit_meta``; the sender's dict is left alone."""

from __future__ import annotations

import copy
import json
import socket
import time

import pytest

from multimodule.transit import META_KEY

SENDER = """
import json, sys
from multimodule import transit
qname = sys.argv[1]
message = {"job": "build", "steps": [1, 2, {"deep": True}]}
transit.send(qname, message, trace_id="t-42", attempt=3, origin={"task": "Example2"})
print(json.dumps(message), flush=True)
"""


def test_meta_fields_from_another_process(transit, spawn):
    # Given a child process that sends a message with extra meta keys
    before = time.time()
    child = spawn(SENDER, "meta-q")

    # When the parent receives it
    msg = transit.receive("meta-q", timeout=15)
    after = time.time()

    # Then the message arrives with its meta: send time, host name and the extra keys
    meta = msg.pop(META_KEY)
    assert msg == {"job": "build", "steps": [1, 2, {"deep": True}]}
    assert isinstance(meta["send_ts"], float)
    assert before <= meta["send_ts"] <= after
    assert meta["source_hostname"] == socket.gethostname()
    assert meta["trace_id"] == "t-42"
    assert meta["attempt"] == 3
    assert meta["origin"] == {"task": "Example2"}
    assert set(meta) == {"send_ts", "source_hostname", "trace_id", "attempt", "origin"}
    # And the sender's own dict was not modified by the send
    assert json.loads(child.readline()) == {"job": "build", "steps": [1, 2, {"deep": True}]}
    assert child.finish() == 0


@pytest.mark.parametrize("path", ["sysv", "local"])
def test_meta_fields_and_sender_dict_untouched(transit, path):
    # Given a message dict held by the sender (on the System V or the in-memory path)
    qname = f"meta-{path}"
    if path == "local":
        transit.declare_local(qname)
    message = {"a": [1, {"b": 2}], "c": "text"}
    snapshot = copy.deepcopy(message)

    # When it is sent with extra meta keys and received
    t0 = time.time()
    transit.send(qname, message, trace_id="abc", hops=0)
    got = transit.receive(qname, timeout=5)
    t1 = time.time()

    # Then the sender's dict is exactly as before (no meta key added, nothing changed)
    assert message == snapshot
    assert META_KEY not in message
    # And the received copy has the meta
    meta = got[META_KEY]
    assert t0 <= meta["send_ts"] <= t1
    assert meta["source_hostname"] == socket.gethostname()
    assert meta["trace_id"] == "abc" and meta["hops"] == 0
    assert {k: v for k, v in got.items() if k != META_KEY} == snapshot
