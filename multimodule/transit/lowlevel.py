"""Low-level transit: what the daemon and tools need beyond the public face.

Like ``trio.lowlevel``: public (importable, documented, used by :mod:`multimodule.runtime`,
``mmctl`` and the benchmarks), but not what a task or a script talking to a queue needs; that
is :mod:`multimodule.transit`. Everything here is re-exported from the private modules of the
package, which no code outside :mod:`multimodule.transit` imports.

- :func:`default`, :func:`declare_local`: the default :class:`~multimodule.transit.Transit`
  of the module-level functions, and serving a name from memory in this process on it;
- :class:`LocalQueue` (an in-memory FIFO, ``put``, ``get``, ``get_async``),
  :class:`SysvQueue` (the System V queue behind one name: ``stat``, sends and receives) and
  :class:`AsyncReceiver` (a thread feeding a System V queue's messages to an asyncio loop);
- :class:`Overflow`: sends to System V queues that never block an event loop (messages for a
  full queue are held in order and sent by a thread as room appears);
- :func:`ensure_handler`: make the interrupt signal able to stop blocking queue calls (call it
  on the main thread before timed System V operations in other threads);
- the wire format: ``HEADER_JSON + encode_body(message, make_meta({}))`` is the bytes of one
  message on a System V queue, :func:`split_header` and :func:`decode_body` read them back,
  :func:`copy_message` is the copy a local receiver gets;
- sends to other hosts (the Bridge): :func:`hostname` (this host's name,
  ``$MULTIMODULE_HOSTNAME`` or the machine's), :func:`is_remote`, :func:`addressed`,
  :func:`validate_destination`, :data:`BRIDGE_QNAME` and the meta keys
  :data:`DESTINATION_KEY`, :data:`DESTINATION_QNAME_KEY`;
- :data:`ENV_TRANSIT_DIR` (``MULTIMODULE_TRANSIT_DIR``) and :data:`SYSTEM_TRANSIT_DIR` (the
  packaged daemon's transit directory), for tools that explain which directory they use.
"""

from __future__ import annotations

from multimodule.transit._address import (
    BRIDGE_QNAME,
    DESTINATION_KEY,
    DESTINATION_QNAME_KEY,
    addressed,
    is_remote,
    validate_destination,
)
from multimodule.transit._async import AsyncReceiver
from multimodule.transit._directory import ENV_TRANSIT_DIR, SYSTEM_TRANSIT_DIR
from multimodule.transit._interrupt import ensure_handler
from multimodule.transit._local import LocalQueue
from multimodule.transit._overflow import Overflow
from multimodule.transit._sysv import SysvQueue
from multimodule.transit._transit import Transit, get_default
from multimodule.transit._wire import (
    HEADER_JSON,
    copy_message,
    decode_body,
    encode_body,
    hostname,
    make_meta,
    split_header,
)


def default() -> Transit:
    """The default :class:`~multimodule.transit.Transit` of :func:`multimodule.transit.send`
    and the other module-level functions, made from the environment on first use (or the one
    :func:`multimodule.transit.configure` made). Raises
    :class:`~multimodule.errors.TransitBroken` if its directory cannot be prepared."""
    return get_default()


def declare_local(qname: str) -> LocalQueue:
    """Serve ``qname`` in memory in this process, on the default transit; return its queue.
    Raises :class:`~multimodule.errors.InvalidQueueName`. See
    :meth:`~multimodule.transit.Transit.declare_local`."""
    return default().declare_local(qname)


__all__ = [
    "AsyncReceiver",
    "BRIDGE_QNAME",
    "DESTINATION_KEY",
    "DESTINATION_QNAME_KEY",
    "addressed",
    "ENV_TRANSIT_DIR",
    "HEADER_JSON",
    "LocalQueue",
    "Overflow",
    "SYSTEM_TRANSIT_DIR",
    "SysvQueue",
    "copy_message",
    "declare_local",
    "decode_body",
    "default",
    "encode_body",
    "ensure_handler",
    "hostname",
    "is_remote",
    "make_meta",
    "split_header",
    "validate_destination",
]
