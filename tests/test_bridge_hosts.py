"""The Bridge between hosts that are hosts: each its own IPC namespace (System V queues), UTS
namespace (host name) and network namespace, joined to ``nats-server`` (one node, or a
three-node cluster) through veth pairs the test makes (``tests/hosts.py``).

The fault tests count what arrives in a stateful task's state (``Tally``: the next number it
expects, numbers seen again, numbers skipped), so that a number handled twice or lost shows
whatever was killed; the state is the framework's, restored from its checkpoint and journal.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Iterator

import pytest

from hosts import Host, Network, network, require_root  # noqa: F401

WAIT_S = 60.0

ROUTED_PONG = """
from multimodule import Task

class Pong(Task):
    def message(self, message):
        message["pong"] = True
        self.emit(message)
"""

TALLY = """
from multimodule import Task

class Tally(Task):
    '''Counts numbered messages: the next expected, those seen again, those skipped.'''
    is_stateful = True

    def message(self, message):
        s = self.state
        n = message["n"]
        expected = s.get("next", 0)
        if n == expected:
            s["next"] = n + 1
        elif n < expected:
            s["again"] = s.get("again", 0) + 1
        else:
            s["skipped"] = s.get("skipped", 0) + n - expected
            s["next"] = n + 1
        s["count"] = s.get("count", 0) + 1
        if n == message["last"]:
            self.send("TallyDone", dict(s))
"""

PRODUCER = """
import sys, time
from multimodule.transit import Transit
t = Transit()
count, rate = int(sys.argv[1]), float(sys.argv[2])
start = time.monotonic()
for n in range(count):
    if rate:
        pause = start + n / rate - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    t.send("Tally", {"n": n, "last": count - 1}, destination="b")
    if n % 1000 == 999:
        print(n + 1, flush=True)
"""

STREAM_LEADER = """
import asyncio, sys
import nats

async def main():
    nc = await nats.connect(sys.argv[1:])
    info = await nc.jetstream().stream_info("MULTIMODULE")
    print(info.cluster.leader)
    await nc.close()

asyncio.run(main())
"""

RECEIVE = """
import json, sys
from multimodule.transit import Transit
message = Transit().receive(sys.argv[1], timeout=float(sys.argv[2]))
print(json.dumps(message))
"""


class HostDaemon:
    """A ``multimodule`` daemon on a host, its output in files; restartable after a kill."""

    def __init__(self, host: Host, config: str, tasks: dict[str, str] | None = None):
        self.host = host
        self.dir = host.root / "daemon"
        (self.dir / "tasks").mkdir(parents=True, exist_ok=True)
        for name, source in (tasks or {}).items():
            (self.dir / "tasks" / f"{name}.py").write_text(textwrap.dedent(source))
        (self.dir / "config.toml").write_text(textwrap.dedent(config))
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def out(self) -> Path:
        return self.dir / f"out-{self.starts}.log"

    def start(self, *extra: str) -> None:
        """Start (again), with ``extra`` arguments; wait until the Bridge is connected."""
        self.starts += 1
        self.extra = extra or getattr(self, "extra", ())
        with open(self.out, "wb") as out:
            self.proc = self.host.popen(
                sys.executable, "-m", "multimodule.cli.daemon", "-c", self.dir / "config.toml",
                "--task-path", self.dir / "tasks", "-s", self.dir / "state", *self.extra,
                stdout=out, stderr=subprocess.STDOUT)
        if "is_external = true" in (self.dir / "config.toml").read_text():
            self.wait_for("running")
            self.external_bridge_pid()
        else:
            self.wait_for("connected to NATS")

    def external_bridge_pid(self, timeout: float = WAIT_S, other_than: int | None = None
                            ) -> int:
        """The pid of the Bridge's own process once it is connected (from ``mmctl status``;
        polled: the figures come from that process's counters file)."""
        deadline = time.monotonic() + timeout
        while True:
            rows = {row["name"]: row for row in mmctl_status(self.host)["rows"]}
            row = rows.get("Bridge", {})
            if row.get("bridge_connected") == 1 and row.get("pid") not in (None, other_than):
                return row["pid"]
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.host.name}: the external Bridge is not "
                                     f"connected: {row}\n{self.output()}")
            time.sleep(0.2)

    def output(self) -> str:
        return "\n".join(f"--- start {i} ---\n" + (self.dir / f"out-{i}.log").read_text(
            errors="replace")[-3000:] for i in range(1, self.starts + 1))

    def wait_for(self, text: str, timeout: float = WAIT_S) -> None:
        """Wait until this start's output holds ``text`` (the daemon writes it line by line;
        there is no event to wait on across the namespace but the file)."""
        deadline = time.monotonic() + timeout
        while text not in self.out.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{self.host.name}: no {text!r} in the daemon's output "
                                     f"(exit status {self.proc.poll()}):\n{self.output()}")
            time.sleep(0.05)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@contextlib.contextmanager
