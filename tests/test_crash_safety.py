"""Crash safety with real processes: a daemon killed with SIGKILL mid-stream loses nothing,
its stateful task's checkpoint matches what it handled, messages made again carry the ids they
had the first time, and a queue nobody reads pushes back on its senders instead of growing the
daemon's memory.

(The figures for many kills and large streams come from ``bench/faults.py``.)
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time

import pytest

from helpers import (
    drain,
    fill,
    receive_until,
    route,
    router_section,
    saved_state,
    wait_for_file,
)
from multimodule.errors import Empty, QueueFull
from multimodule.transit import META_KEY

#: Slow (streams into real processes killed -9): run by CI, left out by
#: ``-m "not slow"``.
pytestmark = pytest.mark.slow

COUNTER = """
    import os
    from multimodule import Task

    class Counter(Task):
        is_stateful = True

        def message(self, message):
            self.state["count"] = self.state.get("count", 0) + 1
            self.state["last_n"] = message["n"]
            self.emit({"n": message["n"], "count": self.state["count"], "pid": os.getpid()})
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


def stream_with_kills(transit, count: int, kill) -> list[dict]:
    """Send ``{"n": 0..count-1}`` to Counter; each time "out" has seen the first 1/5, 2/5
    and 3/5 of the numbers, call ``kill(received)`` (which may read on from "out" itself).
    Returns every message "out" received, up to the last number's first arrival."""
    stop = threading.Event()
    producer = produce(transit, "Counter", count, stop)
    received: list[dict] = []
    try:
        for kill_number in range(3):
            target = (kill_number + 1) * count // 5
            while not received or received[-1]["n"] < target:
                received.append(transit.receive("out", timeout=20))
            kill(received)
        producer.join(60)
        assert not producer.is_alive()
        last, before = receive_until(transit, "out", lambda m: m["n"] == count - 1,
                                     timeout=30)
        return received + before + [last]
    finally:
        stop.set()


def test_kill_9_of_the_daemon_mid_stream_loses_nothing_and_state_matches(mm, transit):
    # Given a stateful Counter (checkpoint every 0.2 s) whose emits the Router forwards
    # to "out", and a producer sending it 3,000 numbered messages
    count = 3000
    mm.task("Counter", COUNTER)
    mm.config("[Counter]\nintervals = { save_state = 0.2 }\ndedupe = true\n\n"
              + router_section(route("Counter", "out")))
    daemons = [mm.start()]

    # When the daemon is killed with SIGKILL three times mid-stream, restarted each time
    def kill(received: list[dict]) -> None:
        daemons[-1].proc.send_signal(signal.SIGKILL)
        assert daemons[-1].wait_exit() == -signal.SIGKILL
        daemons.append(mm.start())

    received = stream_with_kills(transit, count, kill)
    daemons[-1].stop_ok()
    # Then every number arrived (nothing lost), in order of first arrival (what came twice
    # is what was redone after a kill), every copy of one message with the same id (a
    # deduplicating receiver drops it), and the counts forwarded never skip or repeat
    check_stream(received, count)
    # and the Counter's saved state counts each message once: its checkpoint holds exactly
    # the messages before its position, the rest were handled again after the restart
    state = saved_state(mm.state_file("Counter"))
    assert state == {"count": count, "last_n": count - 1}, state


def check_stream(received: list[dict], count: int) -> None:
    """Nothing lost, first arrivals in order, one id per message, counts never skip."""
    numbers = [m["n"] for m in received]
    assert set(numbers) == set(range(count)), sorted(set(range(count)) - set(numbers))[:20]
    first_seen = list(dict.fromkeys(numbers))
    assert first_seen == sorted(first_seen)
    ids: dict[int, set] = {}
    for message in received:
        ids.setdefault(message["n"], set()).add(message[META_KEY]["id"])
    assert all(len(found) == 1 for found in ids.values()), \
        {n: found for n, found in ids.items() if len(found) > 1}
    counts = {m["n"]: m["count"] for m in received}
    assert [counts[n] for n in range(count)] == list(range(1, count + 1))


def test_kill_9_of_an_external_task_loses_nothing_and_state_matches(mm, transit):
    # Given an external stateful Counter (its own process) whose emits the daemon's Router
    # forwards to "out", and a producer sending it 2,000 numbered messages
    count = 2000
    mm.task("Counter", COUNTER)
    mm.config("[Counter]\nis_external = true\nintervals = { save_state = 0.05 }\n\n"
              + router_section(route("Counter", "out")))
    daemon = mm.start()

    # When the task's process is killed with SIGKILL three times mid-stream (the daemon
    # starts it again each time)
    def kill(received: list[dict]) -> None:
        pid = received[-1]["pid"]
        os.kill(pid, signal.SIGKILL)
        while received[-1]["pid"] == pid:  # until its successor's messages come
            received.append(transit.receive("out", timeout=20))

    received = stream_with_kills(transit, count, kill)
    # Then nothing was lost, in order, and copies carry one id
    check_stream(received, count)
    # and the task's checkpoint counts each message once
    wait_for_file(mm.state_file("Counter"),
                  lambda p: p.exists() and saved_state(p) == {"count": count, "last_n": count - 1})
    daemon.stop_ok()


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


