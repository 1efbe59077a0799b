"""Crash safety with real processes: a daemon killed with SIGKILL mid-stream loses nothing,
its stateful task's checkpoint matches what it handled, messages made again carry the ids they
had the first time, and a queue nobody reads pushes back on its senders instead of growing the
daemon's memory.

(The figures for many kills and large streams come from ``bench/faults.py``.)
"""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest

from helpers import receive_until, route, router_section, saved_state
from multimodule.errors import Empty, QueueFull
from multimodule.transit import META_KEY

COUNTER = """
    from multimodule import Task

    class Counter(Task):
        is_stateful = True

        def message(self, message):
            self.state["count"] = self.state.get("count", 0) + 1
            self.state["last_n"] = message["n"]
            self.emit({"n": message["n"], "count": self.state["count"]})
"""


def produce(transit, qname: str, count: int, stop: threading.Event) -> threading.Thread:
    """Send ``{"n": 0..count-1}`` to ``qname`` from a thread, waiting for room when full."""
    def run() -> None:
        for n in range(count):
            while not stop.is_set():
                try:
                    transit.send(qname, {"n": n}, timeout=0.5)
                    break
                except QueueFull:
                    continue
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_kill_9_of_the_daemon_mid_stream_loses_nothing_and_state_matches(mm, transit):
    # Given a stateful Counter (checkpoint every 0.2 s) whose emits the Router forwards
    # to "out", and a producer sending it 3,000 numbered messages
    count = 3000
    mm.task("Counter", COUNTER)
    mm.config("[Counter]\nintervals = { save_state = 0.2 }\ndedupe = true\n\n"
              + router_section(route("Counter", "out")))
    daemon = mm.start()
    stop = threading.Event()
    producer = produce(transit, "Counter", count, stop)
    received: list[dict] = []
    try:
        # When the daemon is killed with SIGKILL three times mid-stream, restarted each time
        for kill in range(3):
            target = (kill + 1) * count // 5
            while not received or received[-1]["n"] < target:
                received.append(transit.receive("out", timeout=20))
            daemon.proc.send_signal(signal.SIGKILL)
            assert daemon.wait_exit() == -signal.SIGKILL
            daemon = mm.start()
        # and the stream ends
        producer.join(60)
        assert not producer.is_alive()
        last, before = receive_until(transit, "out", lambda m: m["n"] == count - 1,
                                     timeout=30)
        received += before + [last]
    finally:
        stop.set()
    daemon.stop_ok()
    # Then every number arrived (nothing lost)
    numbers = [m["n"] for m in received]
    assert set(numbers) == set(range(count)), sorted(set(range(count)) - set(numbers))[:20]
    # in order of first arrival (what came twice is what was redone after a kill)
    first_seen = list(dict.fromkeys(numbers))
    assert first_seen == sorted(first_seen)
    # every copy of one message carries the same id (a deduplicating receiver drops it)
    ids: dict[int, set] = {}
    for message in received:
        ids.setdefault(message["n"], set()).add(message[META_KEY]["id"])
    assert all(len(found) == 1 for found in ids.values()), \
        {n: found for n, found in ids.items() if len(found) > 1}
    # and the Counter's saved state counts each message once: its checkpoint holds exactly
    # the messages before its position, the rest were handled again after the restart
    state = saved_state(mm.state_file("Counter"))
    assert state == {"count": count, "last_n": count - 1}, state
    # and its handled counts, as forwarded, never skip or repeat a number
    counts = {m["n"]: m["count"] for m in received}
    assert [counts[n] for n in range(count)] == list(range(1, count + 1))


def test_messages_taken_but_not_journaled_stay_on_the_kernel_queue(mm, transit):
    # Given a task whose handler never returns: its receiver has taken what it could
    mm.task("Stuck", """
        import time
        from multimodule import Task

        class Stuck(Task):
            def message(self, message):
                time.sleep(3600)
    """)
    mm.config("[Stuck]\n")
    daemon = mm.start()
    for n in range(5):
        transit.send("Stuck", {"n": n})
    # When the daemon is killed with SIGKILL
    daemon.proc.send_signal(signal.SIGKILL)
    assert daemon.wait_exit() == -signal.SIGKILL
    # Then each message is either still on the System V queue or in the task's journal,
    # never in neither: in order, once, with nothing missing
    from multimodule.journal import Journal
    from multimodule.state import StateStore
    store = StateStore(mm.state_dir)
    checkpoint, _ = store.load("Stuck", stateful=False)
    journaled = [m["n"] for m in Journal(store.journal_dir("Stuck")).recover(
        checkpoint.position)]
    queued = []
    while True:
        try:
            queued.append(transit.receive("Stuck", timeout=0)["n"])
        except Empty:
            break
    assert journaled + queued == list(range(5)) or \
        (journaled + queued)[-5:] == list(range(5)), (journaled, queued)


def test_an_unread_queue_pushes_back_on_senders_and_memory_stays_bounded(mm, transit):
    # Given a Router forwarding {"kind": "x"} messages to "unread", which nobody reads,
    # and a daemon that holds at most 256 KiB for full queues
    mm.config("[Router]\nroutes = [ { match = { kind = \"x\" }, "
              "forwards = [ { qname = \"unread\" } ] } ]\n")
    daemon = mm.start("--outbox-max-bytes", str(256 * 1024))
    import psutil
    process = psutil.Process(daemon.proc.pid)
    rss_before = process.memory_info().rss
    # When a sender sends 1 KiB messages to the Router as fast as it can, without waiting
    sent = 0
    payload = "x" * 1000
    deadline = time.monotonic() + 60
    with pytest.raises(QueueFull):
        while time.monotonic() < deadline:
            try:
                transit.send("Router", {"kind": "x", "n": sent, "p": payload}, timeout=2)
            except QueueFull:
                raise
            sent += 1
    # Then it is refused once the daemon is full (backpressure reached the sender), after
    # about what the queues and the bounded outbox hold, and the daemon's memory stayed small
    code, out, err = mm.mmctl("status", "--json")
    assert code == 0, err
    held = sum(json.loads(out)["outboxes"].values())
    assert 0 < held and held * 1000 <= 300 * 1024, held
    assert sent < 5000, sent
    assert process.memory_info().rss - rss_before < 30 * 1024 * 1024
    # And once "unread" is read, everything arrives, in order
    got = []
    while len(got) < sent:
        got.append(transit.receive("unread", timeout=20)["n"])
    assert got == list(range(sent))
    daemon.stop_ok()