def running(*daemons: HostDaemon, extra: tuple[str, ...] = ()) -> Iterator[None]:
    """Start ``daemons`` (with ``extra`` arguments) in order; stop every one at the end."""
    try:
        for daemon in daemons:
            daemon.start(*extra)
        yield
    finally:
        for daemon in daemons:
            daemon.stop()


def receive(host: Host, qname: str, timeout: float = WAIT_S) -> dict:
    """The next message of ``qname`` on ``host``'s own System V queues."""
    result = host.python(RECEIVE, qname, timeout, timeout=timeout + 30)
    return json.loads(result.stdout)


def bridge_table(urls: list[str], **extra: object) -> str:
    more = "".join(f"{key} = {json.dumps(value)}\n" for key, value in extra.items())
    return f"[Bridge]\nservers = {json.dumps(urls)}\n{more}"


def test_a_message_goes_a_to_b_and_back_through_the_routers(network):
    a, b = network.add_host("a"), network.add_host("b")
    nats = network.start_nats()
    # Given host a, whose Router sends Ping's messages to Pong on host b, and host b, whose
    # Router sends Pong's back to queue Back on host a
    daemon_a = HostDaemon(a, bridge_table(nats.urls_for(a)) + textwrap.dedent("""
        [Router]
        routes = [
          { match = { source = "Ping" }, forwards = [ { qname = "Pong", destination = "b" } ] },
          { match = { source = "Pong" }, forwards = [ { qname = "Back" } ] } ]
        """))
    daemon_b = HostDaemon(b, bridge_table(nats.urls_for(b)) + textwrap.dedent("""
        [Router]
        routes = [
          { match = { source = "Pong" }, forwards = [ { qname = "Router", destination = "a" } ] } ]
        [Pong]
        """), {"Pong": ROUTED_PONG})
    with running(daemon_a, daemon_b):
        # When a message from "Ping" enters a's Router
        a.python("from multimodule.transit import Transit\n"
                 "Transit().send('Router', {'source': 'Ping', 'n': 1}, id='ping-1')")
        # Then it comes back to a through b, with its id, its origin and its route
        back = receive(a, "Back")
        meta = back.pop(".ipc_transit_meta")
        assert back["n"] == 1 and back["pong"] is True and back["source"] == "Pong"
        assert meta["id"] == "ping-1"
        assert meta["source_hostname"] == "a"
        assert meta["route"] == ["a", "b", "a"]
        # And queue Pong exists on b only (each host its own System V queues)
        assert "Pong" not in a.run("ls", a.root / "transit").stdout


def test_tls_with_client_certificates(network):
    require_root(tls=True)
    a, b = network.add_host("a"), network.add_host("b")
    nats = network.start_nats(tls=True)
    tls = {"ca": str(nats.ca), "cert": str(nats.client_cert), "key": str(nats.client_key)}
    daemons = [HostDaemon(h, bridge_table(nats.urls_for(h), **tls)) for h in (a, b)]
    with running(*daemons):
        a.python("from multimodule.transit import Transit\n"
                 "Transit().send('Inbox', {'secret': 'over TLS'}, destination='b')")
        assert receive(b, "Inbox")["secret"] == "over TLS"
        assert all(url.startswith("tls://") for url in nats.urls_for(a))


def tally_hosts(network: Network, *, cluster_size: int = 1, replicas: int = 1,
                external: bool = False):
    """Hosts a (a producer process sends to Tally on b) and b (Tally), a NATS cluster;
    ``external``: each Bridge in its own process."""
    a, b = network.add_host("a"), network.add_host("b")
    nats = network.start_nats(cluster_size=cluster_size)
    more = {"is_external": True} if external else {}
    # An external Bridge hands messages to Tally over its System V queue; one that waits for
    # room there when the Bridge is killed may come again (docs/bridge.md): Tally drops it by
    # id, and the test reports how many it dropped.
    tally = "[Tally]\n" + ("dedupe = true\n" if external else "")
    daemon_a = HostDaemon(a, bridge_table(nats.urls_for(a), replicas=replicas, **more))
    daemon_b = HostDaemon(b, bridge_table(nats.urls_for(b), replicas=replicas, **more)
                          + tally, {"Tally": TALLY})
    return a, b, nats, daemon_a, daemon_b


def produce(a: Host, count: int, rate: float = 0) -> subprocess.Popen:
    return a.popen(sys.executable, "-c", PRODUCER, count, rate, stdout=subprocess.PIPE,
                   text=True)


def sent_at_least(producer: subprocess.Popen, n: int) -> None:
    """Wait until the producer says it sent ``n`` messages (it prints every 1,000)."""
    for line in producer.stdout:
        if int(line) >= n:
            return
    raise AssertionError(f"the producer ended before {n} messages (status {producer.wait()})")


