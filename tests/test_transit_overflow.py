"""The overflow for full System V queues: order kept, and a queue removed under it (ipcrm,
logind's RemoveIPC=) made again instead of retried for ever."""

from __future__ import annotations

import subprocess

from multimodule.errors import QueueFull
from multimodule.transit.lowlevel import Overflow


def fill(transit, qname: str) -> int:
    """Send the smallest messages until ``qname`` is full (so no other message fits);
    return how many it took."""
    count = 0
    while True:
        try:
            transit.send(qname, {}, timeout=0)
        except QueueFull:
            return count
        count += 1


async def test_held_messages_follow_in_order_once_there_is_room(transit):
    # Given a full queue and five messages held for it
    reports = []
    overflow = Overflow(transit, lambda channel, text: reports.append((channel, text)))
    filled = fill(transit, "full")
    for i in range(5):
        overflow.send("full", {"i": i})
    assert overflow.held == 5 and overflow.depths() == {"full": 5}
    assert reports == [("debug", "queue 'full' is full; holding its messages in order")]
    # When a reader empties the queue
    assert [transit.receive("full", timeout=5).get("i") for _ in range(filled)] == \
        [None] * filled
    # Then the held ones arrive after, in order, and the overflow is empty
    assert await overflow.drain(10)
    assert [transit.receive("full", timeout=0)["i"] for _ in range(5)] == list(range(5))


async def test_a_queue_removed_under_the_overflow_is_made_again(transit):
    # Given messages held for a full queue
    reports = []
    overflow = Overflow(transit, lambda channel, text: reports.append((channel, text)))
    fill(transit, "gone")
    for i in range(5):
        overflow.send("gone", {"i": i})
    # When the queue is removed behind its back (as ipcrm or logind's RemoveIPC= do)
    queue_id = transit.sysv_queue("gone").queue.id
    subprocess.run(["ipcrm", "-q", str(queue_id)], check=True)
    # Then the held messages reach a new queue of that name, in order, and nothing is held
    assert await overflow.drain(10), reports
    assert transit.sysv_queue("gone").queue.id != queue_id
    assert [transit.receive("gone", timeout=0)["i"] for _ in range(5)] == list(range(5))
    assert not [r for r in reports if r[0] == "error"]
