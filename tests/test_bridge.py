"""The Bridge between two daemons (two "hosts": each its own transit and state directories and
``$MULTIMODULE_HOSTNAME``) through a real ``nats-server`` with JetStream on loopback.

What needs hosts with their own System V queues, links and a NATS cluster is in
``test_bridge_hosts.py``.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from multimodule.config import redact
from multimodule.tasks.Bridge import escape_token, message_id_for, unescape_token
from multimodule.transit import META_KEY
from natsserver import NatsServer, free_port, nats_server, two_hosts  # noqa: F401

#: Slow (two daemons and a real nats-server, streams over many seconds): run by CI, left out by
#: ``-m "not slow"``.
pytestmark = pytest.mark.slow

WAIT_S = 30.0


def start(host, url: str, extra: str = "", bridge: str = "") -> None:
    host.config(url, extra, bridge)
    daemon = host.mm.start()
    daemon.expect("stdout", "connected to NATS", timeout=WAIT_S)


def test_a_message_crosses_with_its_id_origin_and_route(nats_server, two_hosts):
    a, b = two_hosts["a"], two_hosts["b"]
    start(a, nats_server.url)
    start(b, nats_server.url)
    # When a process on host A sends to queue "Out" on host B
    a.transit.send("Out", {"n": 1, "text": "héllo"}, destination="hostB", id="msg-1")
    # Then it arrives on B's queue "Out" whole, with its id and origin, and its route
    got = b.transit.receive("Out", timeout=WAIT_S)
    meta = got.pop(META_KEY)
    assert got == {"n": 1, "text": "héllo"}
    assert meta["id"] == "msg-1"
    assert meta["source_hostname"] == socket.gethostname()  # the sending process's host
    assert meta["route"] == [socket.gethostname(), "hostb"]  # host names without case
    # And A's queue "Out" never existed, and A's Bridge counts it as published
    assert not a.transit.exists("Out")
    status = json.loads(a.mmctl("status", "--json").stdout)
    figures = status["tasks"]["Bridge"]
    assert figures["bridge_published"] == 1 and figures["bridge_connected"] == 1
    # And mmctl status says so in words, on both hosts
    assert "bridge Bridge: connected; published 1, delivered 0" in a.mmctl("status").stdout
    assert "published 0, delivered 1" in b.mmctl("status").stdout


def test_order_is_kept_per_queue_and_a_queue_name_with_dots_stars_spaces_and_unicode(
        nats_server, two_hosts):
    a, b = two_hosts["a"], two_hosts["b"]
    start(a, nats_server.url)
    start(b, nats_server.url)
    odd = "orders.eu *> spaced ünïcode %41"
    for n in range(200):
        a.transit.send(odd, {"n": n}, destination="hostB")
    got = [b.transit.receive(odd, timeout=WAIT_S)["n"] for _ in range(200)]
    assert got == list(range(200))


def test_a_message_larger_than_max_payload_crosses_whole_through_the_object_store(
        tmp_path, two_hosts):
    server = NatsServer(tmp_path / "nats-small", max_payload=256 * 1024).start()
    try:
        a, b = two_hosts["a"], two_hosts["b"]
        start(a, server.url)
        start(b, server.url)
        # A 5 MiB message (20 times the server's max_payload), and a small one after it
        big = {"blob": "x" * (5 << 20), "n": 1}
        a.transit.send("Big", big, destination="hostB")
        a.transit.send("Big", {"n": 2}, destination="hostB")
        got = b.transit.receive("Big", timeout=WAIT_S)
        assert got["n"] == 1 and got["blob"] == big["blob"]
        assert b.transit.receive("Big", timeout=WAIT_S)["n"] == 2
    finally:
        server.stop()


def test_a_message_over_max_message_bytes_is_refused_with_a_clear_error(
        nats_server, two_hosts):
    a, b = two_hosts["a"], two_hosts["b"]
    start(a, nats_server.url, bridge="max_message_bytes = 100000")
    start(b, nats_server.url)
    daemon = a.mm.daemons[0]
    # When a message of about 200 kB and then a small one are sent to host B
    a.transit.send("Out", {"blob": "y" * 200_000}, destination="hostB")
    a.transit.send("Out", {"n": 2}, destination="hostB")
    # Then the large one is reported on A, naming the limit; the small one arrives
    daemon.expect("stderr", "over the bridge's max_message_bytes (100000 bytes)",
                  timeout=WAIT_S)
    assert b.transit.receive("Out", timeout=WAIT_S)["n"] == 2
    status = json.loads(a.mmctl("status", "--json").stdout)
    assert status["tasks"]["Bridge"]["bridge_refused"] == 1


def test_servers_away_at_start_then_up_the_bridge_connects_and_delivers(tmp_path, two_hosts):
    a, b = two_hosts["a"], two_hosts["b"]
    port = free_port()
    server = NatsServer(tmp_path / "nats-late", port=port)
    a.config(server.url)
    b.config(server.url)
    daemon_a = a.mm.start()
    daemon_b = b.mm.start()
    # While no server runs, A says so on the alert channel, and a send waits
    daemon_a.expect("stderr", "cannot reach the NATS servers", timeout=WAIT_S)
    a.transit.send("Out", {"n": 1}, destination="hostB")
    try:
        server.start()
        # Then both connect and the message waiting on A arrives on B
        daemon_a.expect("stderr", "NATS servers reached again", timeout=WAIT_S)
        daemon_b.expect("stdout", "connected to NATS", timeout=WAIT_S)
        assert b.transit.receive("Out", timeout=WAIT_S)["n"] == 1
    finally:
        server.stop()


def test_a_server_restart_loses_nothing_and_the_alerts_say_so(tmp_path, two_hosts):
    a, b = two_hosts["a"], two_hosts["b"]
    server = NatsServer(tmp_path / "nats-restart").start()
    try:
        start(a, server.url)
        start(b, server.url)
        daemon_a = a.mm.daemons[0]
        for n in range(50):
            a.transit.send("Out", {"n": n}, destination="hostB")
        assert [b.transit.receive("Out", timeout=WAIT_S)["n"] for _ in range(50)] \
            == list(range(50))
        # When the server stops, messages are sent meanwhile, and it starts again
        server.stop()
        daemon_a.expect("stderr", "lost the connection to NATS", timeout=WAIT_S)
        for n in range(50, 100):
            a.transit.send("Out", {"n": n}, destination="hostB")
        server.start()
        daemon_a.expect("stderr", "reconnected to NATS", timeout=WAIT_S)
        # Then everything arrives, in order, once (the pull consumer was made again)
        assert [b.transit.receive("Out", timeout=WAIT_S)["n"] for _ in range(50)] \
            == list(range(50, 100))
        status = json.loads(b.mmctl("status", "--json").stdout)
        assert status["tasks"]["Bridge"]["bridge_delivered"] == 100
    finally:
        server.stop()


FLOOD = """
from multimodule import Task

