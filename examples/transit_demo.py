"""Transit demo: two processes exchange messages over named System V queues.

Run with ``scripts/demo``. A child process answers each message on ``demo-requests`` with a
reply on ``demo-replies``; the parent prints the replies and the queues' figures.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile

from multimodule.transit import Transit

CHILD = """
import sys
from multimodule.transit import Transit
t = Transit(sys.argv[1])
while True:
    msg = t.receive("demo-requests")
    if msg.get("stop"):
        break
    t.send("demo-replies", {"echo": msg["n"], "squared": msg["n"] ** 2})
"""


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        transit = Transit(f"{tmp}/transit")
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(transit.path)])
        try:
            for n in range(1, 6):
                transit.send("demo-requests", {"n": n})
                reply = transit.receive("demo-replies", timeout=10)
                meta = reply[".ipc_transit_meta"]
                print(f"sent {n}, got {reply['squared']} from {meta['source_hostname']}")
            big = {"blob": "x" * (1 << 20)}
            transit.send("demo-requests", {"n": 7, **big})
            print("sent a 1 MiB message; reply:", transit.receive("demo-replies", timeout=10))
            transit.send("demo-requests", {"stop": True})
            child.wait(timeout=10)
            for s in transit.queues():
                print(f"queue {s.name}: {s.messages} waiting, {s.bytes}/{s.max_bytes} bytes")
        finally:
            child.kill()
            transit.remove_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
