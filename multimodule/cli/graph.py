"""``mmctl graph``: the routes as they are, with live rates, as text or Graphviz DOT.

The daemon answers a ``graph`` query with a description (see
:func:`multimodule.runtime.graph.describe`): its tasks (internal, external, the daemon), the
Router's routes, and the monitor's rates. This module turns that description into a graph
(:func:`build`) and renders it (:func:`render_text`, :func:`render_dot`): pure functions of the
description, so they are tested without a daemon.

Who sends what to the Router is inferred, not traced: a task is drawn sending to a route whose
``match`` has ``source = "TASK"`` (an equality; the Router's messages from a task's ``emit``
carry its name as ``source``), and a task whose ``emitted`` counter is above 0 (else, when
that is unknown, ``messages_out``) is drawn sending to the Router. Each forward of a route is an
edge from the Router to the forward's queue: a task, a queue no task of the daemon reads, or a
queue on another host (``destination``, through the Bridge).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from typing import Any

FORMATS = ("text", "dot")

#: Longest match summary shown, characters.
MAX_SUMMARY = 60


@dataclass
class Node:
    """One node: ``id`` (unique), ``name`` (what the operator knows it by), ``type``:
    ``"task"`` (a task the daemon knows; ``kind``/``state`` from its row), ``"router"``,
    ``"source"`` (a ``source`` a route names that is no task here), ``"queue"`` (a queue no task
    reads), ``"remote"`` (a queue on another host) or ``"static"`` (the hops that messages
    carry in ``static_forwards``). ``info``: the task's figures or the queue's row."""

    id: str
    name: str
    type: str
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Edge:
    """One edge ``source`` -> ``target`` (node ids): ``routes`` (route numbers, from 1),
    ``per_s`` (messages per second, ``None`` if not measured), ``inferred`` (drawn from a
    counter, not from a route naming the task as its source)."""

    source: str
    target: str
    routes: list[int]
    per_s: float | None
    inferred: bool = False


@dataclass
class Graph:
    """Nodes by id (in order of appearance) and edges, from :func:`build`."""

    description: dict[str, Any]
    nodes: dict[str, Node] = field(default_factory=dict)
    edges: list[Edge] = field(default_factory=list)

    def add(self, node: Node) -> Node:
        """``node``, or the node already there with its id."""
        return self.nodes.setdefault(node.id, node)


def is_regex(pattern: Any) -> bool:
    """Whether a match value is a regular expression (``"/.../"``), as the Router reads it."""
    return isinstance(pattern, str) and len(pattern) >= 2 and pattern[0] == "/" \
        and pattern[-1] == "/"


def match_summary(match: dict[str, Any], limit: int = MAX_SUMMARY) -> str:
    """``match`` in a few words: ``source = "A", text ~ /disk/``; ``{}`` is "every message";
    cut at ``limit`` characters."""
    if not match:
        return "every message"

    def one(key: str, pattern: Any) -> str:
        if is_regex(pattern):
            return f"{key} ~ {pattern}"
        if isinstance(pattern, dict):
            return f"{key} = {{{match_summary(pattern, limit) if pattern else ''}}}"
        return f"{key} = {json.dumps(pattern, ensure_ascii=False)}"

    text = ", ".join(one(str(key), pattern) for key, pattern in match.items())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def route_source(route: dict[str, Any]) -> str | None:
    """The task a route takes messages from: its ``match``'s ``source`` when that is an
    equality on a string (not a regex), else ``None``."""
    source = route.get("match", {}).get("source")
    return source if isinstance(source, str) and not is_regex(source) else None


def _emits(task: dict[str, Any]) -> bool:
    counted = task.get("emitted")
    if counted is None:
        counted = task.get("messages_out")
    return bool(counted) and task.get("kind") != "daemon"


def build(description: dict[str, Any]) -> Graph:
    """The graph of ``description`` (a ``graph`` answer): emitters -> Router -> targets.

    Emitter -> Router edges: one per task a route names as its ``source`` (the routes'
    numbers on it; rate: the task's ``emitted_per_s``) and one, ``inferred``, per other task
    that emitted. Router -> target edges: one per forward of each route (rate: the route's
    matches per second)."""
    graph = Graph(description)
    tasks = {t["name"]: t for t in description.get("tasks", [])}
    router_name = description.get("router", "Router")
    router = graph.add(Node(f"task:{router_name}", router_name, "router",
                            tasks.get(router_name, {})))
    routes = description.get("routes", [])

    def task_node(name: str) -> Node:
        if name in tasks:
            return graph.add(Node(f"task:{name}", name, "task", tasks[name]))
        return graph.add(Node(f"source:{name}", name, "source"))

    by_source: dict[str, list[int]] = {}
    for route in routes:
        source = route_source(route)
        if source is not None and source != router_name:
            by_source.setdefault(source, []).append(route["number"])
    for name, numbers in by_source.items():
        node = task_node(name)
        graph.edges.append(Edge(node.id, router.id, numbers,
                                tasks.get(name, {}).get("emitted_per_s")))
    for name, task in tasks.items():
        if name not in by_source and name != router_name and _emits(task):
            graph.edges.append(Edge(task_node(name).id, router.id, [],
                                    task.get("emitted_per_s"), inferred=True))
    queues = {q["name"]: q for q in description.get("queues", [])}
    for route in routes:
        for forward in route.get("forwards", []):
            qname, host = forward["qname"], forward.get("destination")
            if host:
                target = graph.add(Node(f"remote:{host}/{qname}", f"{qname}@{host}",
                                        "remote", {"qname": qname, "host": host}))
            elif qname in tasks:
                target = task_node(qname)
            else:
                target = graph.add(Node(f"queue:{qname}", qname, "queue",
                                        queues.get(qname, {})))
            graph.edges.append(Edge(router.id, target.id, [route["number"]],
                                    route.get("per_s")))
    static = description.get("static_forwards") or {}
    if static.get("forwarded") or static.get("refused"):
        node = graph.add(Node("static", "static_forwards", "static", static))
        graph.edges.append(Edge(router.id, node.id, [], None, inferred=True))
    for name, task in tasks.items():  # tasks no route involves: shown all the same
        if task.get("kind") != "daemon":
            task_node(name)
    return graph


# -- text ------------------------------------------------------------------------------------


def rate(value: float | None) -> str:
    """A rate in messages per second for a person: ``"2.50 msg/s"``; ``"- msg/s"`` if not
    measured yet."""
    return "- msg/s" if value is None else f"{value:.2f} msg/s"


def _tag(node: Node) -> str:
    info = node.info
    if node.type in ("task", "router"):
        if not info:
            return "[not running]"
        kind = "EXTERNAL" if info.get("kind") == "external" else info.get("kind", "?")
        return f"[{kind}, {info.get('state', '?')}]"
    if node.type == "source":
        return "[not a task here]"
    if node.type == "remote":
        return f"[queue on host {info['host']}, through the Bridge]"
    if node.type == "queue":
        fill = info.get("queue_fill")
        where = f"{100 * fill:.0f}% full" if fill is not None else "no queue seen yet"
        return f"[UNREAD: no task reads this queue; {where}]"
    return ""


def render_text(description: dict[str, Any]) -> str:
    """The routes for a terminal: per source, each ``source -> Router route N (match
    summary) -> target``, with rates; then the counts of the Router and every task. Ends with
    a newline."""
    graph = build(description)
    routes = {r["number"]: r for r in description.get("routes", [])}
    router = next(n for n in graph.nodes.values() if n.type == "router")
    window = description.get("window_s")
    head = f"{router.name} {_tag(router)}: {len(routes)} route{'' if len(routes) == 1 else 's'}"
    if window:
        head += f"; rates over the monitor's last {window:g} s (-: not measured yet)"
    lines = [head, ""]
    forwards: dict[int, list[Edge]] = {}
    for edge in graph.edges:
        if edge.source == router.id and edge.routes:
            forwards.setdefault(edge.routes[0], []).append(edge)
    open_routes = [n for n, r in routes.items() if route_source(r) is None]

    def route_lines(number: int) -> list[str]:
        route = routes[number]
        extra = "".join(f"; {word}" for word, on in (("transform", route.get("transform")),
                                                      ("short_circuit",
                                                       route.get("short_circuit"))) if on)
        out = [f"  -> {router.name} route {number} ({match_summary(route.get('match', {}))}"
               f"{extra}): {rate(route.get('per_s'))}"]
        for edge in forwards.get(number, []):
            target = graph.nodes[edge.target]
            out.append(f"       -> {target.name} {_tag(target)}")
        return out

    for edge in graph.edges:
        if edge.target != router.id:
            continue
        source = graph.nodes[edge.source]
        emits = f", emits {rate(source.info.get('emitted_per_s'))}" \
            if source.type == "task" else ""
        lines.append(f"{source.name} {_tag(source)}{emits}")
        for number in edge.routes:
            lines += route_lines(number)
        if edge.inferred:
            may = f" (route{'s' if len(open_routes) > 1 else ''} "\
                  f"{', '.join(map(str, open_routes))} may match)" if open_routes else ""
            lines.append(f"  -> {router.name}: no route names it as source{may}")
    if open_routes:
        lines.append("Any source:")
        for number in open_routes:
            lines += route_lines(number)
    if not routes:
        lines.append(f"{router.name} has no routes: what tasks emit is counted as unrouted.")
    static = description.get("static_forwards") or {}
    lines += ["", f"Unrouted: {_count(description.get('unrouted'))} messages. static_forwards "
                  f"(hops the messages carry): {_count(static.get('forwarded'))} forwarded, "
                  f"{_count(static.get('refused'))} refused (at most "
                  f"{static.get('max_queues') or 'the default number of'} queues, "
                  f"{static.get('max_copies') or 'the default number of'} copies)."]
    unread = [n for n in graph.nodes.values() if n.type == "queue"]
    if unread:
        lines.append("Queues no task reads: " + ", ".join(n.name for n in unread) + ".")
    rows = [(n.name, _kind(n), n.info.get("state") or "-", _num(n.info.get("in_per_s")),
             _num(n.info.get("out_per_s")), _num(n.info.get("emitted_per_s")))
            for n in graph.nodes.values() if n.type in ("task", "router") and n.info]
    lines += ["", *_columns(("TASK", "KIND", "STATE", "IN/S", "OUT/S", "EMITTED/S"), rows)]
    return "\n".join(lines) + "\n"


def _kind(node: Node) -> str:
    kind = node.info.get("kind") or "-"
    return "EXTERNAL" if kind == "external" else kind


def _count(value: Any) -> str:
    return "?" if value is None else str(value)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _columns(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    return ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
            for line in (headers, *rows)]


# -- DOT -------------------------------------------------------------------------------------


def quote(text: str) -> str:
    """``text`` as a DOT string (double-quoted; ``"`` and ``\\`` escaped, newlines as
    ``\\n``)."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\r", "").replace("\n", "\\n") + '"'


