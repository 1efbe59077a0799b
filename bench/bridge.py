"""One-way throughput and latency from host A to host B through two Bridges and NATS JetStream.

Starts a throwaway `nats-server -js` on loopback and, in the same run:
- raw: one nats-py client publishes N messages to a JetStream stream, awaiting each ack (as
  the Bridge does), while a pull consumer in the same process fetches them in batches;
- ours: two daemons ("hosts" A and B: their own transit and state directories and
  $MULTIMODULE_HOSTNAME), each with a Bridge; a producer process on A sends N messages with
  `transit.send(..., destination="B")`, a consumer on B receives them from its System V queue.

Each message carries its send time; latency is receive time minus send time (one clock).
Prints throughput (msg/s, first send to last receive) and p50/p99 latency for both, and the
ratios against the goals (throughput at least 0.5 of raw, p50 within 2x of raw).
Run: .venv/bin/python bench/bridge.py [--count N] [--rounds R]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from multimodule.transit import Transit

REPO = Path(__file__).resolve().parent.parent

PRODUCER = """
import sys, time
from multimodule.transit import Transit
t = Transit(sys.argv[1])
count, rate = int(sys.argv[2]), float(sys.argv[3])
start = time.monotonic()
for n in range(count):
    if rate:
        pause = start + n / rate - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    t.send("Sink", {"n": n, "t": time.time()}, destination="B")
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def wait_jetstream(url: str) -> None:
    import nats

    deadline = time.monotonic() + 20
    while True:
        try:
            nc = await nats.connect(url, allow_reconnect=False, connect_timeout=1)
            await nc.jetstream().account_info()
            await nc.close()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def raw_round(url: str, count: int, stream: str, rate: float
                    ) -> tuple[float, list[float]]:
    """The baseline: publish-and-ack one at a time (``rate`` msg/s, 0: as fast as it can), a
    pull consumer fetching alongside."""
    import nats
    import orjson
    from nats.js.api import AckPolicy, ConsumerConfig

    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name=stream, subjects=[f"{stream}.>"])
    sub = await js.pull_subscribe(f"{stream}.q", durable="raw", stream=stream,
                                  config=ConsumerConfig(ack_policy=AckPolicy.ALL))
    latencies: list[float] = []

    async def consume() -> None:
        while len(latencies) < count:
            try:
                msgs = await sub.fetch(256, timeout=1)
            except Exception:
                continue
            now = time.time()
            for msg in msgs:
                latencies.append(now - orjson.loads(msg.data)["t"])
            await msgs[-1].ack_sync()

    consumer = asyncio.create_task(consume())
    start = time.time()
    begun = time.monotonic()
    for n in range(count):
        if rate:
            pause = begun + n / rate - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
        await js.publish(f"{stream}.q", orjson.dumps({"n": n, "t": time.time()}),
                         headers={"Nats-Msg-Id": f"{stream}-{n}"})
    await consumer
    elapsed = time.time() - start
    await nc.close()
    return count / elapsed, latencies


