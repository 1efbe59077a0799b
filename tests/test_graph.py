"""``mmctl graph``: the routes as they are, with live rates, as text and as Graphviz DOT.

The rendering is tested on descriptions written here (no daemon); the command against an
in-process daemon (real control queue, real Router, the monitor on a manual clock), and its
DOT output through Graphviz's ``dot``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from helpers import mm  # noqa: F401 - fixture
from inprocess import ManualClock
from multimodule.cli.graph import build, match_summary, quote, render_dot, render_text

PRODUCER = """
    from multimodule import Task

    class Producer(Task):
        is_stateful = True

        def message(self, message):
            self.emit(message)
"""

SINK = """
    from multimodule import Task

    class {name}(Task):
        def message(self, message):
            pass
"""

ECHO = """
    from multimodule import Task

    class Echo(Task):
        def message(self, message):
            message.pop(".ipc_transit_meta", None)
            self.emit(message)
"""

#: A Router with two routes from the external task Producer: one to the task Consumer, one
#: (with a transform) to Nowhere, which no task reads; Echo emits and no route names it.
CONFIG = """
    [Producer]
    is_external = true
    [Consumer]
    [Echo]
    [[Router.routes]]
    match = { source = "Producer" }
    forwards = [ { qname = "Consumer" } ]
    [[Router.routes]]
    match = { source = "Producer", level = "/warn|error/" }
    transform = { paged = true }
    forwards = [ { qname = "Nowhere" } ]