#: Node attributes by type (by kind for tasks).
_STYLES: dict[str, dict[str, str]] = {
    "internal": {"shape": "box", "style": "rounded,filled", "fillcolor": "#dbe9f6"},
    "external": {"shape": "box3d", "style": "filled,bold", "fillcolor": "#fde6c4",
                 "color": "#b36b00"},
    "daemon": {"shape": "ellipse", "style": "filled", "fillcolor": "#eeeeee"},
    "router": {"shape": "hexagon", "style": "filled", "fillcolor": "#d9f2d9"},
    "source": {"shape": "box", "style": "rounded,dashed", "color": "#777777",
               "fontcolor": "#555555"},
    "queue": {"shape": "cylinder", "style": "filled,dashed", "fillcolor": "#f9d3d3",
              "color": "#c00000"},
    "remote": {"shape": "cylinder", "style": "filled", "fillcolor": "#e6e0f5"},
    "static": {"shape": "note", "style": "dashed", "color": "#777777"},
}


def _node_label(node: Node) -> tuple[str, dict[str, str]]:
    """``(label, attributes)`` of ``node``; a task that is not running is dashed."""
    info = node.info
    if node.type in ("task", "router"):
        kind = info.get("kind")
        lines = [node.name, f"{kind}, {info.get('state')}" if info else "not running"]
        if info.get("emitted_per_s") is not None and node.type == "task":
            lines.append(f"emits {rate(info['emitted_per_s'])}")
        if info.get("in_per_s") is not None:
            lines.append(f"in {rate(info['in_per_s'])}")
        style = dict(_STYLES["router" if node.type == "router" else
                             kind if kind in _STYLES else "internal"])
        if info.get("state") not in ("running", "activating"):
            style["style"] += ",dashed"
        return "\n".join(lines), style
    if node.type == "source":
        return f"{node.name}\nnot a task here", _STYLES["source"]
    if node.type == "queue":
        fill = info.get("queue_fill")
        where = f"{100 * fill:.0f}% full" if fill is not None else "no queue seen yet"
        return f"{node.name}\nqueue: no task reads it\n{where}", _STYLES["queue"]
    if node.type == "remote":
        return f"{info['qname']}\non host {info['host']}\n(through the Bridge)", \
            _STYLES["remote"]
    return (f"static_forwards\n(hops the messages carry)\nforwarded "
            f"{_count(info.get('forwarded'))}, refused {_count(info.get('refused'))}",
            _STYLES["static"])


