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
    assert set(meta) == {"id", "send_ts", "source_hostname", "trace_id", "attempt", "origin"}
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


@pytest.mark.parametrize("path", ["sysv", "local"])
def test_every_message_gets_an_id_kept_with_its_first_send_across_hops(transit, path):
    # Given two messages sent to a queue (System V or in memory)
    qname = f"ids-{path}"
    if path == "local":
        transit.declare_local(qname)
    transit.send(qname, {"n": 1})
    transit.send(qname, {"n": 2})
    first, second = transit.receive(qname, timeout=5), transit.receive(qname, timeout=5)
    # Then each has an id of its own
    assert isinstance(first[META_KEY]["id"], str) and first[META_KEY]["id"]
    assert first[META_KEY]["id"] != second[META_KEY]["id"]
    # When a receiver sends the message on (as a Router forwarding it does)
    time.sleep(0.001)  # a later send time, to tell the first from the second
    transit.send(qname, first)
    again = transit.receive(qname, timeout=5)
    # Then it keeps its id, its first send time and its origin host
    for key in ("id", "send_ts", "source_hostname"):
        assert again[META_KEY][key] == first[META_KEY][key]
    # But a new message (no meta of its own) gets a new id, and an id given wins
    transit.send(qname, {"n": 3}, id="chosen-1")
    assert transit.receive(qname, timeout=5)[META_KEY]["id"] == "chosen-1"


def test_ids_differ_between_processes_and_after_fork(transit, spawn):
    import os
    from multimodule.transit.lowlevel import make_meta
    parent = make_meta({})["id"]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write, make_meta({})["id"].encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 200).decode()
    assert child.split("-")[0] != parent.split("-")[0]