def ours_round(url: str, count: int, tmp: Path, round_no: int, rate: float
               ) -> tuple[float, list[float]]:
    """Two daemons with Bridges; a producer process on A (``rate`` msg/s, 0: as fast as it
    can), the consumer here on B."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    daemons = []
    stream = f"BENCH{round_no}{'P' if rate else 'F'}"
    tmp = tmp / f"{'paced' if rate else 'flood'}"
    tmp.mkdir(exist_ok=True)
    try:
        transits = {}
        for host in ("A", "B"):
            root = tmp / f"r{round_no}-{host}"
            root.mkdir()
            (root / "c.toml").write_text(f'[Bridge]\nservers = ["{url}"]\nstream = "{stream}"\n')
            host_env = dict(env, MULTIMODULE_HOSTNAME=host,
                            MULTIMODULE_TRANSIT_DIR=str(root / "transit"))
            transits[host] = Transit(root / "transit")
            daemons.append(subprocess.Popen(
                [sys.executable, "-m", "multimodule.cli.daemon", "-c", str(root / "c.toml"),
                 "-s", str(root / "state")], env=host_env, stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL, text=True))
            for line in daemons[-1].stdout:
                if "connected to NATS" in line:
                    break
        sink = transits["B"]
        sink.sysv_queue("Sink")
        producer = subprocess.Popen([sys.executable, "-c", PRODUCER,
                                     str(transits["A"].path), str(count), str(rate)],
                                    env=dict(env, MULTIMODULE_HOSTNAME="A"))
        latencies = []
        first = None
        for _ in range(count):
            message = sink.receive("Sink", timeout=60)
            now = time.time()
            first = first if first is not None else message["t"]
            latencies.append(now - message["t"])
        elapsed = time.time() - first
        producer.wait(30)
        return count / elapsed, latencies
    finally:
        for daemon in daemons:
            daemon.terminate()
        for daemon in daemons:
            try:
                daemon.wait(20)
            except subprocess.TimeoutExpired:
                daemon.kill()
        for host in ("A", "B"):
            Transit(tmp / f"r{round_no}-{host}" / "transit").remove_all()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=200.0,
                        help="messages per second of the latency runs (below both rates)")
    args = parser.parse_args()
    binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
    if not os.path.exists(binary):
        print("bench/bridge.py needs nats-server (apt install nats-server)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        port = free_port()
        url = f"nats://127.0.0.1:{port}"
        server = subprocess.Popen([binary, "-js", "-a", "127.0.0.1", "-p", str(port),
                                   "-sd", str(tmp / "js")], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            asyncio.run(wait_jetstream(url))
            raw, ours, raw_paced, ours_paced = [], [], [], []
            paced_count = max(100, int(args.rate * 5))
            for r in range(args.rounds):
                # Interleaved, so that the machine's load falls on both alike. Throughput
                # from a flood; latency from a stream paced below both rates (a flood's
                # latency is its queueing).
                raw.append(asyncio.run(raw_round(url, args.count, f"RAW{r}", 0)))
                ours.append(ours_round(url, args.count, tmp, r, 0))
                raw_paced.append(asyncio.run(raw_round(url, paced_count, f"RAWP{r}",
                                                       args.rate)))
                ours_paced.append(ours_round(url, paced_count, tmp, r, args.rate))
        finally:
            server.terminate()
            server.wait(10)

    def summary(rounds):
        rate = statistics.median(r[0] for r in rounds)
        p50 = statistics.median(percentile(r[1], 0.50) for r in rounds)
        p99 = statistics.median(percentile(r[1], 0.99) for r in rounds)
        return rate, p50, p99

    raw_rate = summary(raw)[0]
    rate = summary(ours)[0]
    _, raw_p50, raw_p99 = summary(raw_paced)
    _, p50, p99 = summary(ours_paced)
    print(f"one-way A -> B, median of {args.rounds} rounds: throughput from {args.count} "
          f"messages as fast as they go, latency from {paced_count} at {args.rate:g} msg/s")
    print(f"  raw nats-py publish+pull  {raw_rate:9.0f} msg/s  p50 {raw_p50 * 1e3:7.2f} ms  "
          f"p99 {raw_p99 * 1e3:7.2f} ms")
    print(f"  bridges (two daemons)     {rate:9.0f} msg/s  p50 {p50 * 1e3:7.2f} ms  "
          f"p99 {p99 * 1e3:7.2f} ms")
    ratio, slower = rate / raw_rate, p50 / raw_p50
    print(f"  throughput / raw = {ratio:.2f} (goal >= 0.5: {'met' if ratio >= 0.5 else 'MISSED'})")
    print(f"  p50 / raw p50    = {slower:.2f} (goal <= 2: {'met' if slower <= 2 else 'MISSED'})")
    print(f"  p99 / raw p99    = {p99 / raw_p99:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
