"""What a task runner is handed by the process that hosts it: narrow interfaces, so that
:class:`~multimodule.runtime.runner.TaskRunner` knows nothing of the daemon or of the external
task's process (see :class:`~multimodule.runtime.host.HostProcess`)."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol

from multimodule.journal import Journal

#: ``send(qname, message, owned=False, origin=NAME, **meta)``: how a task's sends leave it
#: (see :meth:`Task.send`; ``origin`` names the sending task, ``meta`` extra meta keys).
Send = Callable[..., None]


class DeliveryGuard(Protocol):
    """What the host tells a runner about the rest of the process (see
    :class:`~multimodule.runtime.host.HostProcess`)."""

    #: ``producer -> consumer``: the tasks held back now, each until the task here it sent
    #: to in memory catches up (read between two messages).
    held_for: Mapping[str, str]

    def blocked(self, task: str) -> bool:
        """Whether ``task`` must take no input now (the overflow is full and holds messages
        it sent: backpressure)."""

    async def wait_unblocked(self, task: str) -> None:
        """Return once :meth:`blocked` is false for ``task``."""

    def holds_from(self, task: str) -> bool:
        """Whether messages ``task`` sent wait in the overflow (its checkpoint must wait)."""

    async def wait_released(self, task: str) -> None:
        """Return once no message ``task`` sent waits in the overflow."""

    def caught_up(self, task: str, waiting: int) -> None:
        """``task`` handled a batch and has ``waiting`` messages left in memory (what waits
        for it to catch up may go on)."""

    def flush_journals(self) -> None:
        """Write every journal of the process (before a checkpoint)."""

    def journal_written(self, journal: Journal) -> None:
        """``journal`` has buffered records: have them written at the end of this turn of
        the loop."""

    def spill_path(self, task: str, local: Any, sysv: Any) -> None:
        """``task`` takes input from its in-memory queue ``local`` and from ``sysv``."""

    def stall(self, task: str, stalled: bool) -> None:
        """``task`` cannot keep up for now (or can again): hold its senders back."""


#: ``failsafe(name, reason, **fields) -> bool``: put task ``name`` in failsafe because its
#: handlers keep being cut off (``fields``: ``metric``, ``value`` for the alert); whether it is
#: being stopped in this process now (then nothing more is delivered to it).
FailsafeRequest = Callable[..., bool]