async def test_a_checkpoint_waits_for_held_sends_and_is_taken_once_they_are_sent(
        inproc, transit):
    # Given a stateful task forwarding to a System V queue that another process filled
    inproc.task("Fwd", """
        from multimodule import Task

        class Fwd(Task):
            is_stateful = True

            def message(self, message):
                self.state["n"] = message["n"]
                self.send("full", {"n": message["n"]})
    """)
    inproc.config("[Fwd]\nintervals = { save_state = 0.05 }\n")
    prefilled = fill(transit, "full")
    daemon = await inproc.start()
    runner = daemon.registry.get("Fwd")
    # When it handles messages whose sends must wait in the overflow
    for n in range(3):
        inproc.send("Fwd", {"n": n})
    await inproc.quiet()
    # Then its checkpoint does not cover them while they wait
    assert daemon.overflow.holds_from("Fwd")
    assert runner.checkpoint() is False and runner.checkpoint_behind
    # When the queue is read, the sends go out, and the checkpoint is taken by itself
    assert len(drain(transit, "full")) >= prefilled
    async with asyncio.timeout(10):
        while runner.checkpoint_behind:
            await asyncio.sleep(0.01)
    assert inproc.journaled("Fwd", stateful=True) == []
    assert await inproc.stop() == 0


async def test_dedupe_drops_a_message_handled_before_even_after_a_restart(inproc, transit):
    # Given a stateful task that drops duplicates (a window of 100 ids)
    inproc.task("Once", """
        from multimodule import Task

        class Once(Task):
            is_stateful = True

            def message(self, message):
                self.state["seen"] = self.state.get("seen", []) + [message["n"]]
    """)
    inproc.config("[Once]\ndedupe = 100\n")
    daemon = await inproc.start()
    # When a message and a copy of it with the same id arrive, as after a sender's crash
    for n in (1, 1, 2):
        transit.send("Once", {"n": n}, id=f"msg-{n}")
    await inproc.quiet()
    # Then the copy is dropped and counted
    runner = daemon.registry.get("Once")
    assert runner.task.state["seen"] == [1, 2]
    assert runner.figures()["duplicates_dropped"] == 1
    # and the window is in the checkpoint: after a restart a third copy is dropped too
    await inproc.restart()
    transit.send("Once", {"n": 1}, id="msg-1")
    transit.send("Once", {"n": 3}, id="msg-3")
    await inproc.quiet()
    assert inproc.daemon.registry.get("Once").task.state["seen"] == [1, 2, 3]
    assert await inproc.stop() == 0


async def test_what_a_handler_or_a_tick_sends_gets_ids_derived_from_its_cause(inproc, transit):
    # Given a task that sends two messages per message handled, and one per timer tick
    inproc.task("Twice", """
        from multimodule import Task

        class Twice(Task):
            is_stateful = True

            def set_config(self, config):
                self.named_recur("tick", 0.05, self.tick)

            def tick(self):
                self.send("ticks", {"tick": True})

            def message(self, message):
                self.send("out", {"n": message["n"], "copy": 0})
                self.send("out", {"n": message["n"], "copy": 1})
    """)
    inproc.config("[Twice]\n")
    daemon = await inproc.start()
    transit.send("Twice", {"n": 7}, id="cause-7")
    await inproc.quiet()
    first, second = transit.receive("out", timeout=5), transit.receive("out", timeout=5)
    # Then their ids are the cause's id and their index among its sends
    assert [first[META_KEY]["id"], second[META_KEY]["id"]] == ["cause-7.0", "cause-7.1"]
    # and a tick's send is named after the task's incarnation, the schedule and the tick
    incarnation = daemon.registry.get("Twice").progress.data.incarnation
    tick = await asyncio.to_thread(transit.receive, "ticks", timeout=5)
    assert tick[META_KEY]["id"] == f"{incarnation}/Twice/tick/1.0"
    # and after a restart the ticks are numbered on from the checkpoint, same incarnation
    await inproc.stop()
    before = [tick] + drain(transit, "ticks")
    last = max(int(m[META_KEY]["id"].split("/")[-1].split(".")[0]) for m in before)
    await inproc.start()
    after = await asyncio.to_thread(transit.receive, "ticks", timeout=5)
    assert after[META_KEY]["id"] == f"{incarnation}/Twice/tick/{last + 1}.0"
    assert await inproc.stop() == 0


