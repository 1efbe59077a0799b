"""Acceptance: stat() reports the kernel's figures for a queue."""

from __future__ import annotations

import os

import pytest
import sysv_ipc

from multimodule.transit import Transit, TransitError

SENDER = """
import sys
from multimodule import transit
for i in range(3):
    transit.send(sys.argv[1], {"i": i, "pad": "p" * 100})
print("sent", flush=True)
"""


def test_stat_follows_sends_and_receives(transit, transit_dir, spawn):
    # Given a child that sent three messages
    child = spawn(SENDER, "stat-q")
    child.expect("sent")
    assert child.finish() == 0

    # When the queue is inspected
    s1 = transit.stat("stat-q")

    # Then it shows three messages, their bytes, and the child as the last sender
    assert s1.name == "stat-q" and s1.kind == "sysv"
    assert s1.messages == 3
    assert 3 * 100 < s1.bytes < 3 * 400
    assert s1.max_bytes == int(open("/proc/sys/kernel/msgmnb").read())
    assert s1.fill == pytest.approx(s1.bytes / s1.max_bytes)
    assert s1.last_send_pid == child.pid
    assert s1.last_receive_pid is None and s1.last_receive_time is None
    assert s1.last_send_time is not None
    assert s1.key == int((transit_dir / "stat-q").read_text())

    # When this process sends one more
    transit.send("stat-q", {"i": 3, "pad": "p" * 1000})
    s2 = transit.stat("stat-q")

    # Then the count and the bytes grow, and this process is the last sender
    assert s2.messages == 4
    assert s2.bytes > s1.bytes + 1000
    assert s2.last_send_pid == os.getpid()

    # When this process receives one
    transit.receive("stat-q", timeout=5)
    s3 = transit.stat("stat-q")

    # Then the count and bytes drop, and this process is the last receiver
    assert s3.messages == 3
    assert s3.bytes < s2.bytes
    assert s3.last_receive_pid == os.getpid()
    assert s3.last_receive_time is not None

    # And the bytes are exactly those of the raw messages on the queue
    raw = sysv_ipc.MessageQueue(s3.key)
    sizes = [len(raw.receive(False)[0]) for _ in range(3)]
    assert sum(sizes) == s3.bytes


def test_stat_of_unknown_name(transit, transit_dir):
    # Given a name no process has used
    # When it is inspected, Then TransitError names it, and nothing is created
    with pytest.raises(TransitError, match="never-used"):
        transit.stat("never-used")
    assert not (transit_dir / "never-used").exists()


def test_stat_sees_queues_made_by_others(transit_dir):
    # Given a queue used through one Transit
    Transit(transit_dir).send("shared-stat", {"a": 1})
    # When another Transit on the same directory inspects it, Then it sees the message
    assert Transit(transit_dir).stat("shared-stat").messages == 1


def test_stat_of_local_queue(transit):
    transit.declare_local("stat-local")
    transit.send("stat-local", {"a": 1})
    transit.send("stat-local", {"a": 2})
    st = transit.stat("stat-local")
    assert st.kind == "local" and st.messages == 2
    assert st.bytes is None and st.max_bytes is None and st.fill is None
    assert st.last_send_pid == os.getpid() and st.last_receive_pid is None
    transit.receive("stat-local", timeout=1)
    assert transit.stat("stat-local").last_receive_pid == os.getpid()


def test_send_if_exists_creates_nothing_and_delivers_large_replies_whole(transit):
    # Given no queue named "reply" / When a reply is sent to it / Then nothing is created
    assert transit.send_if_exists("reply", {"a": 1}) is False
    assert not transit.exists("reply")
    # Given the client's reply queue / When a reply larger than one System V message comes
    transit.sysv_queue("reply")
    big = {"status": {f"task{i}": {"figures": "x" * 100} for i in range(200)}}
    assert transit.send_if_exists("reply", big) is True
    # Then it arrives whole (spilled), as any message would
    assert transit.receive("reply", timeout=5)["status"] == big["status"]


def test_fills_and_queues_read_every_queue_without_creating_one(transit):
    # Given two queues, one a third full, and a name whose queue was removed
    transit.send("half", {"pad": "x" * 100})
    transit.sysv_queue("empty")
    transit.sysv_queue("gone")
    transit.remove("gone")
    fills = transit.fills()
    # Then each live queue's fill comes from the kernel, and nothing is made for "gone"
    stat = transit.stat("half")
    assert fills["half"] == pytest.approx(stat.bytes / stat.max_bytes) and fills["half"] > 0
    assert fills["empty"] == 0.0 and "gone" not in fills
    assert {s.name for s in transit.queues()} == {"half", "empty"}
    assert not transit.exists("gone")


def test_fills_open_no_queue_once_seen_and_see_a_queue_made_anew(transit, monkeypatch):
    # Given two queues the monitor has seen once
    transit.send("a", {"pad": "x" * 100})
    transit.sysv_queue("b")
    first = transit.fills()
    opened = []
    real = transit._open_existing
    monkeypatch.setattr(transit, "_open_existing", lambda name: opened.append(name) or
                        real(name))
    # When it asks again, after more was sent
    transit.send("a", {"pad": "y" * 100})
    again = transit.fills()
    # Then the fill is current, and no queue was opened to know it (one read of the kernel's
    # table and one listing of the directory, however many queues: issue 15)
    assert again["a"] > first["a"] and again["b"] == 0.0
    assert opened == []
    # And a queue removed and made anew (a new id) is looked at again
    transit.remove("b")
    transit.send("b", {"pad": "z" * 50})
    assert transit.fills()["b"] > 0 and opened == ["b"]
