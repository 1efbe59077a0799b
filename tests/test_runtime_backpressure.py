"""Backpressure across in-memory hops: a task that sends to a task of the same process that is
far behind is held back (no input taken, timers held, its own coroutines wait in
``Task.drain``), so that a burst fills queues only up to a bound instead of the process's
memory; a cycle of tasks never waits on itself."""

from __future__ import annotations

import asyncio

import pytest

from helpers import route, router_section
from multimodule.runtime.delivery import LOCAL_HIGH_WATER

N = 20_000

#: A free-running producer, as bench/runtime.py's: bursts of 500, then drain() and a turn of
#: the loop.
BURST = """
    import asyncio
    from multimodule import Task

    class Burst(Task):
        def message(self, message):
            self.job = asyncio.get_running_loop().create_task(
                self.produce(message["n"], message["to"]))

        async def produce(self, n, to):
            for i in range(n):
                if to == "Router":
                    self.emit({"i": i})  # to the Router, with "source": "Burst"
                else:
                    self.send(to, {"i": i})
                if i % 500 == 499:
                    await self.drain()
                    await asyncio.sleep(0)
"""

#: A handler-driven producer: each message it is given makes it send 50.
FAN = """
    from multimodule import Task

    class Fan(Task):
        def message(self, message):
            for k in range(50):
                self.send("Slow", {"i": message["j"] * 50 + k})
"""

#: A consumer slower than its producers (about 10 us of work per message).
SLOW = """
    from multimodule import Task

    class Slow(Task):
        def set_config(self, config):
            self.seen = []

        def message(self, message):
            sum(range(500))
            self.seen.append(message["i"])
"""


def deepest(runner) -> list[int]:
    """Record the deepest the runner's in-memory queue gets (a one-item list, updated)."""
    queue = runner.queue
    put = queue.put
    most = [0]

    def recording_put(message):
        put(message)
        if len(queue) > most[0]:
            most[0] = len(queue)

    queue.put = recording_put
    return most


async def test_a_producer_coroutine_that_drains_keeps_its_consumers_queue_bounded(inproc):
    inproc.task("Burst", BURST)
    inproc.task("Slow", SLOW)
    inproc.config("[Burst]\n[Slow]\n")
    daemon = await inproc.start()
    most = deepest(daemon.runners["Slow"])
    # When the producer sends 20,000 messages in bursts of 500, awaiting drain() after each
    inproc.send("Burst", {"n": N, "to": "Slow"})
    await inproc.quiet()
    await daemon.runners["Burst"].task.job
    await inproc.quiet()
    # Then all arrive, in order, and the consumer was never much more than the bound behind
    # (without backpressure: about 16,000 behind)
    assert daemon.runners["Slow"].task.seen == list(range(N))
    assert most[0] <= LOCAL_HIGH_WATER + 500, most[0]


async def test_a_handler_that_fans_out_is_held_back_and_its_input_stays_in_the_kernel(
        inproc, transit):
    inproc.task("Fan", FAN)
    inproc.task("Slow", SLOW)
    inproc.config("[Fan]\n[Slow]\n")
    daemon = await inproc.start()
    most = deepest(daemon.runners["Slow"])
    held = []
    hold_back = daemon.delivery.hold_back

    def recording_hold_back(producer, consumer):
        hold_back(producer, consumer)
        if producer in daemon.delivery.held_for:
            held.append((producer, consumer, transit.stat("Fan").messages))

    daemon.delivery.hold_back = recording_hold_back
    # When another process sends Fan 400 messages, each making it send 50 to Slow
    await asyncio.to_thread(send_all, transit, "Fan", [{"j": j} for j in range(400)])
    await inproc.quiet()
    # Then Slow gets all 20,000 in order, was never far more than the bound behind, and Fan
    # was held back for it (with its input left in its System V queue meanwhile)
    assert daemon.runners["Slow"].task.seen == list(range(400 * 50))
    assert held and {(p, c) for p, c, _ in held} == {("Fan", "Slow")}
    # (a batch of Fan's handlers runs for at most 2 ms: about 15 of them, 750 messages)
    assert most[0] <= LOCAL_HIGH_WATER + 1500, most[0]


def send_all(transit, qname, messages):
    """Send over System V, as another process would (waiting while the queue is full)."""
    for message in messages:
        transit.send(qname, message)


async def test_through_the_router_every_hop_stays_bounded(inproc):
    inproc.task("Burst", BURST)
    inproc.task("Slow", SLOW)
    inproc.config("[Burst]\n[Slow]\n" + router_section(route("Burst", "Slow")))
    daemon = await inproc.start()
    slow_most = deepest(daemon.runners["Slow"])
    router_most = deepest(daemon.runners["Router"])
    # When the producer bursts 20,000 messages through the Router to the slow consumer
    inproc.send("Burst", {"n": N, "to": "Router"})
    await inproc.quiet()
    await daemon.runners["Burst"].task.job
    await inproc.quiet()
    # Then both the Router's queue and the consumer's stayed near the bound, nothing lost
    assert daemon.runners["Slow"].task.seen == list(range(N))
    assert slow_most[0] <= LOCAL_HIGH_WATER + 1500, slow_most[0]
    assert router_most[0] <= LOCAL_HIGH_WATER + 1500, router_most[0]


PING = """
    from multimodule import Task

    class Ping(Task):
        def set_config(self, config):
            self.done = []

        def message(self, message):
            if message.get("back"):
                self.done.append(message["i"])
            else:
                self.send("Pong", message)
"""

PONG = """
    from multimodule import Task

    class Pong(Task):
        def message(self, message):
            sum(range(500))
            self.send("Ping", {"i": message["i"], "back": True})
"""


@pytest.mark.parametrize("n", [N])
async def test_tasks_that_send_to_each_other_never_wait_on_each_other_for_good(inproc, n):
    inproc.task("Burst", BURST)
    inproc.task("Ping", PING)
    inproc.task("Pong", PONG)
    inproc.config("[Burst]\n[Ping]\n[Pong]\n")
    daemon = await inproc.start()
    # When a burst goes to Ping, which sends each to Pong, which sends each back to Ping
    # (both far behind at once: each would wait for the other)
    inproc.send("Burst", {"n": n, "to": "Ping"})
    await inproc.quiet()
    await daemon.runners["Burst"].task.job
    await inproc.quiet()
    # Then every message made the round trip: one of the two kept going
    assert sorted(daemon.runners["Ping"].task.done) == list(range(n))
    assert not daemon.delivery.held_for