"""


def dot_program() -> str:
    """Graphviz's ``dot``; missing, the test fails in CI (CI set) and as root (scripts/setup
    installs it), and is skipped otherwise."""
    found = shutil.which("dot")
    if found:
        return found
    if os.environ.get("CI") or os.geteuid() == 0:
        pytest.fail("Graphviz's dot is missing: scripts/setup installs the Debian package "
                    "graphviz")
    pytest.skip("Graphviz's dot is missing (Debian package graphviz)")


def svg_of(dot_text: str) -> str:
    """``dot_text`` rendered by ``dot -Tsvg`` (it must accept it)."""
    result = subprocess.run([dot_program(), "-Tsvg"], input=dot_text, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, (result.stderr, dot_text)
    assert "<svg" in result.stdout
    return result.stdout


def after(lines: list[str], line: str) -> str:
    """The line that follows ``line`` (which must be there) in ``lines``."""
    assert line in lines, "\n".join(lines)
    return lines[lines.index(line) + 1]


def task(name: str, kind: str = "internal", **figures) -> dict:
    """One task of a description, with no figures unless given."""
    return {"name": name, "kind": kind, "state": "running", "level": "ok", "in_per_s": None,
            "out_per_s": None, "emitted_per_s": None, "messages_in": 0, "messages_out": 0,
            "emitted": 0, "queue_fill": None, **figures}


def route(number: int, match: dict, *qnames: str, per_s=None, destination=None) -> dict:
    return {"number": number, "match": match, "transform": False, "short_circuit": False,
            "forwards": [{"qname": q, "destination": destination} for q in qnames],
            "matches": None, "per_s": per_s}


def description(tasks: list[dict], routes: list[dict], **more) -> dict:
    return {"router": "Router", "window_s": 60.0, "tasks": tasks, "routes": routes,
            "static_forwards": {"forwarded": 0, "refused": 0, "max_queues": 16,
                                "max_copies": 64},
            "unrouted": 0, "queues": [], **more}


# -- rendering, without a daemon ---------------------------------------------------------------


def test_match_summary_says_what_a_route_matches_in_a_few_words():
    assert match_summary({}) == "every message"
    assert match_summary({"source": "A", "text": "/disk (full)/", "n": 3}) == \
        'source = "A", text ~ /disk (full)/, n = 3'
    assert match_summary({"meta": {"kind": "x"}}) == 'meta = {kind = "x"}'
    long = match_summary({"source": "x" * 100})
    assert len(long) == 60 and long.endswith("...")


def test_edges_come_from_source_matches_emitted_counters_and_forwards():
    # Given A named as the source of routes 1 and 2, B only emitting (no route names it),
    # C emitting nothing, and forwards to a task, a queue no task reads and another host
    graph = build(description(
        [task("Router"), task("A", "external", emitted_per_s=2.0), task("B", emitted=5),
         task("C"), task("T")],
        [route(1, {"source": "A"}, "T", per_s=1.5), route(2, {"source": "A"}, "Gone"),
         route(3, {"kind": "x"}, "Q", destination="db1")]))
    edges = {(e.source, e.target, tuple(e.routes), e.per_s, e.inferred) for e in graph.edges}
    # Then A sends to the Router on routes 1 and 2 at its emitted rate, B (inferred) too
    assert edges == {
        ("task:A", "task:Router", (1, 2), 2.0, False),
        ("task:B", "task:Router", (), None, True),
        ("task:Router", "task:T", (1,), 1.5, False),
        ("task:Router", "queue:Gone", (2,), None, False),
        ("task:Router", "remote:db1/Q", (3,), None, False),
    }
    # and C, involved in no route, is still a node
    assert graph.nodes["task:C"].type == "task"
    assert graph.nodes["queue:Gone"].type == "queue"


def test_text_without_a_router_says_so():
    text = render_text(description([task("A")], [], router="Router", window_s=None))
    assert text.startswith("Router [not running]: 0 routes\n")
    assert "Router has no routes" in text


def test_dot_of_odd_queue_names_is_valid_graphviz():
    # Given queue names with quotes, a backslash and non-ASCII letters
    odd = 'say "hi" \\ to Zoë'
    dot = render_dot(description([task("Router"), task("A", emitted=1)],
                                 [route(1, {"source": "A"}, odd)]))
    assert quote(f"queue:{odd}") in dot
    # Then Graphviz renders it, with the name intact
    assert "Zoë" in svg_of(dot)


# -- against a daemon --------------------------------------------------------------------------


async def start_daemon(inproc, clock: ManualClock | None = None):
    inproc.task("Producer", PRODUCER)
    inproc.task("Consumer", SINK.format(name="Consumer"))
    inproc.task("Echo", ECHO)
    inproc.config(CONFIG)
    return await inproc.start(clock=clock)


async def test_text_names_routes_targets_unread_queues_external_tasks_and_rates(inproc):
    # Given the daemon of CONFIG, its monitor on a manual clock
    clock = ManualClock()
    await start_daemon(inproc, clock)
    # When, over 60 s, Producer's process sends 12 messages (3 of them warnings) and Echo
    # emits 6
    for i in range(12):
        inproc.send("Router", {"source": "Producer", "i": i,
                               "level": "error" if i % 4 == 0 else "info"})
    for i in range(6):
        inproc.send("Echo", {"i": i})
    await inproc.quiet()
    clock.advance(60)
    await inproc.daemon.monitor.sample()
    await inproc.quiet()
    status, out, err = await inproc.mmctl("graph")
    # Then mmctl graph prints each route of Producer with its rate and targets
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0] == ("Router [internal, running]: 2 routes; rates over the monitor's last "
                        "7200 s (-: not measured yet)")
    # Producer runs in its own process: marked EXTERNAL (its process wrote no figures here)
    assert after(lines, "Producer [EXTERNAL, running], emits - msg/s") == \
        '  -> Router route 1 (source = "Producer"): 0.20 msg/s'
    assert after(lines, '  -> Router route 1 (source = "Producer"): 0.20 msg/s') == \
        "       -> Consumer [internal, running]"
    # and Nowhere, which no task reads, is marked unread
    assert re.fullmatch(r"       -> Nowhere \[UNREAD: no task reads this queue; \d+% full\]",
                        after(lines, '  -> Router route 2 (source = "Producer", level ~ '
                                     '/warn|error/; transform): 0.05 msg/s'))
    # Echo emitted, and no route names it: drawn to the Router all the same
    assert after(lines, "Echo [internal, running], emits 0.10 msg/s") == \
        "  -> Router: no route names it as source"
    assert "Unrouted: 6 messages." in out
    assert "Queues no task reads: Nowhere." in out


async def test_dot_is_rendered_by_graphviz_with_every_task(inproc):
    dot_program()
    # Given the daemon of CONFIG, Nowhere sent to once
    await start_daemon(inproc)
    inproc.send("Router", {"source": "Producer", "level": "warn"})
    await inproc.quiet()
    # When mmctl graph --format dot is run
    status, out, err = await inproc.mmctl("graph", "--format", "dot")
    assert status == 0, err
    nodes = {line.split(" [", 1)[0].strip(): line for line in out.splitlines()
             if line.startswith('  "') and " -> " not in line}
    # Then the external task, the Router and the unread queue are styled apart
    assert 'shape="box3d"' in nodes['"task:Producer"']
    assert 'shape="box"' in nodes['"task:Consumer"']
    assert 'shape="hexagon"' in nodes['"task:Router"']
    assert 'shape="cylinder"' in nodes['"queue:Nowhere"'] \
        and "no task reads it" in nodes['"queue:Nowhere"']
    # with edges labelled by route
    assert '"task:Producer" -> "task:Router" [label="routes 1, 2\\n- msg/s"];' in out
    assert '"task:Router" -> "queue:Nowhere" [label="route 2\\n- msg/s"];' in out
    # and Graphviz renders it into an SVG naming every task and the queue
    svg = svg_of(out)
    for name in ("Producer", "Consumer", "Echo", "Router", "Nowhere"):
        assert f">{name}</text>" in svg, name


def test_an_unknown_format_is_a_usage_error(mm):
    result = mm.mmctl_proc("graph", "--format", "svg")
    assert result.returncode == 2, result
    assert "usage: mmctl graph" in result.stderr
    assert "invalid choice: 'svg' (choose from 'text', 'dot')" in result.stderr


def test_without_a_daemon_it_exits_3(mm):
    result = mm.mmctl_proc("graph", "--format", "dot", "--wait", "0.3")
    assert result.returncode == 3, result
    assert "did not answer" in result.stderr and result.stdout == ""


def test_help_shows_how_to_render_an_svg(mm):
    result = mm.mmctl_proc("graph", "--help")
    assert result.returncode == 0, result
    assert "mmctl graph --format dot | dot -Tsvg > routes.svg" in result.stdout