def mmctl_status(host: Host) -> dict:
    status = host.run(sys.executable, "-m", "multimodule.cli.mmctl", "status", "--json")
    return json.loads(status.stdout)


def bridge_figures(host: Host) -> dict:
    """The Bridge's figures on ``host`` (``mmctl status --json``)."""
    figures = mmctl_status(host)["tasks"]["Bridge"]
    return {k: v for k, v in figures.items() if k.startswith("bridge_")}


def summary(done: dict) -> str:
    return (f"handled {done.get('count')}, next {done.get('next')}, delivered twice "
            f"{done.get('again', 0)}, lost or out of order {done.get('skipped', 0)}")


def assert_tally(done: dict, count: int) -> None:
    assert done.get("again", 0) == 0, f"delivered twice: {done}"
    assert done.get("skipped", 0) == 0, f"lost or out of order: {done}"
    assert done["next"] == count, done


@pytest.mark.slow
def test_100000_messages_with_either_side_killed_9_three_times(network):
    count = 100_000
    a, b, nats, daemon_a, daemon_b = tally_hosts(network)
    with running(daemon_a, daemon_b):
        producer = produce(a, count)
        # kill -9 of b's daemon (its Bridge and Tally), then a's (its Bridge, with messages
        # on its way), then b's again; each restarted at once, as systemd would
        recovery = []
        for at, daemon in ((20_000, daemon_b), (45_000, daemon_a), (70_000, daemon_b)):
            sent_at_least(producer, at)
            daemon.kill9()
            killed = time.monotonic()
            daemon.start()
            recovery.append(round(time.monotonic() - killed, 2))
        done = receive(b, "TallyDone", timeout=300)
        assert producer.wait(60) == 0
        print(f"daemons killed -9: tally {summary(done)}, seconds from kill to the Bridge "
              f"connected again {recovery}, b's bridge {bridge_figures(b)}")
        assert_tally(done, count)


@pytest.mark.slow
def test_external_bridges_killed_9_three_times(network):
    count = 30_000
    a, b, nats, daemon_a, daemon_b = tally_hosts(network, external=True)
    with running(daemon_a, daemon_b, extra=("--task-backend", "detached")):
        producer = produce(a, count)
        recovery = []
        # kill -9 of b's Bridge process, a's, then b's again; their daemons start them again
        for at, daemon in ((6_000, daemon_b), (14_000, daemon_a), (22_000, daemon_b)):
            sent_at_least(producer, at)
            pid = daemon.external_bridge_pid()
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            daemon.external_bridge_pid(other_than=pid)
            recovery.append(round(time.monotonic() - killed, 2))
        done = receive(b, "TallyDone", timeout=300)
        assert producer.wait(60) == 0
        dropped = mmctl_status(b)["tasks"]["Tally"]["duplicates_dropped"]
        print(f"external Bridges killed -9: tally {summary(done)}, dropped by Tally's dedupe "
              f"{dropped}, seconds from kill to the new process connected {recovery}")
        assert_tally(done, count)


@pytest.mark.slow
def test_one_nats_node_of_three_killed_mid_stream(network):
    count = 20_000
    a, b, nats, daemon_a, daemon_b = tally_hosts(network, cluster_size=3, replicas=3)
    with running(daemon_a, daemon_b):
        producer = produce(a, count)
        sent_at_least(producer, 5_000)
        # The node leading the stream: its loss forces an election mid-stream
        leader = a.python(STREAM_LEADER, *nats.urls_for(a)).stdout.strip()
        victim = int(leader.removeprefix("n")) - 1
        nats.kill(victim)
        sent_at_least(producer, 12_000)
        nats.start(victim)
        done = receive(b, "TallyDone", timeout=300)
        assert producer.wait(60) == 0
        print(f"the stream's leader ({leader}) of three NATS nodes killed: tally "
              f"{summary(done)}, a's bridge {bridge_figures(a)}, b's {bridge_figures(b)}")
        assert_tally(done, count)


@pytest.mark.slow
def test_host_b_cut_off_for_30_s_then_everything_arrives(network):
    count = 6_000
    a, b, nats, daemon_a, daemon_b = tally_hosts(network)
    with running(daemon_a, daemon_b):
        producer = produce(a, count, rate=100)   # a minute of traffic
        sent_at_least(producer, 1_000)
        b.link_down()
        cut = time.monotonic()
        daemon_b.wait_for("lost the connection to NATS", timeout=40)
        time.sleep(max(0.0, 30 - (time.monotonic() - cut)))  # the outage itself: 30 s
        b.link_up()
        daemon_b.wait_for("reconnected to NATS", timeout=60)
        done = receive(b, "TallyDone", timeout=300)
        assert producer.wait(60) == 0
        figures = bridge_figures(b)
        print(f"link down 30 s: tally {summary(done)}, b's bridge {figures}")
        assert figures["bridge_reconnects"] >= 1
        assert_tally(done, count)
