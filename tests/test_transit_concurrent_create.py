"""Acceptance: processes creating the same new name at once end up with one System V queue."""

from __future__ import annotations

import json
import os
from pathlib import Path

N_PROCS = 8
ROUNDS = 4

CREATOR = """
import json, os, sys
from multimodule.transit import lowlevel
gates = [int(fd) for fd in sys.argv[1].split(",")]
names = sys.argv[2].split(",")
who = int(sys.argv[3])
t = lowlevel.default()
for gate, name in zip(gates, names):
    print("ready", flush=True)
    os.read(gate, 1)  # end of file when the parent closes the other end: all start at once
    t.send(name, {"who": who})
    print(json.dumps({"name": name, "key": t.sysv_queue(name).queue.key}), flush=True)
"""


def queues_with_key(key: int) -> list[dict]:
    lines = Path("/proc/sysvipc/msg").read_text().splitlines()
    header = lines[0].split()
    rows = [dict(zip(header, line.split())) for line in lines[1:]]
    return [r for r in rows if int(r["key"]) == key]


def test_eight_processes_create_one_queue(transit, transit_dir, spawn):
    names = [f"race-{r}" for r in range(ROUNDS)]
    gates = [os.pipe() for _ in names]
    read_ends = [r for r, _ in gates]

    # Given 8 processes, each about to open and send to the same new names, round after round
    children = [spawn(CREATOR, ",".join(map(str, read_ends)), ",".join(names), who,
                      pass_fds=read_ends) for who in range(N_PROCS)]
    for r in read_ends:
        os.close(r)
    try:
        for rnd, name in enumerate(names):
            for child in children:
                child.expect("ready")
            assert not (transit_dir / name).exists()

            # When they are all released at the same moment
            os.close(gates[rnd][1])

            # Then all of them got the same key
            reports = [json.loads(child.readline()) for child in children]
            keys = {rep["key"] for rep in reports}
            assert len(keys) == 1, f"round {rnd}: {reports}"
            key = keys.pop()
            # And that is the key in the name file, and exactly one kernel queue has it
            assert (transit_dir / name).read_text() == f"{key}\n"
            rows = queues_with_key(key)
            assert len(rows) == 1
            # And all 8 messages are on that queue
            assert int(rows[0]["qnum"]) == N_PROCS
            got = sorted(transit.receive(name, timeout=5)["who"] for _ in range(N_PROCS))
            assert got == list(range(N_PROCS))
            assert transit.stat(name).messages == 0
    finally:
        for rnd in range(ROUNDS):
            try:
                os.close(gates[rnd][1])
            except OSError:
                pass
    for child in children:
        assert child.finish() == 0
    # And the directory holds just those names
    assert sorted(os.listdir(transit_dir)) == sorted([".spill", *names])