def render_dot(description: dict[str, Any]) -> str:
    """The routes as a Graphviz digraph (``dot -Tsvg``): a node per task (external tasks as
    orange 3-D boxes, tasks not running dashed), the Router as a hexagon, queues no task reads
    as red dashed cylinders, queues on other hosts as violet cylinders; edges labelled with
    the route numbers and the rate in msg/s. Ends with a newline."""
    graph = build(description)
    router = next(n for n in graph.nodes.values() if n.type == "router")
    window = description.get("window_s")
    title = f"routes of {router.name}; rates over the last {window:g} s" if window \
        else f"routes of {router.name}"
    out = ["digraph routes {", "  rankdir=LR;", f"  label={quote(title)};",
           "  labelloc=t;", '  node [fontname="Helvetica", fontsize=11];',
           '  edge [fontname="Helvetica", fontsize=10];']
    for node in graph.nodes.values():
        label, style = _node_label(node)
        if node.type == "router":
            label += f"\nunrouted {_count(description.get('unrouted'))}"
        attributes = "".join(f", {key}={quote(value)}" for key, value in style.items())
        out.append(f"  {quote(node.id)} [label={quote(label)}{attributes}];")
    for edge in graph.edges:
        if edge.routes:
            words = f"route{'s' if len(edge.routes) > 1 else ''} " + \
                ", ".join(map(str, edge.routes))
            label = f"{words}\n{rate(edge.per_s)}"
        elif graph.nodes[edge.target].type == "static":
            label = "their own hops"
        else:
            label = f"emits\n{rate(edge.per_s)}"
        style = ", style=dashed" if edge.inferred else ""
        out.append(f"  {quote(edge.source)} -> {quote(edge.target)} "
                   f"[label={quote(label)}{style}];")
    out.append("}")
    return "\n".join(out) + "\n"


