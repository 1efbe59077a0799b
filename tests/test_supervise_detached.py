"""The detached-process backend for external tasks: real processes, real System V queues."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import textwrap
from pathlib import Path

import pytest

from multimodule.errors import BackendError, DetachedProcessError, UnitError, UsageError
from multimodule.supervise.base import (
    ActiveState,
    LaunchSpec,
    choose_backend_name,
)
from multimodule.supervise.detached import DetachedBackend
from helpers import saved_state

REPO = Path(__file__).resolve().parent.parent

TICKER = textwrap.dedent("""
    from multimodule import Task

    class Ticker(Task):
        is_stateful = True

        def set_config(self, config):
            self.named_recur("tick", 0.05, self.tick)

        def tick(self):
            ct = self.state.get("ct", 0)
            self.emit({"ct": ct})
            self.state["ct"] = ct + 1
""")


@pytest.fixture
def spec(tmp_path, transit_dir, monkeypatch) -> LaunchSpec:
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "Ticker.py").write_text(TICKER)
    config = tmp_path / "config.toml"
    # Marked external (as the daemon will see it), beside another external task that this
    # process must not check or load.
    config.write_text("[Ticker]\nis_external = true\nintervals = { save_state = 0.05 }\n\n"
                      "[Other]\nis_external = true\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return LaunchSpec(argv_prefix=(sys.executable, "-m", "multimodule.cli.daemon"),
                      state_dir=tmp_path / "state", config_file=config,
                      transit_dir=transit_dir, task_path=(tasks,))


@pytest.fixture
def cleanup(spec):
    backends: list[DetachedBackend] = []
    yield backends.append
    for backend in backends:
        backend.close()
    DetachedBackend(spec).stop("Ticker", timeout=5)


def counts(transit, n: int) -> list[int]:
    """The next ``n`` counts the Ticker emitted (they wait on the System V Router queue)."""
    return [transit.receive("Router", timeout=15)["ct"] for _ in range(n)]


def test_start_runs_the_task_detached_and_a_second_backend_adopts_it(spec, transit, cleanup):
    # Given a backend / When it starts the task
    first = DetachedBackend(spec)
    cleanup(first)
    started = first.start("Ticker")
    # Then the task runs in its own session and its emits arrive
    assert counts(transit, 3) == [0, 1, 2]
    status = first.status("Ticker")
    assert status.state is ActiveState.ACTIVE and status.main_pid == started.main_pid
    assert os.getsid(status.main_pid) == status.main_pid  # a session leader: detached
    # When another backend (a new daemon) starts the same task
    second = DetachedBackend(spec)
    cleanup(second)
    adopted = second.start("Ticker")
    # Then it adopts the running process instead of starting a second one
    assert adopted.main_pid == started.main_pid and adopted.running


def test_stop_saves_state_and_leaves_nothing_running(spec, transit, cleanup):
    backend = DetachedBackend(spec)
    cleanup(backend)
    backend.start("Ticker")
    last = counts(transit, 3)[-1]
    # When the task is stopped
    backend.stop("Ticker", timeout=10)
    # Then no process holds its lock, and its state is at least what it had emitted
    assert backend.status("Ticker").state is ActiveState.INACTIVE
    saved = saved_state(spec.state_dir / "Ticker.state.json")
    assert saved["ct"] > last


def test_a_crashed_task_is_restarted_and_continues_from_saved_state(spec, transit, cleanup):
    async def scenario():
        events: list[tuple[str, str]] = []
        restarted = asyncio.Event()

        def on_event(task, text):
            events.append((task, text))
            if text.startswith("started") and len(events) > 1:
                restarted.set()

        backend = DetachedBackend(spec, loop=asyncio.get_running_loop(), on_event=on_event)
        cleanup(backend)
        first = backend.start("Ticker")
        seen = await asyncio.to_thread(counts, transit, 3)
        # When its process is killed (no chance to save on the way out)
        os.kill(first.main_pid, signal.SIGKILL)
        # Then the backend notices the exit (pidfd) and starts it again after the backoff
        await asyncio.wait_for(restarted.wait(), 10)
        assert any("exited" in text for _, text in events)
        assert backend.restarts["Ticker"] == 1
        second = backend.status("Ticker")
        assert second.main_pid != first.main_pid
        # and the count goes on from the last saved state: it never starts again from 0,
        # and steps back at most by what was emitted after the last save (a tick or two)
        after = await asyncio.to_thread(counts, transit, 40)
        steps = list(zip(seen[-1:] + after, after))
        assert 0 not in after, after
        assert all(b >= a - 3 for a, b in steps), after
        assert after[-1] > seen[-1] + 20

    asyncio.run(scenario())


def test_a_watched_running_task_is_known_without_reading_proc_locks(spec, transit, cleanup,
                                                                     monkeypatch):
    import multimodule.supervise.detached as detached

    async def scenario():
        backend = DetachedBackend(spec, loop=asyncio.get_running_loop())
        cleanup(backend)
        started = backend.start("Ticker")
        await asyncio.to_thread(counts, transit, 2)  # it runs, so it holds its lock
        assert backend.status("Ticker").state is ActiveState.ACTIVE  # one read, remembered
        reads = []
        real = detached.lock_holder
        monkeypatch.setattr(detached, "lock_holder", lambda path: reads.append(path) or
                            real(path))
        # When the monitor asks again and again: no read of /proc/locks (linear in tasks)
        for _ in range(50):
            status = backend.status("Ticker")
            assert status.state is ActiveState.ACTIVE and status.main_pid == started.main_pid
        assert reads == []
        # And once the process is gone, the backend reads the locks again (and sees none)
        os.kill(started.main_pid, signal.SIGKILL)
        while "Ticker" in backend._watched_pids:  # the pidfd's event, on this loop
            await asyncio.sleep(0.01)
        backend._wanted.discard("Ticker")  # no restart: this test is about status
        assert backend.status("Ticker").state is ActiveState.INACTIVE
        assert reads

    asyncio.run(scenario())


def test_backend_choice():
    assert choose_backend_name(None, {}) == "detached"
    assert choose_backend_name("auto", {}) == "detached"
    assert choose_backend_name("systemd", {}) == "systemd"
    assert choose_backend_name("detached", {"INVOCATION_ID": "x"}) == "detached"
    expected = "systemd" if Path("/run/systemd/system").is_dir() else "detached"
    assert choose_backend_name(None, {"INVOCATION_ID": "x"}) == expected
    with pytest.raises(UsageError, match="unknown task backend 'docker'"):
        choose_backend_name("docker", {})


def test_a_start_that_fails_is_a_backend_error_of_the_detached_backend(tmp_path):
    # Given a backend whose command does not exist
    spec = LaunchSpec(argv_prefix=(str(tmp_path / "no-such-command"),),
                      state_dir=tmp_path / "state")
    # When it starts a task / Then the error is the detached backend's, not a unit's
    with pytest.raises(DetachedProcessError, match="cannot start task T") as info:
        DetachedBackend(spec).start("T")
    assert isinstance(info.value, BackendError) and not isinstance(info.value, UnitError)
    assert isinstance(info.value.__cause__, OSError)


def test_launch_spec_passes_the_daemon_options_on(tmp_path):
    spec = LaunchSpec(argv_prefix=("multimodule",), state_dir=tmp_path / "s",
                      config_file=tmp_path / "c.toml", transit_dir=tmp_path / "t",
                      task_path=(tmp_path / "tasks",), prefixes=("", "my.tasks."))
    assert spec.argv("T") == [
        "multimodule", "-m", "T", "-s", str(tmp_path / "s"), "-c", str(tmp_path / "c.toml"),
        "-T", str(tmp_path / "t"), "--task-path", str(tmp_path / "tasks"), "-p", ",my.tasks."]
