"""Out-of-band channels: a slow sink never blocks the caller (drops counted and reported),
and ``-o`` routes each channel of the daemon and of its external tasks to a file or a queue.
The journal handler is checked against a real journald in tests/test_systemd_daemon.py."""

from __future__ import annotations

import threading

from multimodule.oob import Channels, Sink

from helpers import receive_until, router_section, wait_for_file


class BlockedSink(Sink):
    """A sink whose writes wait until ``release`` is set (a stuck journald, a full disk)."""

    def __init__(self):
        super().__init__("stderr")
        self.release = threading.Event()
        self.entered = threading.Event()
        self.lines: list[str] = []

    def write(self, channel, task, text, fields, send, when=None):
        self.entered.set()
        self.release.wait()
        self.lines.append(f"{channel}: {task}: {text} {fields}")


def test_a_blocked_sink_never_blocks_emit_and_drops_are_counted_and_reported():
    sink = BlockedSink()
    channels = Channels({"log": sink, "error": sink, "alert": sink, "debug": sink},
                        queue_size=5)
    # Given a writer stuck in its first record
    channels.emit("log", "T", "first")
    assert sink.entered.wait(10)
    # When 20 more records come, all emit calls return at once (the caller is never held)
    for n in range(20):
        channels.emit("log", "T", f"record {n}")
    # Then 5 wait in the queue and 15 are dropped and counted
    assert channels.dropped == 15
    # And once the sink moves again, the queued ones are written, then the drop report
    sink.release.set()
    assert channels.flush(10)
    channels.close()
    assert [line.split(" {")[0] for line in sink.lines[:6]] == \
        ["log: T: first"] + [f"log: T: record {n}" for n in range(5)]
    assert "15 out-of-band records were dropped" in sink.lines[6]
    assert channels.counts["log"] == 21


RAISER = """
    import os
    from multimodule import Task

    class {name}(Task):
        is_stateful = True

        def message(self, message):
            raise RuntimeError("cannot handle " + str(message["n"]) + " in " + str(os.getpid()))
"""


def test_oob_spec_routes_each_channel_of_daemon_and_external_tasks(mm, transit, tmp_path):
    mm.task("Inside", RAISER.format(name="Inside"))
    mm.task("Outside", RAISER.format(name="Outside"))
    mm.config("[Inside]\n[Outside]\nis_external = true\n" + router_section())
    log, alerts, debug = tmp_path / "log.txt", tmp_path / "alerts.txt", tmp_path / "debug.txt"
    # Given log and alert to files, error to a queue, debug to a file at level 1
    daemon = mm.start("-o", f"log:{log},error:errs,alert:{alerts},debug:{debug}", "-d", "1",
                      "--monitor-interval", "0.1", wait=False)
    wait_for_file(log, lambda p: p.exists() and "running (pid" in p.read_text())
    # When a task in the daemon and one in its own process fail on a message
    transit.send("Inside", {"n": 1})
    transit.send("Outside", {"n": 2})
    # Then both errors arrive on the queue as records with the documented fields
    got = {}
    receive_until(transit, "errs", lambda m: got.setdefault(m["task"], m) is None or
                  {"Inside", "Outside"} <= set(got), timeout=20)
    inside, outside = got["Inside"], got["Outside"]
    assert inside["channel"] == "error" and "cannot handle 1" in inside["text"]
    assert inside["failure"] == "task_message_failure" and "Traceback" in inside["traceback"]
    assert "cannot handle 2" in outside["text"]
    assert outside["text"].split(" in ")[1].split(";")[0] != str(daemon.pid)  # another process
    # And the log records are in the log file, debug records in the debug file, not on stdout
    wait_for_file(debug, lambda p: "debug: MultiModule: loaded task Inside" in p.read_text())
    assert "running (pid" not in daemon.output().split("--- stderr ---")[0]
    # And an alert (a failure's level change) lands in the alert file
    wait_for_file(alerts, lambda p: "alert: Inside: message_failures 1: ok -> warn"
                  in p.read_text())


def test_bad_oob_targets_and_monitor_options_are_refused_at_start(mm, tmp_path):
    mm.config(router_section())
    for args, words in [
        (("-o", "alert:.hidden"), "neither 1, 2, journal, router, a path"),
        (("-o", f"debug:{tmp_path}/no/such/dir/x.log"), "not a file in a writable directory"),
        (("-o", f"debug:{tmp_path}"), "not a file in a writable directory"),
        (("--monitor-interval", "1", "--monitor-window", "1.5"),
         "--monitor-window (1.5) must be at least twice --monitor-interval (1)"),
        (("--metrics-listen", "nowhere"), "is not ADDR:PORT"),
    ]:
        result = mm.run_daemon(*args)
        assert result.returncode == 2 and words in result.stderr, (args, result.stderr)
