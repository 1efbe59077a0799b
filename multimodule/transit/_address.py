"""Sends to another host: ``send(qname, message, destination="HOST")``.

A message for a queue on another host goes to the local queue of the built-in ``Bridge`` task
(:data:`BRIDGE_QNAME`), with two keys in its ``.ipc_transit_meta``: ``destination_host``
and ``destination_qname`` (the queue there). The Bridge publishes it to NATS JetStream; the
Bridge on that host delivers it into its local queue ``destination_qname`` (see
``multimodule.tasks.Bridge``). A destination equal to this host's own name
(:func:`~multimodule.transit._wire.hostname`, ``$MULTIMODULE_HOSTNAME`` or the machine's host
name) is a local send. Host names are compared without case, as DNS does: a destination is
carried in lower case. This plays the part of IPC::Transit's ``destination =>``, without its
HTTP daemon.
"""

from __future__ import annotations

from typing import Any

from multimodule.errors import InvalidDestination
from multimodule.transit._directory import validate_qname
from multimodule.transit._wire import hostname

#: The queue of the built-in Bridge task: every message for another host goes through it.
BRIDGE_QNAME = "Bridge"
#: ``.ipc_transit_meta`` keys of a message on its way to another host.
DESTINATION_KEY = "destination_host"
DESTINATION_QNAME_KEY = "destination_qname"
#: Longest host name accepted (a DNS name's limit).
MAX_DESTINATION_CHARS = 253

_REFUSED = frozenset(" \t\r\n\x0b\x0c/*>")


def validate_destination(destination: Any) -> str:
    """Return ``destination`` if it can name a host, else raise :class:`InvalidDestination`
    (not a string, empty, over 253 characters, or holding whitespace, control characters,
    ``/``, ``*`` or ``>``)."""
    if destination.__class__ is not str:
        raise InvalidDestination(f"destination must be a host name (a string), "
                                 f"not {type(destination).__name__}")
    if not destination or len(destination) > MAX_DESTINATION_CHARS:
        raise InvalidDestination(f"destination must be 1 to {MAX_DESTINATION_CHARS} "
                                 f"characters, not {len(destination)}")
    for char in destination:
        if char in _REFUSED or ord(char) < 0x20 or ord(char) == 0x7F:
            raise InvalidDestination(f"destination {destination!r} holds {char!r}: not a "
                                     "host name")
    return destination


def is_remote(destination: str | None) -> bool:
    """Whether a send with ``destination`` must cross to another host (``None`` or this
    host's own name, in any case: no). Raises :class:`InvalidDestination` for a malformed one."""
    if destination is None:
        return False
    return validate_destination(destination).lower() != hostname().lower()


def addressed(qname: str, destination: str, meta: dict[str, Any]
              ) -> tuple[str, dict[str, Any]]:
    """Where a send of ``qname`` to ``destination`` goes here: ``(qname, meta)`` unchanged for
    this host's own name, else the Bridge's queue, with ``meta`` extended by the destination
    keys. Raises :class:`InvalidDestination` (see :func:`is_remote`), and
    :class:`InvalidQueueName` for a malformed ``qname`` bound for another host (checked
    here, since the queue is made there)."""
    if not is_remote(destination):
        return qname, meta
    validate_qname(qname)
    meta = dict(meta)
    meta[DESTINATION_KEY] = destination.lower()
    meta[DESTINATION_QNAME_KEY] = qname
    return BRIDGE_QNAME, meta
