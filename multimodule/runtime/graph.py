"""What ``mmctl graph`` draws: the daemon's tasks, the Router's routes and their live rates,
as one description (the answer to a ``graph`` query; see :func:`describe`).

The description holds only plain JSON values; ``mmctl`` renders it
(:mod:`multimodule.cli.graph`). Rates are the monitor's, over its short window: ``None`` until
two samples have seen a figure.
"""

from __future__ import annotations

import datetime
from typing import Any, Iterable, Mapping

from multimodule.task import ROUTER_QNAME

#: Counters of a task that its live figures (internal tasks) give fresher than the last sample.
_LIVE_COUNTERS = ("messages_in", "messages_out", "emitted", "route_matches", "unrouted",
                  "static_forwarded", "static_forwards_refused")


def describe(rows: Iterable[Mapping[str, Any]], live: Mapping[str, Mapping[str, Any]],
             router: str, router_config: Mapping[str, Any] | None,
             queues: Iterable[Mapping[str, Any]], window_s: float) -> dict[str, Any]:
    """The description of the routes as they are.

    ``rows``: the monitor's status rows (one per task, and the daemon's, kind ``"daemon"``).
    ``live``: internal task -> its figures now (``TaskRunner.figures()``), whose counters
    replace the sample's. ``router``: the Router's name. ``router_config``: the Router's
    config in force (its ``routes`` as in the config file: ``match``, ``transform``,
    ``forwards`` of ``{qname, destination}``, ``short_circuit``), ``None`` if it has none.
    ``queues``: the monitor's rows of System V queues that are no task's (``name``,
    ``queue_fill`` 0..1 or ``None``, ``level``). ``window_s``: the rates' window, seconds.

    Returns ``{"router", "window_s", "tasks", "routes", "static_forwards", "unrouted",
    "queues"}``: ``tasks`` a list by name of ``{name, kind ("internal", "external" or
    "daemon"), state, level, in_per_s, out_per_s, emitted_per_s, messages_in, messages_out,
    emitted, queue_fill}``; ``routes`` in order, ``{number (from 1), match, transform (bool),
    short_circuit, forwards [{qname, destination}], matches, per_s}`` (``matches``: messages
    the route matched since the Router started or its routes changed; ``per_s``: per
    second); ``static_forwards`` ``{forwarded, refused, max_queues, max_copies}`` (``None``
    where unknown: a limit left at its default outside the daemon); ``unrouted`` a count or
    ``None``; ``queues`` as given. Raises nothing for odd config values (they are shown as
    strings).
    """
    tasks = []
    router_row: Mapping[str, Any] = {}
    for row in rows:
        counters = {key: row.get(key) for key in _LIVE_COUNTERS}
        counters.update({key: value for key, value in live.get(row["name"], {}).items()
                         if key in _LIVE_COUNTERS})
        if row["name"] == router:
            router_row = {**row, **counters}
        tasks.append({
            "name": row["name"], "kind": row.get("kind"), "state": row.get("state"),
            "level": row.get("level"),
            "in_per_s": row.get("messages_in_per_s"),
            "out_per_s": row.get("messages_out_per_s"),
            "emitted_per_s": row.get("emitted_per_s"),
            "messages_in": counters["messages_in"], "messages_out": counters["messages_out"],
            "emitted": counters["emitted"], "queue_fill": row.get("queue_fill"),
        })
    config = router_config or {}
    matches = router_row.get("route_matches") or []
    rates = router_row.get("route_matches_per_s") or []
    routes = []
    raw_routes = config.get("routes")
    for number, route in enumerate(raw_routes if isinstance(raw_routes, list) else [], 1):
        route = route if isinstance(route, Mapping) else {}
        forwards = route.get("forwards")
        same = len(matches) == len(raw_routes)  # counts of these routes, not of older ones
        routes.append({
            "number": number,
            "match": _plain(route.get("match") or {}),
            "transform": bool(route.get("transform")),
            "short_circuit": bool(route.get("short_circuit")),
            "forwards": [{"qname": str(f.get("qname")),
                          "destination": _plain(f.get("destination"))}
                         for f in (forwards if isinstance(forwards, list) else [])
                         if isinstance(f, Mapping)],
            "matches": matches[number - 1] if same else None,
            "per_s": rates[number - 1] if same and len(rates) == len(matches) else None,
        })
    return {
        "router": router,
        "window_s": window_s,
        "tasks": sorted(tasks, key=lambda t: t["name"]),
        "routes": routes,
        "static_forwards": {
            "forwarded": router_row.get("static_forwarded"),
            "refused": router_row.get("static_forwards_refused"),
            "max_queues": _plain(config.get("max_static_forward_queues")),
            "max_copies": _plain(config.get("max_static_forward_copies")),
        },
        "unrouted": router_row.get("unrouted"),
        "queues": [{"name": q["name"], "queue_fill": q.get("queue_fill"),
                    "level": q.get("level")} for q in queues],
    }


def _plain(value: Any) -> Any:
    """``value`` with only JSON types (a TOML date or time becomes its ISO text)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def graph_of(runners: Mapping[str, Any], configs: Any, monitor: Any) -> dict[str, Any]:
    """What ``mmctl graph`` draws (see :func:`describe`) in a daemon with the task runners
    ``runners`` (name -> :class:`~multimodule.runtime.runner.TaskRunner`), the task configs
    ``configs`` (:class:`~multimodule.runtime.configs.TaskConfigs`) and the monitor service
    ``monitor``: the Router's routes as its config in force gives them (its validated settings,
    defaults included, when it runs here), the tasks and the monitor's rates."""
    router = runners.get(ROUTER_QNAME)
    if router is not None and router.task.settings is not None:
        table = router.task.settings.model_dump(mode="json")
    else:
        table = router.task.config if router is not None \
            else configs.effective(ROUTER_QNAME)
    return describe(monitor.rows(), {n: r.figures() for n, r in runners.items()},
                    ROUTER_QNAME, table or None, monitor.queue_rows(), monitor.monitor.window_s)
