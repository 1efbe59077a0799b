"""Acceptance: a queue removed under us (ipcrm) is re-created on the next use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sysv_ipc

from multimodule.transit import Empty, Transit


def key_of(transit_dir: Path, name: str) -> int:
    return int((transit_dir / name).read_text())


def kernel_keys() -> set[int]:
    lines = Path("/proc/sysvipc/msg").read_text().splitlines()[1:]
    return {int(line.split()[0]) for line in lines}


RECEIVER = """
import json, sys
from multimodule import transit
msg = transit.receive(sys.argv[1], timeout=15)
print(json.dumps(msg), flush=True)
"""


def test_send_recreates_a_removed_queue(transit, transit_dir, spawn):
    # Given a queue that this process has used
    transit.send("gone", {"n": 1})
    assert transit.receive("gone", timeout=5)["n"] == 1
    old_key = key_of(transit_dir, "gone")

    # And that an operator removed (ipcrm) behind our back
    sysv_ipc.MessageQueue(old_key).remove()
    assert old_key not in kernel_keys()

    # When this process sends to the name again
    transit.send("gone", {"n": 2})

    # Then a new queue exists under the name, and another process receives the message
    new_key = key_of(transit_dir, "gone")
    assert new_key in kernel_keys()
    child = spawn(RECEIVER, "gone")
    assert json.loads(child.readline())["n"] == 2
    assert child.finish() == 0


def test_receive_and_stat_recreate_a_removed_queue(transit, transit_dir):
    # Given a queue this process has used, then removed behind its back
    transit.send("gone-r", {"n": 1})
    transit.receive("gone-r", timeout=5)
    sysv_ipc.MessageQueue(key_of(transit_dir, "gone-r")).remove()

    # When this process receives from it
    with pytest.raises(Empty):
        transit.receive("gone-r", timeout=0.2)

    # Then the name has a working queue again: another sender's message is received
    assert key_of(transit_dir, "gone-r") in kernel_keys()
    Transit(transit_dir).send("gone-r", {"n": 2})
    assert transit.receive("gone-r", timeout=5)["n"] == 2

    # And the same holds for stat
    sysv_ipc.MessageQueue(key_of(transit_dir, "gone-r")).remove()
    st = transit.stat("gone-r")
    assert st.messages == 0 and st.key == key_of(transit_dir, "gone-r")
    assert st.key in kernel_keys()


BLOCKED_RECEIVER = """
import json, sys
from multimodule import transit
from multimodule.transit import lowlevel
lowlevel.default().sysv_queue(sys.argv[1])
print("ready", flush=True)
msg = transit.receive(sys.argv[1], timeout=None)
print(json.dumps(msg), flush=True)
"""


def test_blocked_receiver_survives_removal(transit_dir, spawn):
    # Given a child blocked in receive on a queue
    child = spawn(BLOCKED_RECEIVER, "gone-b")
    child.expect("ready")
    child.wait_blocked_in("msgrcv")

    # When the queue is removed under it
    old_key = key_of(transit_dir, "gone-b")
    sysv_ipc.MessageQueue(old_key).remove()
    # ... the child re-creates the name and waits on the new queue
    child.wait_blocked_in("msgrcv")

    # And a new process (this one, with a fresh Transit) sends to the name
    Transit(transit_dir).send("gone-b", {"n": "after removal"})

    # Then the blocked child receives it
    assert json.loads(child.readline())["n"] == "after removal"
    assert child.finish() == 0
    assert key_of(transit_dir, "gone-b") != old_key
