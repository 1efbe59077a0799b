#!/usr/bin/env python3
"""Benchmark of the transit layer against raw sysv_ipc + orjson and a bare asyncio.Queue.

Run from the repository root::

    .venv/bin/python bench/transit.py            # default run (< 60 s)
    .venv/bin/python bench/transit.py --quick    # short run (< 15 s)
    .venv/bin/python bench/transit.py --n 200000 # messages per throughput run

Measures, for a ~100-byte JSON message:

1. cross-process one-way throughput (a spawned child sends N, the parent receives N), ours
   (``Transit.send``/``Transit.receive``) vs raw (``MessageQueue.send(orjson.dumps(m))`` /
   ``orjson.loads(q.receive()[0])``), same queue byte capacity and receive buffer size;
   timed from the parent's "go" to its last receive;
2. cross-process ping-pong round trip (parent -> queue A -> child -> queue B -> parent),
   each side using the same API for a variant; p50/p99 latency after a warm-up;

1 and 2 run twice: [split] pins parent and child to two different CPUs, [same] pins both to
one CPU (``--cpus`` to choose). [same] is the stable one and shows the software cost; [split]
adds the cross-CPU wake-up latency (large and erratic on a VM) and is noisy.
3. in-process local queue throughput (``Transit.send`` to a queue declared local, consumer
   awaiting ``LocalQueue.get_async``) vs ``asyncio.Queue`` ``put_nowait``/``await get``,
   same batching (producer yields to the loop every B messages: 100, and 1 for a strict
   alternation); for information also ``Transit.send_owned`` (no copy);
4. a per-component cost breakdown (single-thread micro-timings) to explain the ratios.

Each measurement is repeated (``--repeat``, default 5, quick 3), ours and raw interleaved;
throughput takes the best run, latency percentiles take the median over runs. Goals are printed
with PASS/MISS; the exit status is 0 whatever the outcome (1 only if the benchmark itself broke
or was interrupted). A temporary transit directory is used; every queue is removed at the end,
even on error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import timeit
import traceback
from pathlib import Path

# Make "multimodule" importable when run as bench/transit.py from a checkout (sys.path[0] is
# bench/, and a child spawned by multiprocessing gets the same sys.path).
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(1, _ROOT)

import orjson  # noqa: E402
import sysv_ipc  # noqa: E402

from multimodule.transit import META_KEY, Transit  # noqa: E402
from multimodule.transit import lowlevel  # noqa: E402

MESSAGE = {
    "source": "Example1",
    "ct": 12345,
    "outstr": "howdy",
    "list": [1, 2, 3],
    "nested": {"a": 1.5, "b": "text"},
}

Q_TPUT = "bench_tput"
Q_PING = "bench_ping"
Q_PONG = "bench_pong"
Q_LOCAL = "x"

#: Receive timeout (seconds) of the informational "round trip with a timeout" variant.
RT_TIMEOUT = 5.0

GOALS = {
    "tput": 0.5,    # ours/raw messages/s, >=
    "rt_p50": 2.0,  # ours/raw p50 round trip, <=
    "local": 0.3,   # ours/raw messages/s, >=
}


# ------------------------------------------------------------------------------------------
# Child process (spawned): a small command server over a multiprocessing Pipe.
# ------------------------------------------------------------------------------------------

def _open_raw(key: int, msgmax: int) -> sysv_ipc.MessageQueue:
    return sysv_ipc.MessageQueue(key, 0, max_message_size=msgmax)


def child_main(conn, transit_dir: str) -> None:
    """Runs in the spawned child: executes send / echo jobs on request."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops us and cleans up
    all_cpus = os.sched_getaffinity(0)
    t = Transit(transit_dir)
    raw_cache: dict[int, sysv_ipc.MessageQueue] = {}

    def raw(key: int) -> sysv_ipc.MessageQueue:
        q = raw_cache.get(key)
        if q is None:
            q = raw_cache[key] = _open_raw(key, t.msgmax)
        return q

    msg = dict(MESSAGE)
    perf = time.perf_counter
    cpu = time.process_time
    while True:
        try:
            cmd = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        op = cmd[0]
        if op == "exit":
            conn.send("bye")
            return
        try:
            if op == "pin":
                os.sched_setaffinity(0, all_cpus if cmd[1] is None else {cmd[1]})
                conn.send("ready")
            elif op == "tput_ours":
                _, qname, n = cmd
                send = t.send
                t.sysv_queue(qname)  # open before the clock starts
                conn.send("ready")
                conn.recv()  # go
                c0, t0 = cpu(), perf()
                for _ in range(n):
                    send(qname, msg)
                conn.send(("done", perf() - t0, cpu() - c0))
            elif op == "tput_raw":
                _, key, n = cmd
                q = raw(key)
                qsend = q.send
                dumps = orjson.dumps
                conn.send("ready")
                conn.recv()
                c0, t0 = cpu(), perf()
                for _ in range(n):
                    qsend(dumps(msg))
                conn.send(("done", perf() - t0, cpu() - c0))
            elif op == "echo_ours":
                _, qa, qb, n, timeout = cmd
                send, receive = t.send, t.receive
                t.sysv_queue(qa)
                t.sysv_queue(qb)
                conn.send("ready")
                c0, t0 = cpu(), perf()
                for _ in range(n):
                    send(qb, receive(qa, timeout=timeout))
                conn.send(("done", perf() - t0, cpu() - c0))
            elif op == "echo_raw":
                _, ka, kb, n = cmd
                qa_recv = raw(ka).receive
                qb_send = raw(kb).send
                dumps, loads = orjson.dumps, orjson.loads
                conn.send("ready")
                c0, t0 = cpu(), perf()
                for _ in range(n):
                    qb_send(dumps(loads(qa_recv()[0])))
                conn.send(("done", perf() - t0, cpu() - c0))
            else:
                conn.send(("error", f"unknown command {op!r}"))
        except BaseException as exc:  # report and exit: the parent may be blocked in a receive
            text = "".join(traceback.format_exception(exc))
            print(f"transit bench child failed:\n{text}", file=sys.stderr, flush=True)
            try:
                conn.send(("error", text))
            except OSError:
                pass
            raise SystemExit(1) from None


