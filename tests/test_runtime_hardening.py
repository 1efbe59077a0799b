"""The daemon's defences: messages for a full queue kept across exits, receivers that leave
messages in the kernel while a task is behind, and the Router's hop limit. The daemon runs
in-process (see tests/inprocess.py) over real System V queues; the AsyncReceiver test runs a
receiver on its own."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any, Callable

import orjson

from multimodule.errors import QueueFull
from multimodule.runtime import host as host_module
from multimodule.tasks.Router import MAX_HOPS
from multimodule.transit.lowlevel import AsyncReceiver

from helpers import drain, fill, router_section, strip_meta

#: The receiver's defaults in the daemon (see TaskRunner and Transit.receiver).
HIGH_WATER = 256
MAX_PENDING = 64


async def status_json(inproc) -> dict[str, Any]:
    """``mmctl status --json`` (in a worker thread, bounded by mmctl's own --wait): answers
    even while a task is busy, when the daemon is not quiet."""
    status, out, err = await inproc.mmctl("status", "--json")
    assert status == 0, err
    return json.loads(out)


# -- outboxes ---------------------------------------------------------------------------------


async def test_messages_for_a_full_queue_made_again_from_the_journal_at_next_start(
        inproc, transit, monkeypatch):
    # Given a stop that waits 0.2 s (not 5) for room in full queues, a System V queue
    # "full" filled by another process, and a Router forwarding {"kind": "x"} there
    monkeypatch.setattr(host_module, "OVERFLOW_EXIT_WAIT_S", 0.2)
    prefilled = fill(transit, "full")
    inproc.config('[Router]\nroutes = [ { match = { kind = "x" }, '
                  'forwards = [ { qname = "full" } ] } ]\n')
    await inproc.start()
    # When 3 messages wait in the daemon's outbox for that queue, and the daemon stops
    for n in range(3):
        inproc.send("Router", {"kind": "x", "n": n})
    await inproc.quiet()
    assert (await inproc.control(query="status"))["status"]["outboxes"] == {"full": 3}
    assert await inproc.stop() == 0, inproc.lines("error")
    # Then no outbox file is kept: the Router's checkpoint is from before it handled them,
    # so its journal holds the 3 messages it will forward again
    assert not (inproc.state_dir / "outbox.full.jsonl").exists()
    assert [m["n"] for m in inproc.journaled("Router") if m.get("kind") == "x"] == [0, 1, 2]
    # When the queue is drained and the daemon started again
    assert [m["p"] for m in drain(transit, "full")] == list(range(prefilled))
    daemon = await inproc.start()
    await inproc.quiet()
    for thread in [t for t in threading.enumerate() if t.name == "mm-overflow:full"]:
        await asyncio.to_thread(thread.join, 10)
    # Then they arrive, in order, once, with the ids they had the first time
    got = drain(transit, "full")
    assert [strip_meta(m) for m in got] == [{"kind": "x", "n": n} for n in range(3)]
    assert daemon.overflow.held == 0
    # and once they are sent, the next stop's checkpoint covers them: nothing left to redo
    assert await inproc.stop() == 0
    assert inproc.journaled("Router") == []


async def test_without_journals_messages_for_a_full_queue_kept_across_exit_and_sent_at_next_start(
        inproc, transit, monkeypatch):
    # Given a stop that waits 0.2 s (not 5) for room in full queues
    monkeypatch.setattr(host_module, "OVERFLOW_EXIT_WAIT_S", 0.2)
    # and a System V queue "full" filled up by another process (with messages smaller than
    # any the daemon will forward there, so none of those fits in what room is left)
    prefilled = fill(transit, "full")
    assert prefilled > 0
    # and a daemon without journals whose Router forwards {"kind": "x"} messages to it
    inproc.config('[Router]\nroutes = [ { match = { kind = "x" }, '
                  'forwards = [ { qname = "full" } ] } ]\n')
    daemon = await inproc.start(journal=False)
    # When 3 messages are to be forwarded there, and wait in the daemon's outbox
    for n in range(3):
        inproc.send("Router", {"kind": "x", "n": n})
    await inproc.quiet()
    assert (await inproc.control(query="status"))["status"]["outboxes"] == {"full": 3}
    # and the daemon stops (as on SIGTERM) while the queue stays full
    assert await inproc.stop() == 0, inproc.lines("error")
    # Then it says on its error channel that the 3 messages were kept in
    # state_dir/outbox.full.jsonl
    path = inproc.state_dir / "outbox.full.jsonl"
    line = inproc.records_of("error", "stayed full")[0].line
    assert f"queue 'full' stayed full: 3 messages kept in {path}" in line, line
    # and the file holds them, in order, one per line
    kept = [orjson.loads(raw) for raw in path.read_bytes().splitlines()]
    assert [(m["kind"], m["n"]) for m in kept] == [("x", 0), ("x", 1), ("x", 2)]

    # When the other process drains the queue: only the pre-filled messages were there
    assert [m["p"] for m in drain(transit, "full")] == list(range(prefilled))
    # and the daemon is started again (as a new process would be)
    mark = len(inproc.records)
    daemon = await inproc.start(journal=False)
    # Then it says, before it is running, that it sends the kept messages
    said = [r.text for r in inproc.records[mark:] if r.channel == "log"]
    sending = said.index("sending 3 messages kept for queue 'full' at the last exit")
    assert sending < next(i for i, text in enumerate(said) if text.startswith("running (pid"))
    # and they arrive, in order, once (its sender thread has sent them all and ended)
    for thread in [t for t in threading.enumerate() if t.name == "mm-overflow:full"]:
        await asyncio.to_thread(thread.join, 10)
        assert not thread.is_alive()
    got = drain(transit, "full")
    assert [strip_meta(m) for m in got] == [{"kind": "x", "n": n} for n in range(3)]
    assert daemon.overflow.held == 0
    assert not path.exists()
    assert await inproc.stop() == 0


# -- receiver backpressure --------------------------------------------------------------------

#: The first message waits (in an async handler, so the loop and status queries go on) until
#: the test sets ``go``, after setting ``started`` (asyncio events the test reaches through the
#: task instance); every message goes out with its number.
BLOCKED = """
    import asyncio
    from multimodule import Task

    class Blocked(Task):
        def set_config(self, config):
            self.started, self.go = asyncio.Event(), asyncio.Event()

        async def message(self, message):
            if message["i"] == 0:
                self.started.set()
                await self.go.wait()
            self.emit({"i": message["i"]})
"""


async def test_blocked_task_leaves_messages_in_the_kernel_then_handles_all_in_order(
        inproc, transit):
    count = 1000
    bound = HIGH_WATER + MAX_PENDING + 1
    # Given a task whose first message blocks it until it is let go
    inproc.task("Blocked", BLOCKED)
    inproc.config("[Blocked]\n\n" + router_section(
        '{ match = { source = "Blocked" }, forwards = [ { qname = "out" } ] }'))
    inproc.capture("out")
    daemon = await inproc.start()
    runner = daemon.runners["Blocked"]
    transit.send("Blocked", {"i": 0})
    async with asyncio.timeout(10):
        await runner.task.started.wait()
    # When another process sends it more messages over System V, refilling the kernel queue
    # whenever there is room, until the daemon's receiver has stopped taking (it waits for
    # the task: nothing but the task's progress moves it on) with the kernel queue full
    sent = 1
    depths: list[int] = []
    async with asyncio.timeout(30):
        while True:
            full = False
            while sent < count:
                try:
                    transit.send("Blocked", {"i": sent}, timeout=0)
                except QueueFull:
                    full = True
                    break
                sent += 1
            depths.append(runner.queue.depth)
            if full and runner.receiver.throttled and not runner.receiver.pending:
                break
            await asyncio.sleep(0.001)  # the receiver thread and the loop take their turns
    depth, in_kernel = runner.queue.depth, transit.stat("Blocked").messages
    # Then the daemon holds at most high_water + max_pending (+1) messages in memory
    assert depth >= HIGH_WATER, depths
    assert max(depths) <= bound, depths
    assert (await status_json(inproc))["tasks"]["Blocked"]["queue_depth"] == depth
    # and the rest stay in the kernel queue, which has stopped draining
    assert in_kernel > 0, (in_kernel, sent)
    again = (await status_json(inproc))["tasks"]["Blocked"]["queue_depth"]
    assert (again, transit.stat("Blocked").messages) == (depth, in_kernel)

    # When the task is let go, and the rest is sent (from a thread: it waits for room)
    runner.task.go.set()

    def send_rest() -> None:
        for i in range(sent, count):
            transit.send("Blocked", {"i": i}, timeout=30)

    sender = asyncio.get_running_loop().run_in_executor(None, send_rest)
    # Then every message is handled, once, in order
    got = [(await inproc.next("out"))["i"] for _ in range(count)]
    await sender
    assert got == list(range(count))
    await inproc.quiet()
    assert inproc.taken("out") == []
    report = (await inproc.control(query="status"))["status"]["tasks"]["Blocked"]
    assert (report["messages_in"], report["task_message_failure"]) == (count, 0)


def test_async_receiver_stops_taking_at_high_water_and_resumes_when_consumed(transit):
    # Given 20 messages on a System V queue, and a receiver with high_water 5 and
    # max_pending 1 whose deliveries go to a list that this test empties by hand
    count, high_water, max_pending = 20, 5, 1
    for i in range(count):
        transit.send("bp", {"i": i})
    queue = transit.sysv_queue("bp")
    got: list[dict[str, Any]] = []

    async def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"condition not met; {len(got)} delivered"
            await asyncio.sleep(0.001)

    async def scenario() -> list[int]:
        receiver = AsyncReceiver(queue, got.append, backlog=got.__len__,
                                 high_water=high_water, max_pending=max_pending)
        receiver.start()
        taken: list[int] = []
        try:
            while len(taken) < count:
                remaining = count - len(taken)
                # When the list is not emptied: the receiver stops (waits for the consumer)
                # once high_water messages are delivered, or it has taken the last ones
                await wait_until(lambda: (receiver.throttled and len(got) >= high_water)
                                 or len(got) == remaining)
                await asyncio.sleep(0)  # run the drain already scheduled by its last take
                # Then it took at most max_pending more, and the rest is in the kernel
                if len(got) < remaining:
                    assert high_water <= len(got) <= high_water + max_pending, len(got)
                assert queue.stat().messages == remaining - len(got)
                # When the list is emptied and consumed() called: it resumes
                taken += [m["i"] for m in got]
                got.clear()
                receiver.consumed()
        finally:
            await receiver.stop()
        return taken

    # Then every message came through once, in order
    assert asyncio.run(scenario()) == list(range(count))
    assert queue.stat().messages == 0


# -- the Router's hop limit -------------------------------------------------------------------


async def test_routing_loop_broken_reported_daemon_keeps_serving_and_stops_promptly(inproc):
    # Given a Router route that sends {"loop": 1} back to the Router
    inproc.config('[Router]\nroutes = [ { match = { loop = 1 }, '
                  'forwards = [ { qname = "Router" } ] } ]\n')
    await inproc.start()
    # When one such message arrives
    inproc.send("Router", {"loop": 1})
    # Then the loop is reported
    await inproc.quiet()
    line = inproc.records_of("error", "routing loop")[0].line
    assert line.startswith(f"error: Router: message passed the Router {MAX_HOPS} times"), line
    # and the daemon still answers, counting one broken loop (the message passed once from
    # the queue and MAX_HOPS times more)
    router = (await inproc.control(query="status"))["status"]["tasks"]["Router"]
    assert router["loops_broken"] == 1
    assert router["messages_in"] == MAX_HOPS + 1
    assert len(inproc.records_of("error", "routing loop")) == 1
    # and it stops at once (as on SIGTERM) with status 0
    started = time.monotonic()
    assert await inproc.stop() == 0, inproc.lines("error")
    assert time.monotonic() - started < 5


async def test_static_forwards_through_a_task_count_hops_and_reach_the_last_hop(inproc):
    # Given a task that passes on every message it gets (back through the Router)
    inproc.task("Relay", """
        from multimodule import Task

        class Relay(Task):
            def message(self, message):
                message.pop(".ipc_transit_meta", None)
                self.emit(message)
    """)
    inproc.config("[Relay]\n\n" + router_section())
    inproc.capture("out")
    await inproc.start()
    # When a message with two static hops (Relay, then "out") is given to the Router
    inproc.send("Router", {"v": 1, "static_forwards": [[{"forward": {"qname": "Relay"}}],
                                                       [{"forward": {"qname": "out"}}]]})
    await inproc.quiet()
    # Then the Router has seen it twice
    router = (await inproc.control(query="status"))["status"]["tasks"]["Router"]
    assert router["messages_in"] >= 2
    # and it is on "out", having passed the Router twice, and no loop was reported
    got = inproc.transit.local_queue("out").drain()
    assert len(got) == 1, got
    assert not inproc.records_of("error", "routing loop"), inproc.lines()
    assert strip_meta(got[0]) == {"v": 1, "source": "Relay"}
    assert got[0][".router_hops"] == 2, got
