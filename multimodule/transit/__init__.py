"""Transit: named message queues, in-process and System V.

The public face of the transit layer::

    from multimodule import transit
    transit.send("Example2", {"ct": 1})           # to the System V queue, or in-memory if local
    msg = transit.receive("Example2", timeout=5)  # dict; raises transit.Empty after 5 s
    transit.stat("Example2")                      # QueueStat(messages=..., bytes=..., ...)

    t = transit.Transit("/some/dir")               # an explicit transit directory
    t.send("Example2", {"ct": 2})

Module-level functions use a default :class:`Transit` made on first use from
``$MULTIMODULE_TRANSIT_DIR`` (see :func:`default_transit_dir`); :func:`configure` replaces it.
Errors are the transit family of :mod:`multimodule.errors` (root :class:`TransitError`),
exported here too. What only the daemon and tools need (the default transit itself, local
queues, the asyncio receiver, the wire helpers) is in :mod:`multimodule.transit.lowlevel`;
every other module of this package is private.

Layers, bottom up: ``_wire`` (bytes and copies), ``_directory`` (names to keys), ``_sysv`` (one
System V queue), ``_local`` (in-memory queues), ``_async`` (System V to asyncio), ``_transit``
(path choice). This plays the part of Perl's IPC::Transit, without its polling and silent drops.
"""

from __future__ import annotations

import os
from typing import Any

from multimodule.errors import (
    BadMessage,
    Empty,
    InvalidDestination,
    InvalidQueueName,
    QueueFull,
    QueueCreationRefused,
    QueueRemoved,
    TransitBroken,
    TransitError,
    UnserializableMessage,
)
from multimodule.transit._directory import MAX_NAME_CHARS, default_transit_dir, validate_qname
from multimodule.transit._sysv import QueueStat
from multimodule.transit._transit import Transit, get_default, set_default
from multimodule.transit._wire import META_KEY

def configure(transit_dir: str | os.PathLike[str] | None = None,
              group: str | int | None = None) -> Transit:
    """Make (and return) the default :class:`Transit` used by the module-level functions.

    ``transit_dir``: default :func:`default_transit_dir`; ``group``: see :class:`Transit`.
    Raises :class:`TransitBroken` if the directory cannot be prepared.
    """
    return set_default(transit_dir, group)


def send(qname: str, message: dict[str, Any], *, timeout: float | None = None,
         destination: str | None = None, **meta: Any) -> None:
    """Send ``message`` (a JSON object) to ``qname`` on the default transit.

    ``timeout``: seconds to wait for room in a full queue (``None``: forever).
    ``destination``: another host's name, to send to its queue ``qname`` through the Bridge
    (NATS JetStream; this host's own name is a local send). Extra keyword arguments go into
    the message's ``.ipc_transit_meta``. Raises :class:`InvalidQueueName`,
    :class:`InvalidDestination`, :class:`UnserializableMessage`, :class:`QueueFull` or
    :class:`TransitBroken`; see :meth:`Transit.send`.
    """
    get_default().send(qname, message, timeout=timeout, destination=destination, **meta)


def receive(qname: str, *, timeout: float | None = None) -> dict[str, Any]:
    """The next message of ``qname`` on the default transit, a ``dict`` carrying
    ``.ipc_transit_meta``. ``timeout``: seconds to wait (``0``: do not wait, ``None``:
    forever). Raises :class:`Empty`, :class:`BadMessage` (those bytes are consumed),
    :class:`InvalidQueueName`, :class:`TransitBroken`; see :meth:`Transit.receive`."""
    return get_default().receive(qname, timeout=timeout)


def stat(qname: str) -> QueueStat:
    """Figures for ``qname`` on the default transit (messages, bytes, max_bytes, last send
    and receive); raises :class:`TransitError` if no such queue. See :meth:`Transit.stat`."""
    return get_default().stat(qname)


__all__ = [
    "BadMessage",
    "Empty",
    "InvalidDestination",
    "InvalidQueueName",
    "MAX_NAME_CHARS",
    "META_KEY",
    "QueueFull",
    "QueueCreationRefused",
    "QueueRemoved",
    "QueueStat",
    "Transit",
    "TransitBroken",
    "TransitError",
    "UnserializableMessage",
    "configure",
    "default_transit_dir",
    "receive",
    "send",
    "stat",
    "validate_qname",
]
