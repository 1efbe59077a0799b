"""The daemon's defences: messages for a full queue kept across exits, receivers that leave
messages in the kernel while a task is behind, and the Router's hop limit. Real daemon
subprocesses over real System V queues, except the in-process AsyncReceiver test."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Callable

import orjson

from multimodule.errors import Empty, QueueFull
from multimodule.tasks.Router import MAX_HOPS
from multimodule.transit.lowlevel import AsyncReceiver

from helpers import receive_n, router_section, strip_meta, wait_for_file

#: The receiver's defaults in the daemon (see TaskRunner and Transit.receiver).
HIGH_WATER = 256
MAX_PENDING = 64


def status_json(mm) -> dict[str, Any]:
    """``mmctl status --json`` (bounded by mmctl's own --wait)."""
    status, out, err = mm.mmctl("status", "--json")
    assert status == 0, err
    return json.loads(out)


def wait_status(mm, predicate: Callable[[dict[str, Any]], bool], *, timeout: float = 10.0
                ) -> dict[str, Any]:
    """Ask for the daemon's status until ``predicate`` holds (at most ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while True:
        report = status_json(mm)
        if predicate(report):
            return report
        if time.monotonic() > deadline:
            raise AssertionError(f"status condition not met within {timeout} s; last: {report}")


def drain(transit, qname: str) -> list[dict[str, Any]]:
    """Every message waiting on ``qname`` now."""
    out = []
    while True:
        try:
            out.append(transit.receive(qname, timeout=0))
        except Empty:
            return out


# -- outboxes ---------------------------------------------------------------------------------


def test_messages_for_a_full_queue_kept_across_exit_and_sent_at_next_start(mm, transit):
    # Given a System V queue "full" filled up by this process (with messages smaller than
    # any the daemon will forward there, so none of those fits in what room is left)
    prefilled = 0
    while True:
        try:
            transit.send("full", {"p": prefilled}, timeout=0)
        except QueueFull:
            break
        prefilled += 1
    assert prefilled > 0
    # and a daemon whose Router forwards {"kind": "x"} messages to it
    mm.config('[Router]\nroutes = [ { match = { kind = "x" }, '
              'forwards = [ { qname = "full" } ] } ]\n')
    daemon = mm.start()
    # When 3 messages are to be forwarded there, and wait in the daemon's outbox
    for n in range(3):
        transit.send("Router", {"kind": "x", "n": n})
    wait_status(mm, lambda s: s["outboxes"] == {"full": 3})
    # and the daemon gets SIGTERM while the queue stays full
    assert daemon.terminate(30) == 0, daemon.output()
    # Then it says on stderr that the 3 messages were kept in state_dir/outbox.full.jsonl
    path = mm.state_dir / "outbox.full.jsonl"
    line = daemon.expect("stderr", "stayed full")
    assert f"queue 'full' stayed full: 3 messages kept in {path}" in line, line
    # and the file holds them, in order, one per line
    kept = [orjson.loads(raw) for raw in path.read_bytes().splitlines()]
    assert [(m["kind"], m["n"]) for m in kept] == [("x", 0), ("x", 1), ("x", 2)]

    # When this process drains the queue: only the pre-filled messages were there
    assert [m["p"] for m in drain(transit, "full")] == list(range(prefilled))
    # and the daemon is started again
    daemon = mm.start()
    # Then it says (before it is running) that it sends the kept messages
    daemon.wait_line("stdout", "sending 3 messages kept for queue 'full' at the last exit")
    # and they arrive, in order, once
    got = receive_n(transit, "full", 3)
    assert [strip_meta(m) for m in got] == [{"kind": "x", "n": n} for n in range(3)]
    try:
        extra = transit.receive("full", timeout=0.3)
    except Empty:
        extra = None
    assert extra is None, extra
    assert not path.exists()
    daemon.stop_ok()


# -- receiver backpressure --------------------------------------------------------------------

#: The first message waits (in an async handler, so the loop and status queries go on) until
#: the file "go" appears, after creating "started"; every message goes out with its number.
BLOCKED = """
    import asyncio, os, time
    from multimodule import Task

    class Blocked(Task):
        async def message(self, message):
            if message["i"] == 0:
                open(os.path.join(self.config["dir"], "started"), "w").close()
                deadline = time.monotonic() + 60
                while not os.path.exists(os.path.join(self.config["dir"], "go")):
                    if time.monotonic() > deadline:
                        raise RuntimeError("no go file")
                    await asyncio.sleep(0.005)
            self.emit({"i": message["i"]})
"""


def test_blocked_task_leaves_messages_in_the_kernel_then_handles_all_in_order(mm, transit):
    count = 1000
    bound = HIGH_WATER + MAX_PENDING + 1
    # Given a task whose first message blocks it until the file "go" exists
    mm.task("Blocked", BLOCKED)
    mm.config(f'[Blocked]\ndir = "{mm.tmp}"\n\n' + router_section(
        '{ match = { source = "Blocked" }, forwards = [ { qname = "out" } ] }'))
    mm.start()
    transit.send("Blocked", {"i": 0})
    wait_for_file(mm.tmp / "started")
    # When this process sends it more messages over System V, refilling the kernel queue
    # whenever there is room, until the daemon's figures stop moving
    sent = 1
    depths: list[int] = []
    previous = None
    deadline = time.monotonic() + 30
    while True:
        while sent < count:
            try:
                transit.send("Blocked", {"i": sent}, timeout=0)
            except QueueFull:
                break
            sent += 1
        depth = status_json(mm)["tasks"]["Blocked"]["queue_depth"]
        in_kernel = transit.stat("Blocked").messages
        depths.append(depth)
        now = (depth, in_kernel, sent)
        if depth >= HIGH_WATER and now == previous:
            break  # two looks in a row, with a status round trip between: stable
        previous = now
        assert time.monotonic() < deadline, f"never stable; depths {depths[-10:]}, last {now}"
    # Then the daemon holds at most high_water + max_pending (+1) messages in memory
    assert max(depths) <= bound, depths
    # and the rest stay in the kernel queue, which has stopped draining
    assert in_kernel > 0, (in_kernel, sent)
    again = status_json(mm)["tasks"]["Blocked"]["queue_depth"]
    assert (again, transit.stat("Blocked").messages) == (depth, in_kernel)

    # When the task is let go, and the rest is sent
    (mm.tmp / "go").touch()
    for i in range(sent, count):
        transit.send("Blocked", {"i": i}, timeout=30)
    # Then every message is handled, once, in order
    assert [m["i"] for m in receive_n(transit, "out", count)] == list(range(count))
    report = status_json(mm)["tasks"]["Blocked"]
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
                await wait_until(lambda: (receiver._throttled and len(got) >= high_water)
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


def test_routing_loop_broken_reported_daemon_keeps_serving_and_stops_promptly(mm, transit):
    # Given a Router route that sends {"loop": 1} back to the Router
    mm.config('[Router]\nroutes = [ { match = { loop = 1 }, '
              'forwards = [ { qname = "Router" } ] } ]\n')
    daemon = mm.start()
    # When one such message arrives
    transit.send("Router", {"loop": 1})
    # Then the loop is reported within a few seconds
    line = daemon.expect("stderr", "routing loop", timeout=5)
    assert line.startswith(f"error: Router: message passed the Router {MAX_HOPS} times"), line
    # and the daemon still answers, counting one broken loop (the message passed once from
    # the queue and MAX_HOPS times more)
    router = status_json(mm)["tasks"]["Router"]
    assert router["loops_broken"] == 1
    assert router["messages_in"] == MAX_HOPS + 1
    assert len(daemon.lines_matching("stderr", "routing loop")) == 1
    # and it stops at once on SIGTERM with status 0
    started = time.monotonic()
    assert daemon.terminate(10) == 0, daemon.output()
    assert time.monotonic() - started < 5


def test_static_forwards_through_a_task_count_hops_and_reach_the_last_hop(mm, transit):
    # Given a task that passes on every message it gets (back through the Router)
    mm.task("Relay", """
        from multimodule import Task

        class Relay(Task):
            def message(self, message):
                message.pop(".ipc_transit_meta", None)
                self.emit(message)
    """)
    mm.config("[Relay]\n\n" + router_section())
    daemon = mm.start()
    # When a message with two static hops (Relay, then "out") is given to the Router
    transit.send("Router", {"v": 1, "static_forwards": [[{"forward": {"qname": "Relay"}}],
                                                        [{"forward": {"qname": "out"}}]]})
    # Then once the Router has seen it twice (its forwards are sent during the pass)
    wait_status(mm, lambda s: s["tasks"]["Router"]["messages_in"] >= 2)
    # it is on "out", having passed the Router twice, and no loop was reported
    try:
        got = transit.receive("out", timeout=1)
    except Empty:
        raise AssertionError("the message never reached its last hop\n"
                             + daemon.output()) from None
    assert not daemon.lines_matching("stderr", "routing loop"), daemon.output()
    assert strip_meta(got) == {"v": 1, "source": "Relay"}
    assert got[".router_hops"] == 2, got
