"""The task hooks the Bridge is built on, open to every task: ``stopping()`` and ``stopped()``
(once each, in that order, around the last messages), ``wait_sent()`` (what was sent is in
the receiver's journal), ``private_path()`` and ``set_stalled()``."""

from __future__ import annotations

import json

import pytest

HOOKED = """
    import asyncio
    from multimodule import Task

    class Hooked(Task):
        is_stateful = True

        def set_config(self, config):
            self.state.setdefault("calls", [])
            path = self.private_path("extra")
            self.state["private"] = str(path)
            for bad in ("a/b", "..", "", "x" * 65, "sp ace"):
                try:
                    self.private_path(bad)
                except ValueError:
                    continue
                self.state["calls"].append("accepted " + repr(bad))

        async def message(self, message):
            self.state["calls"].append(f"message {message['n']}")
            self.send("Sink", {"n": message["n"]})
            await self.wait_sent()

        def stopping(self):
            self.state["calls"].append("stopping")

        def stopped(self):
            self.state["calls"].append("stopped")
"""

SINK = """
    from multimodule import Task

    class Sink(Task):
        def message(self, message):
            pass
"""


async def test_stopping_and_stopped_are_called_once_in_order_and_saved(inproc):
    inproc.task("Hooked", HOOKED)
    inproc.config("[Hooked]\n")
    await inproc.start()
    inproc.send("Hooked", {"n": 1})
    await inproc.quiet()
    assert await inproc.stop() == 0
    # Then the state saved at the stop shows the hooks after the message, once each
    saved = json.loads((inproc.state_dir / "Hooked.state.json").read_text())["state"]
    assert saved["calls"] == ["message 1", "stopping", "stopped"]
    assert saved["private"] == str(inproc.state_dir / "Hooked.extra")


async def test_wait_sent_returns_once_the_receivers_journal_holds_the_message(inproc):
    inproc.task("Hooked", HOOKED)
    inproc.task("Sink", SINK)
    inproc.config("[Hooked]\n[Sink]\n")
    await inproc.start()
    daemon = inproc.daemon
    sink = daemon.registry.runners["Sink"]
    written = []
    flush = sink.journal.flush

    def recording_flush():
        flush()
        written.append(len(sink.queue))

    sink.journal.flush = recording_flush
    hooked = daemon.registry.runners["Hooked"].task
    # When Hooked's handler sends to Sink and awaits wait_sent()
    await hooked.message({"n": 7})
    # Then Sink's journal was written before wait_sent returned (not at the end of the turn)
    assert written, "wait_sent returned before the receiver's journal was written"
    assert inproc.journaled("Sink")[-1]["n"] == 7


async def test_a_stalled_task_is_treated_as_paused_by_the_senders_here(inproc):
    inproc.task("Sink", SINK)
    inproc.config("[Sink]\n")
    await inproc.start()
    delivery = inproc.daemon.delivery
    runner = inproc.daemon.registry.runners["Sink"]
    # A stalled task far behind makes sends to it spill; not stalled, they stay in memory
    for n in range(1100):
        runner.queue.put({"n": n})
    assert not delivery.spilling("Sink")
    runner.task.set_stalled(True)
    assert delivery.spilling("Sink")
    runner.task.set_stalled(False)
    runner.queue.drain()
    assert not delivery.spilling("Sink")
    assert "Sink" not in delivery.stalled


@pytest.mark.parametrize("suffix", ["inbound", "seq-2", "A_b"])
def test_private_path_names_a_file_of_the_task_in_the_state_dir(tmp_path, suffix):
    from multimodule.runtime.runner import TaskRunner

    class Store:
        path = tmp_path

    runner = TaskRunner.__new__(TaskRunner)
    runner.name, runner.store = "T", Store()
    assert runner.private_path(suffix) == tmp_path / f"T.{suffix}"