class Flood(Task):
    def message(self, message):
        self.send("Out", {"n": message["n"]}, destination="hostB")
"""

HELD_BACK_PRODUCER = """
import sys
from multimodule.errors import QueueFull
from multimodule.transit import Transit
t = Transit(sys.argv[1])
held = False
for n in range(int(sys.argv[2])):
    while True:
        try:
            t.send("Flood", {"n": n}, timeout=2)
            break
        except QueueFull:
            if not held:
                print("held back at", n, flush=True)
                held = True
print("sent all", flush=True)
"""


def test_servers_away_hold_senders_in_the_daemon_back_and_memory_stays_bounded(
        tmp_path, two_hosts, spawn):
    a, b = two_hosts["a"], two_hosts["b"]
    server = NatsServer(tmp_path / "nats-away")
    a.mm.task("Flood", FLOOD)
    a.config(server.url, "[Flood]\n")
    b.config(server.url)
    daemon_a = a.mm.start()
    b.mm.start()
    count = 20_000
    try:
        # Given the NATS servers away, and a producer sending to Flood on host a, which sends
        # each message on to host b (through a's Bridge, in the same daemon)
        daemon_a.expect("stderr", "cannot reach the NATS servers", timeout=WAIT_S)
        producer = spawn(HELD_BACK_PRODUCER, a.transit.path, count)
        # Then the producer is held back (Bridge stalled -> its System V queue -> Flood
        # paused -> Flood's queue full) long before it sent everything
        line = producer.readline(timeout=WAIT_S)
        assert line.startswith("held back at"), line
        held_at = int(line.split()[-1])
        assert held_at < count // 2
        # And the Bridge holds at most about its high-water mark in memory
        status = json.loads(a.mmctl("status", "--json").stdout)
        assert status["tasks"]["Bridge"]["queue_depth"] <= 1024 + 256, status["tasks"]
        # When the servers come: everything arrives on b, once, in order
        server.start()
        got = [b.transit.receive("Out", timeout=WAIT_S)["n"] for _ in range(count)]
        assert got == list(range(count))
        assert producer.readline(timeout=WAIT_S).startswith("sent all")
    finally:
        server.stop()


def test_a_new_servers_list_in_the_config_is_applied_without_a_restart(tmp_path, two_hosts):
    first = NatsServer(tmp_path / "nats-1").start()
    second = NatsServer(tmp_path / "nats-2").start()
    try:
        a, b = two_hosts["a"], two_hosts["b"]
        start(a, first.url)
        start(b, second.url)
        daemon_a = a.mm.daemons[0]
        # When a's config is changed to b's server (the daemon re-reads it)
        a.mm.config(f'[Bridge]\nservers = ["{second.url}"]\n', atomic=True)
        daemon_a.expect("stdout", f"connected to NATS ({second.url})", timeout=WAIT_S)
        # Then a's sends reach b through it
        a.transit.send("Out", {"n": 1}, destination="hostB")
        assert b.transit.receive("Out", timeout=WAIT_S)["n"] == 1
    finally:
        first.stop()
        second.stop()


def test_a_kill_while_the_destination_queue_is_full_delivers_nothing_twice(
        nats_server, two_hosts):
    a, b = two_hosts["a"], two_hosts["b"]
    start(a, nats_server.url)
    b.config(nats_server.url)
    count = 2000
    # Given 2,000 messages waiting in the stream for host b's queue Inbox, nobody reading it
    for n in range(count):
        a.transit.send("Inbox", {"n": n}, destination="hostB")
    daemon_b = b.mm.start()
    daemon_b.expect("stdout", "connected to NATS", timeout=WAIT_S)
    # When b's Bridge has filled Inbox (its next message waits for room) and b is killed -9
    deadline = time.monotonic() + WAIT_S
    while not (b.transit.exists("Inbox") and b.transit.stat("Inbox").messages >= 100
               and json.loads(b.mmctl("status", "--json").stdout)["outboxes"]):
        assert time.monotonic() < deadline, "b's Bridge never filled Inbox"
        time.sleep(0.05)
    daemon_b.proc.kill()
    daemon_b.wait_exit()
    b.mm.start().expect("stdout", "connected to NATS", timeout=WAIT_S)
    # Then Inbox gets each of the 2,000 once, in order
    got = [b.transit.receive("Inbox", timeout=WAIT_S)["n"] for _ in range(count)]
    assert got == list(range(count))
    assert b.transit.stat("Inbox").messages == 0


@pytest.mark.parametrize("table, field", [
    ("replicas = 2", "Bridge.replicas"),
    ('servers = ["http://example.invalid"]', "Bridge.servers"),
    ('stream = "a.b"', "Bridge.stream"),
    ('host = "two words"', "Bridge.host"),
    ('cert = "{config}"', "cert and key go together"),
    ('ca = "missing.pem"', "Bridge.ca"),
    ('credentials = "missing.creds"', "Bridge.credentials"),
    ('servers = ["nats://127.0.0.1:99999"]', "Bridge.servers"),
    ("replicas = true", "Bridge.replicas"),
    ("max_age_s = inf", "Bridge.max_age_s"),
    ("batchh = 3", "Bridge.batchh"),
])
def test_a_bad_bridge_config_is_refused_naming_the_field(mm, table, field):
    mm.config(f"[Bridge]\n{table.format(config=mm.config_path)}\n")
    result = mm.run_daemon()
    assert result.returncode != 0
    assert field in result.stderr, result.stderr


def test_a_password_in_a_server_url_never_shows(nats_server, two_hosts, mm):
    a = two_hosts["a"]
    url = nats_server.url.replace("nats://", "nats://user:s3cret@")
    a.config(url)
    daemon = a.mm.start()
    line = daemon.expect("stdout", "connected to NATS", timeout=WAIT_S)
    assert "user:***@" in line
    # Not in the status, the config the daemon shows, nor the daemon's output
    shown = [a.mmctl("status", "--json").stdout, a.mmctl("status").stdout,
             a.mmctl("config", "Bridge").stdout, daemon.output()]
    assert "s3cret" not in "".join(shown)
    assert "user:***@" in shown[2]
    # Nor in the error a bad config gets
    mm.config(f'[Bridge]\nservers = ["{url}", "ftp://x"]\ncert = "{mm.config_path}"\n')
    result = mm.run_daemon()
    assert result.returncode != 0 and "Bridge.servers" in result.stderr
    assert "s3cret" not in result.stderr, result.stderr
    assert redact(url) == url.replace("s3cret", "***")
    assert redact({"token": "t0k", "urls": ["nats://t0k@h"]}) == {"token": "***",
                                                                  "urls": ["nats://***@h"]}


@pytest.mark.parametrize("text", ["plain", "a.b", "*", ">", "sp ace", "tab\t", "ünï", "%41",
                                  "-_~", ""])
def test_subject_tokens_are_reversible_and_never_hold_separators(text):
    token = escape_token(text)
    assert unescape_token(token) == text
    assert not any(c in token for c in ".*> \t") and token.isascii()


def test_the_publish_id_differs_per_destination_and_is_stable():
    assert message_id_for("m1", "mm.S.b.q") == message_id_for("m1", "mm.S.b.q")
    assert message_id_for("m1", "mm.S.b.q") != message_id_for("m1", "mm.S.c.q")