# ------------------------------------------------------------------------------------------
# Parent side helpers
# ------------------------------------------------------------------------------------------

class ChildDied(BaseException):
    """Raised in the main thread (from a signal handler) when the child dies unexpectedly."""


#: Sent by the watchdog to the main thread; its handler raises :class:`ChildDied` (which also
#: breaks a blocking msgrcv, even inside Transit's EINTR-retrying receive).
CHILD_DIED_SIGNAL = signal.SIGUSR1
_cleaning = False


def _on_child_died(signum, frame):  # noqa: ARG001
    if not _cleaning:
        raise ChildDied


class Child:
    """The spawned child and its control pipe.

    A watchdog thread interrupts the main thread if the child dies unexpectedly, so a parent
    blocked in a receive that the child will never feed stops and cleans up.
    """

    def __init__(self, transit_dir: str):
        ctx = mp.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=child_main, args=(child_conn, transit_dir),
                                name="transit-bench-child", daemon=True)
        self.proc.start()
        child_conn.close()
        self.closing = False
        self.died = False
        self._main = threading.main_thread().ident
        threading.Thread(target=self._watch, name="child-watchdog", daemon=True).start()

    def _watch(self) -> None:
        mp_connection.wait([self.proc.sentinel])
        if not self.closing:
            self.died = True
            signal.pthread_kill(self._main, CHILD_DIED_SIGNAL)

    def request(self, *cmd) -> None:
        self.conn.send(cmd)
        reply = self.conn.recv()
        if reply != "ready":
            raise RuntimeError(f"child failed: {reply}")

    def result(self, timeout: float = 60.0):
        if not self.conn.poll(timeout):
            raise RuntimeError("child did not answer")
        reply = self.conn.recv()
        if reply[0] != "done":
            raise RuntimeError(f"child failed: {reply[1]}")
        return reply[1], reply[2]

    def close(self) -> None:
        self.closing = True
        if self.proc.is_alive():
            try:
                self.conn.send(("exit",))
                if self.conn.poll(2):
                    self.conn.recv()
            except (OSError, EOFError):
                pass
            self.proc.join(2)
        if self.proc.is_alive():
            self.proc.terminate()  # only our own child, by its pid
            self.proc.join(2)


def percentile(sorted_vals: list[int], p: float) -> float:
    if not sorted_vals:
        return float("nan")
    k = min(len(sorted_vals) - 1, max(0, int(round(p / 100.0 * (len(sorted_vals) - 1)))))
    return sorted_vals[k]


