"""The :class:`Transit` object: one transit directory, this process's local queues, and the
choice of path for each send."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import sysv_ipc

from multimodule.errors import QueueRemoved, TransitBroken, TransitError
from multimodule.transit import _address, _wire
from multimodule.transit._async import AsyncReceiver, Deliver, Intercept, OnError
from multimodule.transit._directory import (
    ENV_TRANSIT_GROUP,
    TransitDirectory,
    default_transit_dir,
    shared_group_of,
    validate_qname,
)
from multimodule.transit._local import LocalQueue
from multimodule.transit._sysv import QueueStat, SysvQueue, kernel_msgmax, proc_queue_table


class Transit:
    """Named message queues over one transit directory.

    ``transit_dir``: the directory (default: :func:`default_transit_dir`). ``group``: a group
    name or id to share queues with (default ``$MULTIMODULE_TRANSIT_GROUP``, else the group of
    an existing directory shared with one (mode 0770), else private).

    A send goes to this process's in-memory queue if the name was declared local with
    :meth:`declare_local`, else to the System V queue of that name. Thread-safe.
    Raises :class:`TransitBroken` if the directory cannot be prepared.
    """

    def __init__(self, transit_dir: str | os.PathLike[str] | None = None,
                 group: str | int | None = None):
        path = Path(transit_dir) if transit_dir is not None else default_transit_dir()
        if group is None:
            group = os.environ.get(ENV_TRANSIT_GROUP) or shared_group_of(path)
        self.directory = TransitDirectory(path, group)
        self.msgmax = kernel_msgmax()
        self._sysv: dict[str, SysvQueue] = {}
        self._local: dict[str, LocalQueue] = {}
        self._lock = threading.Lock()
        #: :meth:`fills`' memory: name -> (key, queue id, capacity in bytes).
        self._fill_cache: dict[str, tuple[int, int, int]] = {}

    @property
    def path(self) -> Path:
        """The transit directory."""
        return self.directory.path

    # -- paths -----------------------------------------------------------------------------

    def sysv_queue(self, qname: str) -> SysvQueue:
        """The System V queue for ``qname`` (opened, or created, on first use)."""
        queue = self._sysv.get(qname)
        return queue if queue is not None else self._keep(qname, None)

    def sysv_queue_if_exists(self, qname: str) -> SysvQueue | None:
        """The System V queue for ``qname`` if it exists (opened and kept, as
        :meth:`sysv_queue` does), else ``None``: never creates one."""
        queue = self._sysv.get(qname)
        if queue is not None:
            return queue
        validate_qname(qname)
        existing = self._open_existing(qname)
        return None if existing is None else self._keep(qname, existing)

    def _keep(self, qname: str, existing: sysv_ipc.MessageQueue | None) -> SysvQueue:
        """``qname``'s :class:`SysvQueue`, made once (from ``existing``, else opened or
        created) and kept for later calls."""
        validate_qname(qname)
        with self._lock:
            queue = self._sysv.get(qname)
            if queue is None:
                queue = self._sysv[qname] = SysvQueue(self.directory, qname, self.msgmax,
                                                      existing=existing)
        return queue

    def declare_local(self, qname: str) -> LocalQueue:
        """Serve ``qname`` from an in-memory queue in this process from now on; return it.

        Sends from this process then cost no system call (the receiver gets its own copy,
        made in C by orjson). Other processes still reach the name over System V; pair this with
        :meth:`receiver` to bring those messages into the same local queue. Idempotent.
        """
        validate_qname(qname)
        with self._lock:
            queue = self._local.get(qname)
            if queue is None:
                queue = self._local[qname] = LocalQueue(qname)
        return queue

    def undeclare_local(self, qname: str) -> list[dict[str, Any]]:
        """Stop serving ``qname`` locally; return the messages still waiting (oldest first).

        The caller decides where they go (the daemon sends them on over System V, ahead of
        anything sent later), so none is lost.
        """
        with self._lock:
            queue = self._local.pop(qname, None)
        return queue.drain() if queue is not None else []

    def local_queue(self, qname: str) -> LocalQueue | None:
        """The local queue for ``qname``, or ``None`` if it is not declared local."""
        return self._local.get(qname)

    def is_local(self, qname: str) -> bool:
        """Whether sends to ``qname`` from this process stay in memory."""
        return qname.__class__ is str and qname in self._local

    # -- the public operations -------------------------------------------------------------

    def send(self, qname: str, message: dict[str, Any], *, timeout: float | None = None,
             destination: str | None = None, **meta: Any) -> None:
        """Send ``message`` (a JSON object) to queue ``qname``.

        ``timeout``: seconds to wait for room in a full System V queue (``None``: for ever;
        ``0``: not at all). ``meta``: extra keys for ``.ipc_transit_meta`` (which always gets
        ``id``, ``send_ts`` and ``source_hostname``, kept from the message's own meta if it
        has one with an ``id``: see ``_wire.meta_for``). The caller's dict is not modified.

        ``destination``: another host's name: the message goes to queue ``qname`` there,
        through this host's ``Bridge`` task (see ``_address``); this host's own name, or
        ``None``, is a local send.

        Raises :class:`InvalidQueueName`, :class:`InvalidDestination`,
        :class:`UnserializableMessage`, :class:`QueueFull` (nothing was sent),
        :class:`TransitBroken`.
        """
        if destination is not None:
            qname, meta = _address.addressed(qname, destination, meta)
        try:
            local = self._local.get(qname)
        except TypeError:  # unhashable: not a name
            validate_qname(qname)
            raise
        if local is not None:
            local.put(_wire.copy_message(message, _wire.meta_for(message, meta)))
            return
        self.send_sysv(qname, message, timeout=timeout, **meta)

    def send_sysv(self, qname: str, message: dict[str, Any], *, timeout: float | None = None,
                  **meta: Any) -> None:
        """Like :meth:`send`, but always over the System V queue, even for a name this process
        declared local (a task here that is far behind takes part of its input from there,
        see ``runtime.delivery``). Raises as :meth:`send`."""
        validate_qname(qname)
        queue = self._sysv.get(qname) or self.sysv_queue(qname)
        body = _wire.encode_body(message, _wire.meta_for(message, meta))
        try:
            queue.send_body(body, timeout)
        except QueueRemoved:
            queue.reopen()
            queue.send_body(body, timeout)

    def send_owned(self, qname: str, message: dict[str, Any], **meta: Any) -> None:
        """Like :meth:`send`, but a local receiver gets ``message`` itself, not a copy.

        For callers that give the message and everything in it away (the Router forwarding a
        message it received). The message must hold only JSON values: it is not checked on
        the local path. System V destinations behave exactly as with :meth:`send`.
        """
        local = self._local.get(qname)
        if local is not None:
            message[_wire.META_KEY] = _wire.meta_for(message, meta)
            local.put(message)
            return
        self.send(qname, message, **meta)

    def receive(self, qname: str, *, timeout: float | None = None) -> dict[str, Any]:
        """Take the next message from queue ``qname``, waiting up to ``timeout`` seconds.

        ``timeout=None`` blocks until a message comes; ``timeout=0`` does not block. A name
        declared local is served from memory. Raises :class:`Empty` when the time is up,
        :class:`BadMessage` when the bytes taken were not a valid message (they are consumed;
        call again for the next one), :class:`InvalidQueueName`, :class:`TransitBroken`.
        """
        if qname.__class__ is not str:
            validate_qname(qname)
        local = self._local.get(qname)
        if local is not None:
            return local.get(timeout)
        queue = self._sysv.get(qname) or self.sysv_queue(qname)
        try:
            payload = queue.receive_payload(timeout)
        except QueueRemoved:
            queue.reopen()
            payload = queue.receive_payload(timeout)
        return queue.decode(payload)

    def stat(self, qname: str) -> QueueStat:
        """Figures for ``qname``: the local queue's if declared local here, else the System V
        queue's (opening it if the name is registered). Raises :class:`TransitError` for a name
        that no process has used yet.
        """
        validate_qname(qname)
        local = self._local.get(qname)
        if local is not None:
            return local.stat()
        if qname not in self._sysv and self.directory.lookup_key(qname) is None:
            raise TransitError(f"no queue named {qname!r} in {self.path}")
        queue = self.sysv_queue(qname)
        try:
            return queue.stat()
        except QueueRemoved:
            queue.reopen()
            return queue.stat()

    def queues(self) -> list[QueueStat]:
        """Figures for every System V queue registered in the transit directory, by name
        (never creating one: a queue removed meanwhile is left out)."""
        out = []
        for name in self.directory.names():
            try:
                validate_qname(name)
                queue = self._open_existing(name)
                if queue is not None:
                    out.append(SysvQueue(self.directory, name, self.msgmax,
                                         existing=queue).stat())
            except TransitError:
                continue  # a stray file, or a queue removed between listing and reading
        return out

    def fills(self) -> dict[str, float | None]:
        """Name -> fill (bytes waiting / capacity, 0.0 to 1.0) of every System V queue
        registered in the transit directory (for the resource monitor): one listing of the
        directory and one read of the kernel's table for all. A name's key and its queue's
        capacity are remembered (per queue id, so a queue made anew is looked at again):
        nothing is opened or read per queue once seen, and no queue is created."""
        table = proc_queue_table()
        cache = self._fill_cache
        out: dict[str, float | None] = {}
        names = self.directory.names()
        for name in names:
            known = cache.get(name)
            key = known[0] if known is not None else None
            if key not in table:  # not seen yet, or registered anew under another key
                key = self._registered_key(name)
                if key is None or key not in table:
                    continue  # not a queue name, or its queue is gone
            queue_id, cbytes = table[key]
            if known is None or known[1] != queue_id:
                queue = self._open_existing(name)
                if queue is None or queue.id != queue_id:
                    continue  # removed (and maybe made anew) between the two reads
                known = cache[name] = (key, queue_id, queue.max_size)
            out[name] = cbytes / known[2] if known[2] else None
        if len(cache) > len(out):
            for name in set(cache) - set(out):
                del cache[name]
        return out

    def _registered_key(self, name: str) -> int | None:
        try:
            validate_qname(name)
            return self.directory.lookup_key(name)
        except TransitError:
            return None

    def receiver(self, qname: str, deliver: Deliver, *, on_error: OnError | None = None,
                 max_pending: int = 64, backlog=None, high_water: int = 256,
                 commit=None, intercept: Intercept | None = None) -> AsyncReceiver:
        """An :class:`AsyncReceiver` (not yet started) for the System V queue ``qname``.

        For a name declared local, pass ``self.local_queue(qname).put`` as ``deliver`` (and
        its ``__len__`` as ``backlog``) so messages from other processes join the same
        in-order queue and stay in the kernel while the consumer is behind. ``commit``: see
        :class:`AsyncReceiver` (messages are taken off only after it returned);
        ``intercept``: see :class:`AsyncReceiver`.
        """
        return AsyncReceiver(self.sysv_queue(qname), deliver, on_error=on_error,
                             max_pending=max_pending, backlog=backlog, high_water=high_water,
                             commit=commit, intercept=intercept)

    def _open_existing(self, qname: str) -> sysv_ipc.MessageQueue | None:
        """The live System V queue of ``qname``, opened without creating it, or ``None``."""
        key = self.directory.lookup_key(qname)
        if key is None:
            return None
        try:
            return self.directory.open_key(qname, key, self.msgmax)
        except (sysv_ipc.Error, OSError, TransitBroken):  # gone, or not ours to open
            return None

    def send_if_exists(self, qname: str, message: dict[str, Any]) -> bool:
        """Send ``message`` to ``qname``'s System V queue only if that queue exists now,
        without creating or caching it, and without waiting (for replies to clients that may
        have given up and removed their queue). Large messages spill as usual. Returns
        whether it was sent."""
        try:
            validate_qname(qname)
        except TransitError:
            return False
        queue = self._open_existing(qname)
        if queue is None:
            return False
        body = _wire.encode_body(message, _wire.meta_for(message, {}))
        try:
            SysvQueue(self.directory, qname, self.msgmax, existing=queue).send_body(body, 0)
        except TransitError:
            return False  # full or gone: the client times out
        return True

    def exists(self, qname: str) -> bool:
        """Whether ``qname`` is local here or has a live System V queue (without creating)."""
        if self.is_local(qname):
            return True
        validate_qname(qname)
        return self._open_existing(qname) is not None

    def remove(self, qname: str) -> None:
        """Delete ``qname``'s System V queue, its waiting messages and its name."""
        with self._lock:
            self._sysv.pop(qname, None)
        self.directory.forget(qname)

    def remove_all(self) -> None:
        """Delete every queue registered in the transit directory (for tests and purges)."""
        for name in self.directory.names():
            try:
                self.remove(name)
            except TransitError:
                continue
        for spill in self.directory.spill_path.iterdir():
            spill.unlink(missing_ok=True)


# The default Transit of the module-level functions (``multimodule.transit.send`` ...).
_default: Transit | None = None
_default_lock = threading.Lock()


def set_default(transit_dir: str | os.PathLike[str] | None = None,
                group: str | int | None = None) -> Transit:
    """Make (and return) the default :class:`Transit`. Raises :class:`TransitBroken` if the
    directory cannot be prepared."""
    global _default
    with _default_lock:
        _default = Transit(transit_dir, group)
        return _default


def get_default() -> Transit:
    """The default :class:`Transit`, made from the environment on first use."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Transit()
    return _default