async def test_a_stateless_tasks_ticks_are_numbered_on_after_a_restart(inproc, transit):
    # Given a stateless task that ticks, and whose checkpoint was taken once for a message
    inproc.task("Beat", """
        from multimodule import Task

        class Beat(Task):
            def set_config(self, config):
                self.named_recur("beat", 0.05, lambda: self.send("beats", {}))

            def message(self, message):
                pass
    """)
    inproc.config("[Beat]\nintervals = { save_state = 0.05 }\n")
    daemon = await inproc.start()
    transit.send("Beat", {})
    await inproc.quiet()
    runner = daemon.registry.get("Beat")
    runner.checkpoint()  # unless the periodic checkpoint (every 0.05 s) just took it
    assert not runner.checkpoint_behind
    # When it ticks on without messages, and is stopped and started again
    seen = [await asyncio.to_thread(transit.receive, "beats", timeout=5) for _ in range(3)]
    await inproc.stop()
    seen += drain(transit, "beats")
    await inproc.start()
    # Then its next tick has an id no earlier tick had (a receiver with dedupe would
    # otherwise drop it as a duplicate)
    after = await asyncio.to_thread(transit.receive, "beats", timeout=5)
    assert after[META_KEY]["id"] not in {m[META_KEY]["id"] for m in seen}
    assert await inproc.stop() == 0


async def test_backpressure_crosses_an_in_memory_hop_to_the_first_sender(inproc, transit):
    # Given a Feeder whose emits the Router forwards to "unread", a full queue nobody reads,
    # in a daemon that holds at most 256 KiB for full queues
    inproc.task("Feeder", """
        from multimodule import Task

        class Feeder(Task):
            def message(self, message):
                self.emit({"kind": "x", "n": message["n"], "pad": "x" * 200})
    """)
    inproc.config('[Feeder]\n[Router]\nroutes = [ { match = { kind = "x" }, '
                  'forwards = [ { qname = "unread" } ] } ]\n')
    fill(transit, "unread")
    daemon = await inproc.start(outbox_max_bytes=256 * 1024)
    # When another process sends to Feeder as fast as it is let
    refused = asyncio.Event()
    sent = [0]

    def produce() -> None:
        while sent[0] < 200_000:
            try:
                transit.send("Feeder", {"n": sent[0]}, timeout=0.2)
            except QueueFull:
                refused.set()
                return
            sent[0] += 1

    producer = asyncio.get_running_loop().run_in_executor(None, produce)
    await producer
    # Then the sender is refused in the end: the paused Router's queue stopped growing in
    # memory (its senders here went through its System V queue, into the bounded overflow,
    # and were paused in turn), and the daemon holds a bounded number of messages
    assert refused.is_set(), sent[0]
    router, feeder = daemon.registry.get("Router"), daemon.registry.get("Feeder")
    assert daemon.delivery.blocked("Router") and daemon.delivery.blocked("Feeder")
    assert len(router.queue) <= 1100 and len(feeder.queue) <= 400
    assert sent[0] < 20_000, sent[0]
    # And once "unread" is read, every message arrives, in order
    got = []
    async with asyncio.timeout(30):
        while len(got) < sent[0]:  # the daemon sends as room appears: read as it comes
            got += [m["n"] for m in drain(transit, "unread") if m.get("kind") == "x"]
            await asyncio.sleep(0.01)
    assert got == list(range(sent[0]))
    assert await inproc.stop() == 0


async def test_a_task_whose_lock_another_process_holds_is_adopted_not_run_twice(
        inproc, transit, tmp_path):
    import subprocess
    import sys
    # Given a stateful task whose own process (here: a process holding its lock, as one a
    # daemon killed mid-migration had just started would) runs already
    inproc.task("Solo", """
        from multimodule import Task

        class Solo(Task):
            is_stateful = True

            def message(self, message):
                pass
    """)
    inproc.config("[Solo]\n")
    inproc.state_dir.mkdir(mode=0o700, exist_ok=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | "
         "os.O_CREAT, 0o600); fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); "
         "sys.stdin.read()", str(inproc.state_dir / "task-Solo.lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert await asyncio.to_thread(holder.stdout.readline) == "locked\n"
        # When the daemon starts
        daemon = await inproc.start()
        # Then it does not run a second copy: it adopts the one that runs
        assert "Solo" not in daemon.registry.runners
        assert ("start", "Solo") in [(m, t) for m, t, _ in inproc.backend.calls]
        assert inproc.records_of("log", "task Solo runs in its own process")
        assert await inproc.stop() == 0
    finally:
        holder.kill()
        holder.wait()


async def test_the_daemon_holds_the_lock_of_a_stateful_task_it_runs(inproc):
    from multimodule.state import lock_holder
    inproc.task("Kept", """
        from multimodule import Task

        class Kept(Task):
            is_stateful = True

            def message(self, message):
                pass
    """)
    inproc.config("[Kept]\n")
    await inproc.start()
    # A process started for it now (a migration's, raced by a killed daemon) cannot take it
    assert lock_holder(inproc.state_dir / "task-Kept.lock") == os.getpid()
    assert await inproc.stop() == 0
    assert lock_holder(inproc.state_dir / "task-Kept.lock") is None