def drain_raw(q: sysv_ipc.MessageQueue) -> int:
    n = 0
    while True:
        try:
            q.receive(False)
            n += 1
        except sysv_ipc.BusyError:
            return n


# -- 1. throughput ---------------------------------------------------------------------------

def tput_ours(child: Child, t: Transit, n: int) -> dict:
    receive = t.receive
    child.request("tput_ours", Q_TPUT, n)
    c0 = time.process_time()
    t0 = time.perf_counter()
    child.conn.send("go")
    first = receive(Q_TPUT)
    t_first = time.perf_counter()
    for _ in range(n - 1):
        last = receive(Q_TPUT)
    t1 = time.perf_counter()
    c1 = time.process_time()
    send_wall, send_cpu = child.result()
    assert first["ct"] == MESSAGE["ct"] and META_KEY in last
    return {"wall": t1 - t0, "first_last": t1 - t_first, "recv_cpu": c1 - c0,
            "send_wall": send_wall, "send_cpu": send_cpu, "rate": n / (t1 - t0)}


def tput_raw(child: Child, q: sysv_ipc.MessageQueue, n: int) -> dict:
    qrecv = q.receive
    loads = orjson.loads
    child.request("tput_raw", q.key, n)
    c0 = time.process_time()
    t0 = time.perf_counter()
    child.conn.send("go")
    first = loads(qrecv()[0])
    t_first = time.perf_counter()
    for _ in range(n - 1):
        last = loads(qrecv()[0])
    t1 = time.perf_counter()
    c1 = time.process_time()
    send_wall, send_cpu = child.result()
    assert first == MESSAGE and last == MESSAGE
    return {"wall": t1 - t0, "first_last": t1 - t_first, "recv_cpu": c1 - c0,
            "send_wall": send_wall, "send_cpu": send_cpu, "rate": n / (t1 - t0)}


# -- 2. ping-pong ----------------------------------------------------------------------------

def rt_ours(child: Child, t: Transit, warm: int, iters: int,
           timeout: float | None = None) -> dict:
    total = warm + iters
    send, receive = t.send, t.receive
    pc = time.perf_counter_ns
    msg = MESSAGE
    lat = [0] * total
    child.request("echo_ours", Q_PING, Q_PONG, total, timeout)
    for i in range(total):
        s = pc()
        send(Q_PING, msg)
        receive(Q_PONG, timeout=timeout)
        lat[i] = pc() - s
    child.result()
    vals = sorted(lat[warm:])
    return {"p50": percentile(vals, 50) / 1e3, "p99": percentile(vals, 99) / 1e3,
            "mean": statistics.fmean(vals) / 1e3}


def rt_raw(child: Child, qa: sysv_ipc.MessageQueue, qb: sysv_ipc.MessageQueue,
           warm: int, iters: int) -> dict:
    total = warm + iters
    qa_send, qb_recv = qa.send, qb.receive
    dumps, loads = orjson.dumps, orjson.loads
    pc = time.perf_counter_ns
    msg = MESSAGE
    lat = [0] * total
    child.request("echo_raw", qa.key, qb.key, total)
    for i in range(total):
        s = pc()
        qa_send(dumps(msg))
        loads(qb_recv()[0])
        lat[i] = pc() - s
    child.result()
    vals = sorted(lat[warm:])
    return {"p50": percentile(vals, 50) / 1e3, "p99": percentile(vals, 99) / 1e3,
            "mean": statistics.fmean(vals) / 1e3}


# -- 3. in-process local queue ---------------------------------------------------------------

async def _local_ours(t: Transit, lq, n: int, batch: int, owned: bool = False) -> float:
    msg = MESSAGE
    rounds = n // batch

    async def producer():
        send = t.send
        for _ in range(rounds):
            for _ in range(batch):
                send(Q_LOCAL, msg)
            await asyncio.sleep(0)

    async def producer_owned():  # a fresh (shallow-copied) message handed over each time
        send_owned = t.send_owned
        for _ in range(rounds):
            for _ in range(batch):
                send_owned(Q_LOCAL, dict(msg))
            await asyncio.sleep(0)

    async def consumer():
        get = lq.get_async
        for _ in range(rounds * batch):
            await get()

    t0 = time.perf_counter()
    await asyncio.gather(consumer(), producer_owned() if owned else producer())
    return time.perf_counter() - t0


