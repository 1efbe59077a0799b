"""Transit: named message queues, in-process and System V.

The public face of the transit layer (everything else in this package is private)::

    from multimodule import transit
    transit.send("Example2", {"ct": 1})           # to the System V queue, or in-memory if local
    msg = transit.receive("Example2", timeout=5)  # dict; raises transit.Empty after 5 s
    transit.stat("Example2")                      # QueueStat(messages=..., bytes=..., ...)

Module-level functions use a default :class:`Transit` made on first use from
``$MULTIMODULE_TRANSIT_DIR`` (see :func:`default_transit_dir`); :func:`configure` replaces it.
Layers, bottom up: ``_wire`` (bytes and copies), ``_directory`` (names to keys), ``_sysv`` (one
System V queue), ``_local`` (in-memory queues), ``_async`` (System V to asyncio), ``_transit``
(path choice). This plays the part of Perl's IPC::Transit, without its polling and silent drops.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from multimodule.errors import (
    BadMessage,
    Empty,
    InvalidQueueName,
    QueueFull,
    QueueRemoved,
    TransitBroken,
    TransitError,
    UnserializableMessage,
)
from multimodule.transit._async import AsyncReceiver
from multimodule.transit._directory import MAX_NAME_CHARS, default_transit_dir, validate_qname
from multimodule.transit._local import LocalQueue
from multimodule.transit._sysv import QueueStat
from multimodule.transit._transit import Transit
from multimodule.transit._wire import META_KEY

_default: Transit | None = None
_default_lock = threading.Lock()


def configure(transit_dir: str | os.PathLike[str] | None = None,
              group: str | int | None = None) -> Transit:
    """Make (and return) the default :class:`Transit` used by the module-level functions."""
    global _default
    with _default_lock:
        _default = Transit(transit_dir, group)
        return _default


def default() -> Transit:
    """The default :class:`Transit`, made from the environment on first use."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Transit()
    return _default


def send(qname: str, message: dict[str, Any], *, timeout: float | None = None,
         **meta: Any) -> None:
    """Send ``message`` to ``qname`` on the default transit; see :meth:`Transit.send`."""
    (_default or default()).send(qname, message, timeout=timeout, **meta)


def receive(qname: str, *, timeout: float | None = None) -> dict[str, Any]:
    """Receive from ``qname`` on the default transit; see :meth:`Transit.receive`."""
    return (_default or default()).receive(qname, timeout=timeout)


def stat(qname: str) -> QueueStat:
    """Figures for ``qname`` on the default transit; see :meth:`Transit.stat`."""
    return (_default or default()).stat(qname)


def declare_local(qname: str) -> LocalQueue:
    """Serve ``qname`` in memory in this process; see :meth:`Transit.declare_local`."""
    return (_default or default()).declare_local(qname)


__all__ = [
    "AsyncReceiver",
    "BadMessage",
    "Empty",
    "InvalidQueueName",
    "LocalQueue",
    "MAX_NAME_CHARS",
    "META_KEY",
    "QueueFull",
    "QueueRemoved",
    "QueueStat",
    "Transit",
    "TransitBroken",
    "TransitError",
    "UnserializableMessage",
    "configure",
    "declare_local",
    "default",
    "default_transit_dir",
    "receive",
    "send",
    "stat",
    "validate_qname",
]
