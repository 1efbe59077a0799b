"""Acceptance: bytes on a queue that are not a message raise BadMessage, and the next good
message still arrives (for receive and for the AsyncReceiver)."""

from __future__ import annotations

import asyncio
import os

import pytest

from multimodule.transit import BadMessage, Empty, META_KEY

BAD = [
    pytest.param(b"garbage without any header", "no multimodule header", id="no-header"),
    pytest.param(b"", "no multimodule header", id="empty"),
    pytest.param(b"MM\x01", "no multimodule header", id="truncated-header"),
    pytest.param(b"MM\x01J{\"a\": 1", "not valid JSON", id="invalid-json"),
    pytest.param(b"MM\x01J\xff\xfe{}", "not valid JSON", id="not-utf8"),
    pytest.param(b"MM\x01J[1, 2, 3]", "JSON array, not an object", id="json-array"),
    pytest.param(b"MM\x01J\"text\"", "JSON string, not an object", id="json-string"),
    pytest.param(b"MM\x07J{}", "unsupported wire format version 7", id="unknown-version"),
    pytest.param(b"MM\x01Z{}", "unknown message kind", id="unknown-kind"),
    pytest.param(b"MM\x01S" + b"0123456789abcdef" * 2, "unreadable", id="spill-missing"),
    pytest.param(b"MM\x01S../../../etc/passwd", "bad spill file name", id="spill-traversal"),
]


@pytest.mark.parametrize("raw, reason", BAD)
def test_bad_bytes_raise_bad_message_then_next_message_arrives(transit, raw, reason):
    # Given bad bytes put straight onto the System V queue, followed by a good message
    transit.sysv_queue("bad-q").send_raw(raw)
    transit.send("bad-q", {"good": 1})

    # When receiving
    with pytest.raises(BadMessage) as info:
        transit.receive("bad-q", timeout=5)

    # Then the bad bytes are reported with a reason, the queue name and (part of) the bytes
    assert reason in info.value.reason
    assert info.value.qname == "bad-q"
    assert "bad-q" in str(info.value) and reason in str(info.value)
    assert isinstance(info.value.raw, bytes) and info.value.raw in raw
    # And they were consumed: the good message is next, then nothing
    msg = transit.receive("bad-q", timeout=5)
    assert msg["good"] == 1 and META_KEY in msg
    with pytest.raises(Empty):
        transit.receive("bad-q", timeout=0)


def test_spill_file_with_bad_content(transit, transit_dir):
    # Given a spill pointer to a file that does not hold a JSON object
    name = "feedfacefeedfacefeedfacefeedface"
    (transit_dir / ".spill" / name).write_bytes(b"[1, 2]")
    transit.sysv_queue("bad-spill").send_raw(b"MM\x01S" + name.encode())
    transit.send("bad-spill", {"good": 2})

    # When receiving, Then BadMessage, the file is cleaned up, and the next message arrives
    with pytest.raises(BadMessage, match="not an object"):
        transit.receive("bad-spill", timeout=5)
    assert os.listdir(transit_dir / ".spill") == []
    assert transit.receive("bad-spill", timeout=5)["good"] == 2


def test_long_garbage_is_truncated_in_the_error(transit):
    # Given 5000 bytes of garbage
    transit.sysv_queue("bad-long").send_raw(b"g" * 5000)
    # When receiving, Then BadMessage keeps only the first 256 bytes
    with pytest.raises(BadMessage) as info:
        transit.receive("bad-long", timeout=5)
    assert info.value.raw == b"g" * 256


def test_async_receiver_reports_bad_messages_and_goes_on(transit):
    # Given an AsyncReceiver on a queue that gets bad bytes between good messages
    queue = transit.sysv_queue("bad-async")
    events: list = []

    async def scenario():
        two_delivered = asyncio.Event()

        def deliver(message):
            events.append(message["n"])
            if sum(isinstance(e, int) for e in events) == 2:
                two_delivered.set()

        receiver = transit.receiver("bad-async", deliver, on_error=events.append)
        receiver.start()
        try:
            # When garbage, a good message, a JSON array and another good message arrive
            queue.send_raw(b"junk")
            transit.send("bad-async", {"n": 1})
            queue.send_raw(b"MM\x01J[1]")
            transit.send("bad-async", {"n": 2})
            await asyncio.wait_for(two_delivered.wait(), 10)
        finally:
            await asyncio.wait_for(receiver.stop(), 10)
        return receiver

    receiver = asyncio.run(scenario())

    # Then on_error saw each BadMessage, in place, and both good messages were delivered
    assert len(events) == 4, events
    assert isinstance(events[0], BadMessage) and "no multimodule header" in events[0].reason
    assert events[1] == 1
    assert isinstance(events[2], BadMessage) and "not an object" in events[2].reason
    assert events[3] == 2
    # And the receiver did not stop on them
    assert receiver.error is None
    assert receiver.received == 2