async def _local_raw(n: int, batch: int) -> float:
    q: asyncio.Queue = asyncio.Queue()
    msg = MESSAGE
    rounds = n // batch

    async def producer():
        put = q.put_nowait
        for _ in range(rounds):
            for _ in range(batch):
                put(msg)
            await asyncio.sleep(0)

    async def consumer():
        get = q.get
        for _ in range(rounds * batch):
            await get()

    t0 = time.perf_counter()
    await asyncio.gather(consumer(), producer())
    return time.perf_counter() - t0


def local_ours(t: Transit, n: int, batch: int, owned: bool = False) -> float:
    lq = t.declare_local(Q_LOCAL)
    elapsed = asyncio.run(_local_ours(t, lq, n, batch, owned))
    assert len(lq) == 0
    return (n // batch * batch) / elapsed


def local_raw(n: int, batch: int) -> float:
    elapsed = asyncio.run(_local_raw(n, batch))
    return (n // batch * batch) / elapsed


# -- 4. component breakdown ------------------------------------------------------------------

def breakdown(t: Transit, raw_q: sysv_ipc.MessageQueue, number: int) -> list[tuple[str, float]]:
    """Single-thread cost of each step, in microseconds per call (best of 7)."""
    msg = MESSAGE
    meta = lowlevel.make_meta({})
    body_ours = lowlevel.encode_body(msg, meta)
    payload_ours = lowlevel.HEADER_JSON + body_ours
    body_raw = orjson.dumps(msg)
    sq = t.sysv_queue(Q_TPUT)
    lq = t.declare_local("bench_breakdown")
    tsend = t.send
    treceive = t.receive

    def best(fn) -> float:
        return min(timeit.repeat(fn, number=number, repeat=7)) / number * 1e6

    def sysv_roundtrip_ours():
        tsend(Q_TPUT, msg)
        treceive(Q_TPUT)

    def sysv_roundtrip_raw():
        raw_q.send(orjson.dumps(msg))
        orjson.loads(raw_q.receive()[0])

    def sysv_send_recv_payload():
        sq.queue.send(payload_ours, False, 1)
        sq.queue.receive(False, 1)

    def sysv_send_recv_raw():
        raw_q.send(body_raw, False)
        raw_q.receive(False)

    def busy_receive():
        try:
            sq.queue.receive(False, 1)
        except sysv_ipc.BusyError:
            pass

    def local_put_get():
        tsend("bench_breakdown", msg)
        lq.get_nowait()

    rows = [
        ("raw: orjson.dumps(msg)", best(lambda: orjson.dumps(msg))),
        ("raw: orjson.loads(bytes)", best(lambda: orjson.loads(body_raw))),
        ("ours: make_meta({})", best(lambda: lowlevel.make_meta({}))),
        ("ours: dict(msg) shallow copy", best(lambda: dict(msg))),
        ("ours: encode_body (copy+meta+dumps)", best(lambda: lowlevel.encode_body(msg, meta))),
        ("ours: HEADER_JSON + body", best(lambda: lowlevel.HEADER_JSON + body_ours)),
        ("ours: split_header", best(lambda: lowlevel.split_header(payload_ours))),
        ("ours: decode_body(memoryview)", best(lambda: lowlevel.decode_body(
            memoryview(payload_ours)[4:]))),
        ("ours: orjson.loads(bigger body)", best(lambda: orjson.loads(body_ours))),
        ("ours: SysvQueue.decode", best(lambda: sq.decode(payload_ours))),
        ("sysv: send+recv nonblock, 172 B (ours size)", best(sysv_send_recv_payload)),
        ("sysv: send+recv nonblock, 94 B (raw size)", best(sysv_send_recv_raw)),
        ("sysv: receive on empty queue -> BusyError", best(busy_receive)),
        ("ours: Transit.send+receive same proc", best(sysv_roundtrip_ours)),
        ("raw: send(dumps)+loads(receive) same proc", best(sysv_roundtrip_raw)),
        ("ours: copy_message (deep copy+meta)", best(lambda: lowlevel.copy_message(msg, meta))),
        ("ours: make_meta+copy_message", best(lambda: lowlevel.copy_message(
            msg, lowlevel.make_meta({})))),
        ("ours: LocalQueue.put + get_nowait", best(lambda: (lq.put(msg), lq.get_nowait()))),
        ("ours: Transit.send local + get_nowait", best(local_put_get)),
        ("raw: deque.append+popleft", best(lambda: (lq._items.append(msg),
                                                    lq._items.popleft()))),
        ("time.time()", best(time.time)),
        # Candidate replacements (not what multimodule does today), for comparison:
        ("alt: copy = orjson.loads(orjson.dumps(msg))", best(lambda: orjson.loads(
            orjson.dumps(msg)))),
        ("alt: decode = orjson.loads(payload[4:])", best(lambda: orjson.loads(
            payload_ours[4:]))),
    ]
    t.undeclare_local("bench_breakdown")
    return rows


# ------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------

def _report_failure(exc: BaseException | None, child: Child | None) -> None:
    if child is not None and child.died:
        child.proc.join(1)
        print(f"\nthe child process died (exit code {child.proc.exitcode}); stopping",
              file=sys.stderr)
    elif exc is None or isinstance(exc, KeyboardInterrupt):
        print("\ninterrupted", file=sys.stderr)
    else:
        traceback.print_exception(exc)


def _loadavg() -> list[str]:
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[:3]
    except OSError:
        return ["?"]


def fmt_rate(r: float) -> str:
    return f"{r:,.0f}/s"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short run (< 15 s)")
    ap.add_argument("--n", type=int, default=None,
                    help="messages per throughput run (default 100000, quick 20000)")
    ap.add_argument("--rt", type=int, default=None,
                    help="measured round trips per ping-pong run (default 15000, quick 3000)")
    ap.add_argument("--local-n", type=int, default=None,
                    help="messages per local-queue run (default 100000, quick 50000)")
    ap.add_argument("--repeat", type=int, default=None,
                    help="runs per measurement (default 5, quick 3)")
    ap.add_argument("--cpus", choices=("both", "split", "same", "free"), default="both",
                    help="CPU placement for the cross-process tests: split = parent on one CPU, "
                         "child on another; same = both on one CPU; both = split then same "
                         "(default; same only on a 1-CPU machine); free = no pinning (noisy: "
                         "results depend on where the scheduler puts the two processes)")
    ap.add_argument("--no-breakdown", action="store_true", help="skip the component timings")
    ap.add_argument("--only", default="cross,local,breakdown",
                    help="comma-separated parts to run: cross (1 and 2), local (3), "
                         "breakdown (4); default all")
    args = ap.parse_args(argv)
    only = {p.strip() for p in args.only.split(",") if p.strip()}
    if only - {"cross", "local", "breakdown"}:
        ap.error(f"--only: unknown part(s) {sorted(only - {'cross', 'local', 'breakdown'})}")
    if args.no_breakdown:
        only.discard("breakdown")

    n = args.n or (20_000 if args.quick else 100_000)
    rt_iters = args.rt or (3_000 if args.quick else 15_000)
    rt_warm = max(200, rt_iters // 10)
    local_n = args.local_n or (50_000 if args.quick else 100_000)
    repeat = max(1, args.repeat or (3 if args.quick else 5))
    bd_number = 2_000 if args.quick else 10_000

    body = orjson.dumps(MESSAGE)
    wire = lowlevel.HEADER_JSON + lowlevel.encode_body(MESSAGE, lowlevel.make_meta({}))
    start = time.perf_counter()

    def on_term(signum, frame):  # noqa: ARG001
        if not _cleaning:
            raise KeyboardInterrupt  # run the cleanup below

    global _cleaning
    _cleaning = False
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(CHILD_DIED_SIGNAL, _on_child_died)
    tmp = tempfile.mkdtemp(prefix="mm-transit-bench-")
    transit_dir = os.path.join(tmp, "transit")
    t: Transit | None = None
    raw_queues: list[sysv_ipc.MessageQueue] = []
    child: Child | None = None
    status = 0
    try:
        t = Transit(transit_dir)
        cap = t.sysv_queue(Q_TPUT).queue.max_size
        t.sysv_queue(Q_PING)
        t.sysv_queue(Q_PONG)

        def new_raw() -> sysv_ipc.MessageQueue:
            q = sysv_ipc.MessageQueue(None, sysv_ipc.IPC_CREX, 0o600,
                                      max_message_size=t.msgmax)
            raw_queues.append(q)
            if q.max_size != cap:
                q.max_size = cap
            return q

        raw_tput, raw_ping, raw_pong = new_raw(), new_raw(), new_raw()

        print("transit benchmark  (python %s, orjson %s, sysv_ipc %s, %d CPUs)" % (
            sys.version.split()[0], orjson.__version__, sysv_ipc.VERSION, os.cpu_count() or 0))
        print(f"message: {len(body)} B JSON raw; {len(wire)} B on the wire for ours "
              f"(4 B header + .ipc_transit_meta); queue capacity {cap} B, "
              f"receive buffer {t.msgmax} B for both")
        print("load average at start: %s (other CPU load makes the cross-process figures "
              "noisy, the [split] ones most)" % " ".join(_loadavg()))
        print(f"runs: {repeat}x each, ours/raw interleaved; throughput = best run, "
              f"latency = median of runs; N={n:,}, round trips={rt_iters:,} "
              f"(+{rt_warm:,} warm-up), local N={local_n:,}")

        allowed = sorted(os.sched_getaffinity(0))
        all_cpus = set(allowed)
        if args.cpus is None or args.cpus == "both":
            placements = ["split", "same"] if len(allowed) >= 2 else ["same"]
        elif args.cpus == "split" and len(allowed) < 2:
            placements = ["same"]
        else:
            placements = [args.cpus]
        if "cross" not in only:
            placements = []

        child = Child(transit_dir) if placements else None
        per_placement = []
        for placement in placements:
            if placement == "free":
                parent_cpu = child_cpu = None
                os.sched_setaffinity(0, all_cpus)
            else:
                parent_cpu = allowed[0]
                child_cpu = allowed[1] if placement == "split" else allowed[0]
                os.sched_setaffinity(0, {parent_cpu})
            child.request("pin", child_cpu)
            # Warm up (imports done, queues opened, caches hot) with a small job of each kind.
            tput_ours(child, t, 1000)
            tput_raw(child, raw_tput, 1000)

            # 1. throughput, ours and raw interleaved
            ours_runs, raw_runs = [], []
            for _ in range(repeat):
                ours_runs.append(tput_ours(child, t, n))
                raw_runs.append(tput_raw(child, raw_tput, n))
            # 2. ping-pong
            rto, rtr = [], []
            for _ in range(repeat):
                rto.append(rt_ours(child, t, rt_warm, rt_iters))
                rtr.append(rt_raw(child, raw_ping, raw_pong, rt_warm, rt_iters))
            # 2b. ours again with a finite receive timeout (both sides), for information
            rtt = [rt_ours(child, t, rt_warm // 10, max(100, rt_iters // 10), RT_TIMEOUT)
                   for _ in range(min(repeat, 3))]
            per_placement.append((placement, parent_cpu, child_cpu, ours_runs, raw_runs,
                                  rto, rtr, rtt))
        os.sched_setaffinity(0, all_cpus)
        if child is not None:
            child.close()  # not needed any more

        # 3. local (single thread, one event loop), ours and raw interleaved
        local_rows = []
        for batch in ((100, 1) if "local" in only else ()):
            lo, lr = [], []
            for _ in range(repeat):
                gc.collect()
                lo.append(local_ours(t, local_n, batch))
                gc.collect()
                lr.append(local_raw(local_n, batch))
            local_rows.append((batch, lo, lr))
        owned_runs = []
        if "local" in only and hasattr(t, "send_owned"):
            # For information: Transit.send_owned (no copy; the caller hands the dict over).
            owned_runs = [local_ours(t, local_n, 100, owned=True) for _ in range(min(repeat, 3))]

        # ------------------------------------------------------------------ report
        rows = []  # (name, ours, raw, ratio, goal-text, pass|None)
        for placement, _pc, _cc, ours_runs, raw_runs, rto, rtr, rtt in per_placement:
            tag = f"[{placement}]"
            bo = max(r["rate"] for r in ours_runs)
            br = max(r["rate"] for r in raw_runs)
            rows.append((f"1. one-way throughput {tag}", fmt_rate(bo), fmt_rate(br), bo / br,
                         f">= {GOALS['tput']}", bo / br >= GOALS["tput"]))
            o50 = statistics.median(r["p50"] for r in rto)
            r50 = statistics.median(r["p50"] for r in rtr)
            o99 = statistics.median(r["p99"] for r in rto)
            r99 = statistics.median(r["p99"] for r in rtr)
            rows.append((f"2. round trip p50 {tag}", f"{o50:.1f} us", f"{r50:.1f} us", o50 / r50,
                         f"<= {GOALS['rt_p50']}", o50 / r50 <= GOALS["rt_p50"]))
            rows.append((f"2. round trip p99 {tag}", f"{o99:.1f} us", f"{r99:.1f} us",
                         o99 / r99, "(info)", None))
            t50 = statistics.median(r["p50"] for r in rtt)
            rows.append((f"2. round trip p50, receive(timeout={RT_TIMEOUT:g}) {tag}",
                         f"{t50:.1f} us", f"{r50:.1f} us", t50 / r50, "(info)", None))
        for batch, lo, lr in local_rows:
            rows.append((f"3. local queue, yield every {batch}", fmt_rate(max(lo)),
                         fmt_rate(max(lr)), max(lo) / max(lr), f">= {GOALS['local']}",
                         max(lo) / max(lr) >= GOALS["local"]))
        if owned_runs:
            lr100 = max(local_rows[0][2])
            rows.append(("3. local, send_owned(dict(msg)), yield every 100",
                         fmt_rate(max(owned_runs)), fmt_rate(lr100), max(owned_runs) / lr100,
                         "(info)", None))

        w = [max(len(r[0]) for r in rows), 14, 14, 6, 8]
        hdr = (f"{'measurement':<{w[0]}}  {'ours':>{w[1]}}  {'raw':>{w[2]}}  "
               f"{'ours/raw':>{w[3]}}  {'goal':<{w[4]}}  result")
        print(hdr)
        print("-" * len(hdr))
        for name, o, r, ratio, goal, ok in rows:
            res = "" if ok is None else ("PASS" if ok else "MISS")
            print(f"{name:<{w[0]}}  {o:>{w[1]}}  {r:>{w[2]}}  {ratio:>8.2f}  "
                  f"{goal:<{w[4]}}  {res}")
        if per_placement:
            print("placements: split = parent and child pinned to different CPUs; same = both "
                  "pinned to one CPU")
        print()

        print("details")
        for placement, pc, cc, ours_runs, raw_runs, rto, rtr, rtt in per_placement:
            print(f"  [{placement}] parent CPU {pc}, child CPU {cc}")
            for label, runs in (("ours", ours_runs), ("raw ", raw_runs)):
                print(f"    throughput {label}: runs "
                      + ", ".join(fmt_rate(r["rate"]) for r in runs))
                b = max(runs, key=lambda r: r["rate"])
                print(f"      best: wall {b['wall']*1e3:.0f} ms (first->last "
                      f"{b['first_last']*1e3:.0f} ms); receiver CPU "
                      f"{b['recv_cpu']*1e6/n:.2f} us/msg ({b['recv_cpu']/b['wall']:.0%} of wall); "
                      f"sender CPU {b['send_cpu']*1e6/n:.2f} us/msg "
                      f"({b['send_cpu']/b['send_wall']:.0%} of its loop)")
            for label, runs in (("ours", rto), ("raw ", rtr), (f"ours, timeout={RT_TIMEOUT:g}", rtt)):
                print(f"    round trip {label}: p50 "
                      + ", ".join(f"{r['p50']:.1f}" for r in runs)
                      + " us; p99 " + ", ".join(f"{r['p99']:.1f}" for r in runs)
                      + " us; mean " + ", ".join(f"{r['mean']:.1f}" for r in runs) + " us")
        for batch, lo, lr in local_rows:
            print(f"  local, yield every {batch}: ours " + ", ".join(fmt_rate(x) for x in lo)
                  + "; raw " + ", ".join(fmt_rate(x) for x in lr))
        if owned_runs:
            print("  local, send_owned, yield every 100: "
                  + ", ".join(fmt_rate(x) for x in owned_runs))
        print()

        if "breakdown" in only:
            print("component costs (single thread, us per call, best of 7)")
            for name, us in breakdown(t, raw_tput, bd_number):
                print(f"  {name:<46} {us:7.2f}")
            print()
        print(f"load average at end: {' '.join(_loadavg())}")
        print(f"total time {time.perf_counter() - start:.1f} s")
    except BaseException as exc:  # noqa: BLE001 - report and clean up
        status = 1
        try:
            _report_failure(exc, child)
        except BaseException:  # noqa: BLE001 - a late ChildDied / Ctrl-C: report once more
            _report_failure(None, child)
    finally:
        # No signal handler may raise from here on: the cleanup must run to its end.
        _cleaning = True
        if child is not None:
            child.close()
        if t is not None:
            try:
                t.remove_all()
            except Exception:  # noqa: BLE001
                traceback.print_exc()
        for q in raw_queues:
            try:
                q.remove()
            except sysv_ipc.ExistentialError:
                pass
        shutil.rmtree(tmp, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
