"""Self-test of tests/hosts.py: simulated hosts (own hostname, System V queues and network) and
NATS JetStream servers in the hub, reached through each host's veth."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import textwrap
import time

import pytest

import hosts
from hosts import Network, require_root
from hosts import network  # noqa: F401

#: Slow (network namespaces and NATS clusters made and removed): run by CI, left out by
#: ``-m "not slow"``.
pytestmark = pytest.mark.slow

#: Connects once (or, with "until-ok", retries until connected within the timeout) and prints
#: "ok" or "error <ExceptionName> <message>". argv: urls (JSON), timeout s, mode, [tls JSON].
CONNECT = """
    import asyncio, json, ssl, sys, time, nats
    urls, timeout, mode = json.loads(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    tls_files = json.loads(sys.argv[4]) if len(sys.argv) > 4 else None

    async def quiet(e):
        pass

    async def attempt():
        tls = None
        if tls_files:
            tls = ssl.create_default_context(cafile=tls_files["ca"])
            if tls_files.get("cert"):
                tls.load_cert_chain(tls_files["cert"], tls_files["key"])
        # nats-py: max_reconnect_attempts=0 means unlimited, even for the first connect; with
        # 1 it tries each server twice, reconnect_time_wait apart, then NoServersError.
        nc = await nats.connect(urls, connect_timeout=timeout, allow_reconnect=False,
                                max_reconnect_attempts=1, reconnect_time_wait=0.1, tls=tls,
                                error_cb=quiet)
        try:
            await nc.flush(timeout=timeout)
        finally:
            await nc.close()

    deadline = time.monotonic() + timeout
    while True:
        try:
            asyncio.run(asyncio.wait_for(attempt(), 3 * timeout + 1))
            print("ok")
            break
        except Exception as e:
            if mode != "until-ok" or time.monotonic() > deadline:
                print("error", type(e).__name__, e)
                break
        time.sleep(0.1)
"""

#: Creates stream T (subjects t.>) and publishes argv[2] to t.1; prints the ack as JSON.
PUBLISH = """
    import asyncio, json, ssl, sys, nats
    urls, payload = json.loads(sys.argv[1]), sys.argv[2]
    tls_files = json.loads(sys.argv[3]) if len(sys.argv) > 3 else None

    async def main():
        tls = None
        if tls_files:
            tls = ssl.create_default_context(cafile=tls_files["ca"])
            tls.load_cert_chain(tls_files["cert"], tls_files["key"])
        nc = await nats.connect(urls, connect_timeout=5, allow_reconnect=False, tls=tls)
        js = nc.jetstream(timeout=5)
        await js.add_stream(name="T", subjects=["t.>"])
        ack = await js.publish("t.1", payload.encode())
        print(json.dumps({"stream": ack.stream, "seq": ack.seq}))
        await nc.close()

    asyncio.run(main())
"""

#: Reads one message of stream T with a pull consumer; prints it as JSON with the hostname.
FETCH = """
    import asyncio, json, socket, sys, nats

    async def main():
        nc = await nats.connect(json.loads(sys.argv[1]), connect_timeout=5, allow_reconnect=False)
        js = nc.jetstream(timeout=5)
        sub = await js.pull_subscribe("t.1", durable="reader", stream="T")
        [msg] = await sub.fetch(1, timeout=5)
        await msg.ack()
        print(json.dumps({"data": msg.data.decode(), "seq": msg.metadata.sequence.stream,
                          "hostname": socket.gethostname()}))
        await nc.close()

    asyncio.run(main())
"""

#: Stays connected to a 3-node cluster: makes stream R (3 replicas), publishes "before", prints
#: the stream's leader, waits for a line on stdin, publishes "after" (retrying with the same
#: message id until 30 s pass) and prints the stream's state. argv: urls (JSON).
SURVIVOR = """
    import asyncio, json, sys, time, nats

    async def quiet(e):
        pass

    async def retry(what, deadline):
        while True:
            try:
                return await what()
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)

    async def main():
        nc = await nats.connect(json.loads(sys.argv[1]), connect_timeout=2,
                                reconnect_time_wait=0.2, max_reconnect_attempts=-1,
                                error_cb=quiet)
        js = nc.jetstream(timeout=2)
        deadline = time.monotonic() + 30
        await retry(lambda: js.add_stream(name="R", subjects=["r.>"], num_replicas=3), deadline)
        ack = await retry(lambda: js.publish("r.1", b"before", headers={"Nats-Msg-Id": "b"}),
                          deadline)
        while True:  # until the leader reports both followers
            info = await retry(lambda: js.stream_info("R"), deadline)
            if len(info.cluster.replicas or []) == 2 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        print(json.dumps({"seq": ack.seq, "leader": info.cluster.leader,
                          "replicas": [r.name for r in info.cluster.replicas or []]}),
              flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        started = time.monotonic()
        deadline = started + 30
        ack = await retry(lambda: js.publish("r.1", b"after", headers={"Nats-Msg-Id": "a"}),
                          deadline)
        elapsed = time.monotonic() - started
        info = await retry(lambda: js.stream_info("R"), deadline)
        print(json.dumps({"seq": ack.seq, "leader": info.cluster.leader,
                          "messages": info.state.messages, "seconds": elapsed}), flush=True)
        await nc.close()

    asyncio.run(main())
"""

#: Polls stream R's info until it has 2 replicas besides the leader, all current and online.
R_HEALED = """
    import asyncio, json, sys, time, nats

    async def main():
        nc = await nats.connect(json.loads(sys.argv[1]), connect_timeout=2)
        js = nc.jetstream(timeout=2)
        deadline = time.monotonic() + 30
        info = None
        while True:
            try:
                info = await js.stream_info("R")
                peers = info.cluster.replicas or []
                if len(peers) == 2 and all(p.current and not p.offline for p in peers):
                    break
            except Exception:
                pass
            if time.monotonic() > deadline:
                sys.exit(f"stream R not healed within 30 s: {info}")
            await asyncio.sleep(0.1)
        print(json.dumps({"leader": info.cluster.leader, "messages": info.state.messages}))
        await nc.close()

    asyncio.run(main())
"""


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    """One line of ``proc``'s stdout (binary pipe), waiting at most ``timeout`` seconds."""
    fd = proc.stdout.fileno()
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise AssertionError(f"no line from pid {proc.pid} within {timeout} s: {data!r}")
        chunk = os.read(fd, 1)
        if not chunk:
            raise AssertionError(f"pid {proc.pid} closed stdout (status {proc.poll()}): {data!r}")
        data += chunk
    return data.decode()


def _dead(pid: int) -> bool:
    """Whether process ``pid`` has exited (gone, or a zombie not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_require_root_skips_locally_and_fails_on_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require_root()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        require_root()


def test_hosts_have_own_hostname_network_and_sysv_queues(network: Network) -> None:
    require_root()
    a, b = network.add_host("a"), network.add_host("b")

    assert a.run("hostname").stdout.strip() == "a"
    assert b.run("hostname").stdout.strip() == "b"
    assert b.python("import os; print(os.environ['MULTIMODULE_HOSTNAME'])").stdout == "b\n"
    assert a.env["MULTIMODULE_TRANSIT_DIR"] == str(a.root / "transit")
    assert a.root.stat().st_mode & 0o777 == 0o700
    assert (a.address, a.hub_address, b.address) == ("10.213.1.2", "10.213.1.1", "10.213.2.2")
    assert f"{b.address}/24" in b.run("ip", "-br", "addr", "show", "eth0").stdout
    assert a.address not in b.run("ip", "-br", "addr").stdout

    a.python("import sysv_ipc; q = sysv_ipc.MessageQueue(4242, sysv_ipc.IPC_CREX); q.send(b'x')")
    # B (another IPC namespace) does not see it...
    b.python("""
        import sysv_ipc
        try:
            sysv_ipc.MessageQueue(4242)
        except sysv_ipc.ExistentialError:
            pass
        else:
            raise SystemExit("queue 4242 visible in host b")
    """)
    # ...nor does the test's own (root) namespace...
    import sysv_ipc

    with pytest.raises(sysv_ipc.ExistentialError):
        sysv_ipc.MessageQueue(4242)
    # ...while in A it outlives the process that made it.
    out = a.python("import sysv_ipc; print(sysv_ipc.MessageQueue(4242).current_messages)")
    assert out.stdout == "1\n"


def test_jetstream_between_hosts_and_link_down(network: Network) -> None:
    require_root()
    a, b = network.add_host("a"), network.add_host("b")
    cluster = network.start_nats()
    assert cluster.urls_for(a) == ["nats://10.213.1.1:4222"]
    assert cluster.urls_for(b) == ["nats://10.213.2.1:4222"]

    ack = json.loads(a.python(PUBLISH, json.dumps(cluster.urls_for(a)), "hello").stdout)
    assert ack == {"stream": "T", "seq": 1}
    got = json.loads(b.python(FETCH, json.dumps(cluster.urls_for(b))).stdout)
    assert got == {"data": "hello", "seq": 1, "hostname": "b"}

    urls = json.dumps(cluster.urls_for(a))
    a.link_down()
    t0 = time.monotonic()
    assert a.python(CONNECT, urls, "1", "once").stdout.startswith("error")
    assert time.monotonic() - t0 < 5
    assert b.python(CONNECT, json.dumps(cluster.urls_for(b)), "2", "once").stdout == "ok\n"
    a.link_up()
    assert a.python(CONNECT, urls, "10", "until-ok").stdout == "ok\n"

    # Only the hub end down: the host still has its route, the connect times out.
    a.link_down(hub_side_only=True)
    assert a.python(CONNECT, urls, "0.5", "once").stdout.startswith("error")
    a.link_up()
    assert a.python(CONNECT, urls, "10", "until-ok").stdout == "ok\n"


def test_tls_requires_a_client_certificate(network: Network) -> None:
    require_root(tls=True)
    a = network.add_host("a")
    cluster = network.start_nats(tls=True)
    urls = cluster.urls_for(a)
    assert urls == ["tls://10.213.1.1:4222"]
    files = {"ca": str(cluster.ca), "cert": str(cluster.client_cert),
             "key": str(cluster.client_key)}

    ack = json.loads(a.python(PUBLISH, json.dumps(urls), "secret", json.dumps(files)).stdout)
    assert ack == {"stream": "T", "seq": 1}

    no_cert = json.dumps({"ca": str(cluster.ca)})
    out = a.python(CONNECT, json.dumps(urls), "3", "once", no_cert).stdout
    # The client sees an SSLError or a broken pipe, depending on timing; the server says why.
    assert out.startswith("error"), out
    assert "client didn't provide a certificate" in cluster.log(0)
    # The same client with its certificate gets in (the refusal was about the certificate).
    assert a.python(CONNECT, json.dumps(urls), "3", "once", json.dumps(files)).stdout == "ok\n"


def test_cluster_keeps_accepting_publishes_after_a_node_is_killed(network: Network) -> None:
    require_root()
    a, b = network.add_host("a"), network.add_host("b")
    cluster = network.start_nats(cluster_size=3)
    assert cluster.urls_for(a) == [f"nats://10.213.1.1:{p}" for p in (4222, 4223, 4224)]

    proc = a.popen(sys.executable, "-c", textwrap.dedent(SURVIVOR),
                   json.dumps(cluster.urls_for(a)), stdin=subprocess.PIPE,
                   stdout=subprocess.PIPE)
    before = json.loads(_readline(proc, 40))
    assert before["seq"] == 1 and len(before["replicas"]) == 2
    # Kill the node leading the stream, so that a new leader must be elected.
    victim = int(before["leader"].removeprefix("n")) - 1
    cluster.kill(victim)
    assert cluster.nodes[victim] is None
    proc.stdin.write(b"go\n")
    proc.stdin.flush()
    after = json.loads(_readline(proc, 40))
    assert proc.wait(timeout=10) == 0
    assert after["seq"] == 2 and after["messages"] == 2
    assert after["leader"] != before["leader"]

    cluster.start(victim)
    healed = json.loads(b.python(R_HEALED, json.dumps(cluster.urls_for(b))).stdout)
    assert healed["messages"] == 2


def test_close_leaves_nothing_behind(network: Network) -> None:
    require_root()
    a = network.add_host("a")
    network.start_nats()
    a.python("import sysv_ipc; sysv_ipc.MessageQueue(4242, sysv_ipc.IPC_CREX).send(b'x')")
    sleeper = a.popen("sleep", "300")
    # A daemon that leaves its process group (setsid) must be found through its namespaces.
    daemon = int(a.run("sh", "-c", "setsid sleep 301 </dev/null >/dev/null 2>&1 & echo $!").stdout)
    deadline = time.monotonic() + 10
    while os.getsid(daemon) != daemon:
        assert time.monotonic() < deadline, "the daemon did not start its own session"
        time.sleep(0.01)
    ipc = hosts._ns_inode(a.anchor.pid, "ipc")
    members = set(network.processes())
    assert {a.anchor.pid, sleeper.pid, daemon} <= members
    assert len(members) == 4  # + the nats-server in the hub

    network.close()

    assert sleeper.returncode == -9
    assert _dead(daemon)  # killed (init reaps it in its own time)
    assert network.processes() == []
    assert hosts._pids_in_namespaces({"ipc": {ipc}}) == []
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert network.tag not in names
    # Nothing pins A's IPC namespace any more (no process, no nsfs mount), so the kernel has
    # freed it, and its System V queues with it.
    with open("/proc/self/mountinfo") as f:
        assert f"ipc:[{ipc}]" not in f.read()
    network.close()  # idempotent
