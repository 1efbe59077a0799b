"""Acceptance: receive timeouts (0: no wait; t: at least t), on System V and local queues."""

from __future__ import annotations

import time

import pytest

from multimodule.errors import MultiModuleError
from multimodule.transit import Empty, QueueFull, TransitError


def test_timeout_errors_belong_to_the_error_tree():
    assert issubclass(Empty, TransitError) and issubclass(Empty, MultiModuleError)
    assert issubclass(QueueFull, TransitError) and issubclass(QueueFull, MultiModuleError)
    assert not issubclass(Empty, QueueFull) and not issubclass(QueueFull, Empty)


@pytest.mark.parametrize("path", ["sysv", "local"])
def test_timeout_zero_on_empty_queue_raises_at_once(transit, path):
    # Given an empty queue
    qname = f"empty-{path}"
    if path == "local":
        transit.declare_local(qname)
    else:
        transit.sysv_queue(qname)

    # When receiving with timeout=0
    t0 = time.monotonic()
    with pytest.raises(Empty) as info:
        transit.receive(qname, timeout=0)

    # Then Empty comes at once, naming the queue
    assert time.monotonic() - t0 < 1.0
    assert qname in str(info.value)


@pytest.mark.parametrize("path", ["sysv", "local"])
def test_timeout_waits_at_least_that_long(transit, path):
    # Given an empty queue
    qname = f"wait-{path}"
    if path == "local":
        transit.declare_local(qname)
    else:
        transit.sysv_queue(qname)

    # When receiving with timeout=0.3
    t0 = time.monotonic()
    with pytest.raises(Empty):
        transit.receive(qname, timeout=0.3)
    elapsed = time.monotonic() - t0

    # Then Empty comes after at least 0.3 s, and well before 3 s
    assert 0.3 <= elapsed < 3.0
    # And a message sent afterwards is still received normally
    transit.send(qname, {"after": True})
    assert transit.receive(qname, timeout=0)["after"] is True


SENDER = """
import sys
from multimodule import transit
transit.send(sys.argv[1], {"late": True})
print("sent", flush=True)
"""


def test_message_arriving_during_timed_wait_is_received(transit, spawn):
    # Given a timed receive with a generous timeout
    transit.sysv_queue("late")
    child = spawn(SENDER, "late")
    # When a message arrives from another process during the wait
    t0 = time.monotonic()
    msg = transit.receive("late", timeout=20)
    # Then it is returned (well before the deadline)
    assert msg["late"] is True
    assert time.monotonic() - t0 < 20
    child.expect("sent")
    assert child.finish() == 0
