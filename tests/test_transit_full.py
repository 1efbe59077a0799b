"""Acceptance: a full queue refuses (QueueFull) or holds back a sender; it never drops."""

from __future__ import annotations

import os
import time

import pytest

from helpers import drain
from multimodule.transit import QueueFull

PAD = "p" * 500


def fill(transit, qname: str, make) -> tuple[list, object]:
    """Send ``make(i)`` with timeout=0 until QueueFull; return (accepted ids, rejected id)."""
    accepted = []
    for i in range(100_000):
        try:
            transit.send(qname, make(i), timeout=0)
        except QueueFull:
            return accepted, i
        accepted.append(i)
    raise AssertionError("the queue never became full")


def top_up(transit, qname: str) -> bool:
    """Fill the rest of a (nearly) full queue with one valid message of exactly the bytes left,
    so that not one more byte fits; return whether a filler was needed."""
    st = transit.stat(qname)
    room = st.max_bytes - st.bytes
    if room < 12:
        return False
    transit.sysv_queue(qname).send_raw(b'MM\x01J{"f":"' + b"f" * (room - 12) + b'"}', timeout=0)
    st = transit.stat(qname)
    assert st.bytes == st.max_bytes
    return True


def test_full_queue_refuses_and_keeps_everything_accepted(transit):
    # Given a queue filled with timeout=0 sends until one was refused
    accepted, refused_now = fill(transit, "full-q", lambda i: {"i": i, "pad": PAD})
    assert len(accepted) > 5
    assert transit.stat("full-q").messages == len(accepted)

    # When a send with a 0.3 s timeout meets the full queue
    t0 = time.monotonic()
    with pytest.raises(QueueFull):
        transit.send("full-q", {"i": "timed", "pad": PAD}, timeout=0.3)
    elapsed = time.monotonic() - t0

    # Then it gave up after waiting at least 0.3 s (and not much more)
    assert 0.3 <= elapsed < 3.0
    # And the queue holds exactly the accepted messages, in order; the refused ones are absent
    assert transit.stat("full-q").messages == len(accepted)
    got = drain(transit, "full-q")
    assert [m["i"] for m in got] == accepted
    assert refused_now not in [m["i"] for m in got]
    assert all(m["pad"] == PAD for m in got)


def test_refused_large_message_leaves_no_spill_file(transit, transit_dir):
    # Given a queue full to the last byte
    accepted, _ = fill(transit, "full-spill", lambda i: {"i": i, "pad": PAD})
    if top_up(transit, "full-spill"):
        accepted.append("filler")

    # When a message too large for one System V message is refused
    with pytest.raises(QueueFull):
        transit.send("full-spill", {"big": "b" * 100_000}, timeout=0)

    # Then its spill file was removed with it, and the queue is unchanged
    assert os.listdir(transit_dir / ".spill") == []
    assert [m.get("i", "filler") for m in drain(transit, "full-spill")] == accepted


BLOCKED_SENDER = """
import sys
from multimodule import transit
from multimodule.transit import lowlevel
qname = sys.argv[1]
timeout = None if sys.argv[2] == "none" else float(sys.argv[2])
lowlevel.default().sysv_queue(qname)
print("ready", flush=True)
transit.send(qname, {"from": "child"}, timeout=timeout)
print("sent", flush=True)
"""


@pytest.mark.parametrize("timeout", ["none", "60"])
def test_blocked_sender_completes_when_room_is_made(transit, spawn, timeout):
    # Given a queue full to the last byte
    waiting, _ = fill(transit, "full-bp", lambda i: {"i": i, "pad": PAD})
    if top_up(transit, "full-bp"):
        waiting.append("filler")
    count = transit.stat("full-bp").messages
    assert count == len(waiting)

    # And a child sending one more message with no timeout (or a long one)
    child = spawn(BLOCKED_SENDER, "full-bp", timeout)
    child.expect("ready")
    # ... which is held back: it sleeps in msgsnd and its message is not on the queue
    child.wait_blocked_in("msgsnd")
    assert transit.stat("full-bp").messages == count

    # When the parent receives one message
    first = transit.receive("full-bp", timeout=5)

    # Then the child's send completes
    child.expect("sent", timeout=15)
    assert child.finish() == 0
    # And the queue holds everything: nothing was lost, the child's message comes last
    got = [first, *drain(transit, "full-bp")]
    assert [m.get("i", "filler" if "f" in m else "child") for m in got] == [*waiting, "child"]
    assert got[-1]["from"] == "child"