# -- the command -----------------------------------------------------------------------------


def cmd_graph(args: argparse.Namespace) -> int:
    """``mmctl graph [--format text|dot]``: ask the daemon for its routes and print them."""
    from multimodule.cli.mmctl import EXIT_OK, _ask

    description = _ask(args, {"query": "graph"})["graph"]
    render = render_dot if args.format == "dot" else render_text
    sys.stdout.write(render(description))
    sys.stdout.flush()
    return EXIT_OK


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Register ``mmctl graph`` on ``sub`` (the subparsers of ``mmctl``); ``parents``: the
    transit and ``--wait`` options."""
    p = sub.add_parser(
        "graph", parents=parents, help="draw the routes, with live rates",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Ask the daemon for its tasks, the Router's routes and the monitor's "
                    "rates, and draw\nthem: each source task -> Router route N (what it "
                    "matches) -> the queue or task\nit forwards to. A task is drawn sending to "
                    "the routes that match source = \"TASK\",\nand to the Router if it emitted "
                    "(its emitted counter). External tasks, queues\nno task reads, and queues "
                    "on other hosts are marked. Rates are messages per\nsecond over the "
                    "monitor's short window (- until two samples have seen them).",
        epilog="Render the DOT output with Graphviz (Debian package graphviz):\n\n"
               "  mmctl graph --format dot | dot -Tsvg > routes.svg")
    p.add_argument("--format", choices=FORMATS, default="text",
                   help="text (default): for a terminal; dot: Graphviz DOT")
    p.set_defaults(func=cmd_graph)
