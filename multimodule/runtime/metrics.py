"""The monitor's figures for Prometheus (``--metrics-listen ADDR:PORT``; needs the optional
``prometheus_client`` package): ``multimodule_task_*`` gauges labelled by task and kind."""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from multimodule.config import split_address
from multimodule.oob import Channels

SOURCE = "MultiModule"


def serve_metrics(address: str, rows: Callable[[], list[dict[str, Any]]],
                  loop: asyncio.AbstractEventLoop, channels: Channels) -> Any:
    """Serve ``rows()`` (called on ``loop``) on ``ADDR:PORT`` in a thread of its own; return
    the server (``.shutdown()`` stops it), or ``None`` if it cannot run (reported)."""
    try:
        from prometheus_client import start_http_server
        from prometheus_client.registry import CollectorRegistry
    except ImportError:
        channels.emit("error", SOURCE, "--metrics-listen needs the prometheus_client "
                                       "package; not serving")
        return None
    host, port = split_address(address)
    registry = CollectorRegistry()
    registry.register(PrometheusCollector(rows, loop))
    try:
        server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        channels.emit("error", SOURCE, f"cannot serve metrics on {address}: {exc}")
        return None
    channels.emit("log", SOURCE, f"serving metrics on http://{host}:{port}/metrics")
    return server


#: Row field -> (metric name, help) for the Prometheus exposition.
PROMETHEUS_GAUGES = {
    "messages_in_per_s": ("multimodule_task_messages_in_per_second",
                          "Messages handled per second over the short window"),
    "messages_out_per_s": ("multimodule_task_messages_out_per_second",
                           "Messages sent per second over the short window"),
    "cpu_percent": ("multimodule_task_cpu_percent", "CPU use, percent of one core"),
    "memory_bytes": ("multimodule_task_memory_bytes",
                     "Memory in use, bytes (internal task: the estimated deep size of its "
                     "objects; daemon: its process's less its internal tasks')"),
    "process_memory_bytes": ("multimodule_task_process_memory_bytes",
                             "Memory of the daemon's whole process, bytes (daemon row only)"),
    "open_fds": ("multimodule_task_open_fds", "Open file descriptors"),
    "threads": ("multimodule_task_threads", "Threads"),
    "queue_fill": ("multimodule_task_queue_fill_ratio", "Fill of the task's System V queue"),
    "queue_depth": ("multimodule_task_queue_depth", "Messages in the task's memory queue"),
    "restarts": ("multimodule_task_restarts", "Restarts counted by the backend"),
    "message_failures": ("multimodule_task_message_failures", "Handler failures"),
}

#: The Bridge's figures that go up and down; the others are counters (``..._total``).
BRIDGE_GAUGES = frozenset({"bridge_connected", "bridge_pending_acks", "bridge_lag"})
#: Help of the Bridge's figures (row fields ``bridge_*``, exported as ``multimodule_bridge_*``;
#: counters get prometheus_client's ``_total`` suffix).
BRIDGE_HELP = {
    "bridge_connected": "1 while the Bridge is connected to a NATS server",
    "bridge_published": "Messages published to other hosts and acknowledged by JetStream",
    "bridge_delivered": "Messages from other hosts delivered into local queues",
    "bridge_pending_acks": "Publishes waiting for JetStream's acknowledgement",
    "bridge_redeliveries_dropped": "Messages JetStream delivered again, dropped by sequence",
    "bridge_reconnects": "Reconnections to NATS since the Bridge started",
    "bridge_lag": "Messages for this host in the stream not yet delivered",
    "bridge_publish_retries": "Publishes tried again after a failure or timeout",
    "bridge_refused": "Messages refused (too large, no destination, not decodable)",
    "bridge_deliveries_missed": "Deliveries that never reached the Bridge (taken again)",
    "bridge_publish_duplicates": "Publishes JetStream had already (same Nats-Msg-Id)",
}

LEVEL_NUMBER = {"ok": 0, "warn": 1, "severe": 2, "failsafe": 3}


class PrometheusCollector:
    """Exposes status rows, built at scrape time by ``rows()`` on ``loop`` (the server runs
    in its own thread; the monitor belongs to the loop)."""

    #: Seconds a scrape waits for the loop.
    SCRAPE_WAIT_S = 5.0

    def __init__(self, rows: Callable[[], list[dict[str, Any]]],
                 loop: asyncio.AbstractEventLoop):
        self.rows = rows
        self.loop = loop

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        async def rows() -> list[dict[str, Any]]:
            return self.rows()

        rows = asyncio.run_coroutine_threadsafe(rows(), self.loop).result(self.SCRAPE_WAIT_S)
        families = {field: GaugeMetricFamily(name, text, labels=["task", "kind"])
                    for field, (name, text) in PROMETHEUS_GAUGES.items()}
        level = GaugeMetricFamily("multimodule_task_level",
                                  "Worst level: 0 ok, 1 warn, 2 severe, 3 failsafe",
                                  labels=["task", "kind"])
        running = GaugeMetricFamily("multimodule_task_running",
                                    "1 while the task runs, 0 when stopped, failed or in "
                                    "failsafe", labels=["task", "kind"])
        failsafe = GaugeMetricFamily("multimodule_task_failsafe",
                                     "1 while the task is held in failsafe",
                                     labels=["task", "kind"])
        bridge: dict[str, Any] = {}
        for row in rows:
            labels = [row["name"], row["kind"]]
            for field, family in families.items():
                if row.get(field) is not None:
                    family.add_metric(labels, float(row[field]))
            for field, value in row.items():
                if field.startswith("bridge_") and isinstance(value, (int, float)):
                    if field not in bridge:
                        kind = GaugeMetricFamily if field in BRIDGE_GAUGES \
                            else CounterMetricFamily  # counts since the Bridge started
                        bridge[field] = kind(f"multimodule_{field}",
                                             BRIDGE_HELP.get(field, field),
                                             labels=["task", "kind"])
                    bridge[field].add_metric(labels, float(value))
            level.add_metric(labels, LEVEL_NUMBER.get(row["level"], 0))
            running.add_metric(labels, 1 if row["state"] == "running" else 0)
            failsafe.add_metric(labels, 1 if row["state"] == "failsafe" else 0)
        yield from families.values()
        yield from (level, running, failsafe)
        yield from bridge.values()
