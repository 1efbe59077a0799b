"""Acceptance: a signal handled in Python does not fail a blocking receive; it is retried."""

from __future__ import annotations

import json
import os
import signal

import pytest

BLOCKED_RECEIVER = """
import json, os, signal, sys
from multimodule import transit
from multimodule.transit import lowlevel
qname = sys.argv[1]
timeout = None if sys.argv[2] == "none" else float(sys.argv[2])
count = 0
def on_usr1(signum, frame):
    global count
    count += 1
    os.write(1, b"signal %d\\n" % count)
signal.signal(signal.SIGUSR1, on_usr1)
lowlevel.default().sysv_queue(qname)
print("ready", flush=True)
msg = transit.receive(qname, timeout=timeout)
print(json.dumps({"msg": msg, "signals": count}), flush=True)
"""


@pytest.mark.parametrize("timeout", ["none", "60"])
def test_signals_during_blocking_receive_are_retried(transit, spawn, timeout):
    # Given a child blocked in receive (no timeout, or a long one) with a SIGUSR1 handler
    child = spawn(BLOCKED_RECEIVER, "eintr-q", timeout)
    child.expect("ready")

    # When SIGUSR1 interrupts its msgrcv three times
    for k in range(1, 4):
        child.wait_blocked_in("msgrcv")
        os.kill(child.pid, signal.SIGUSR1)
        # (the handler ran: the call was interrupted and Python code ran in the child)
        child.expect(f"signal {k}")
    # ... and the child goes back to waiting in msgrcv
    child.wait_blocked_in("msgrcv")

    # And then a message is sent
    transit.send("eintr-q", {"hello": "after signals"})

    # Then the child receives it: the interrupted receive was retried, not failed
    report = json.loads(child.readline())
    assert report["msg"]["hello"] == "after signals"
    assert report["signals"] == 3
    assert child.finish() == 0
