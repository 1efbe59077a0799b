"""How far one task has got through its input, and the checkpoint that records it.

A task's input is numbered by its journal (:mod:`multimodule.journal`): ``position`` counts
the messages handled. The checkpoint (:class:`~multimodule.state.Checkpoint`) holds, in one
atomic file, the task's state, that position, the ids its dedupe window remembers, its timers'
tick counts and its incarnation; after a crash the task starts from it and the journal gives
back what came after. A message whose id is in the dedupe window was handled before (it came
again after a crash) and is dropped: at-least-once delivery, made once-only for the tasks that
ask (``dedupe = true|N``).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

from multimodule.errors import StateError
from multimodule.journal import Journal
from multimodule.runtime.interfaces import DeliveryGuard
from multimodule.state import Checkpoint, StateStore

#: Window of recent message ids a task with ``dedupe = true`` remembers.
DEFAULT_DEDUPE_WINDOW = 10_000


class Progress:
    """One task's position in its input, its dedupe window and its checkpoint.

    ``name``: the task's. ``stateful``: whether the checkpoint holds the task's state.
    ``store``: where the checkpoint lives (``None``: none is kept). ``journal``: the task's
    input journal (``None``: journals are off, and a stateless task keeps no checkpoint).
    ``guard``: what the host says of the overflow and the process's journals.
    ``report_error(text)``: an ``error`` record for the task; ``log(text)``: a ``log`` one.
    """

    def __init__(self, name: str, *, stateful: bool, store: StateStore | None,
                 journal: Journal | None, guard: DeliveryGuard | None,
                 report_error: Callable[[str], None], log: Callable[[str], None]):
        self.name = name
        self.stateful = stateful
        self.store = store
        self.journal = journal
        self.guard = guard
        self.report_error = report_error
        self.log = log
        self.data = Checkpoint(state={} if stateful else None)
        #: Sequence number (in the journal) of the last message handled.
        self.position = 0
        self.checkpointed_position = 0
        self.checkpointed_ticks = 0
        #: How many recent ids are remembered (0: no dedupe).
        self.window = 0
        self.recent: deque[str] = deque()
        self.recent_set: set[str] = set()
        self.duplicates_dropped = 0

    @property
    def kept(self) -> bool:
        """Whether the task keeps a checkpoint (a store, and state or a journal)."""
        return self.store is not None and (self.stateful or self.journal is not None)

    def restore(self) -> dict[str, Any] | None:
        """Load the checkpoint (problems reported, an empty one used); return the state to
        give the task (``None``: keep the task's own)."""
        if not self.kept:
            return None
        checkpoint, problem = self.store.load(self.name, self.stateful)
        if problem:
            self.report_error(problem)
        self.data = checkpoint
        self.position = self.checkpointed_position = checkpoint.position
        self.checkpointed_ticks = sum(checkpoint.ticks.values())
        self.recent.extend(checkpoint.recent_ids)
        self.recent_set.update(checkpoint.recent_ids)
        return checkpoint.state

    def recover(self) -> list[dict[str, Any]]:
        """The messages the journal holds past the checkpoint's position, oldest first (to be
        delivered again ahead of anything new); what cannot be read is reported."""
        journal = self.journal
        if journal is None:
            return []
        try:
            again = journal.recover(self.position)
        except StateError as exc:
            self.report_error(f"journal not read, its messages are not delivered again: {exc}")
            again = []
        for why in journal.bad_records:
            self.report_error(f"journal record skipped: {why}")
        for what in journal.cut_off:
            self.log(f"journal: {what}")
        if again:
            self.log(f"delivering {len(again)} messages again from the journal (not handled "
                     "before the last stop)")
        return again

    def set_window(self, dedupe: bool | int) -> None:
        """The task's ``dedupe`` setting: ``True`` (:data:`DEFAULT_DEDUPE_WINDOW` ids), a
        number of ids, or false (none)."""
        self.window = (DEFAULT_DEDUPE_WINDOW if dedupe is True
                       else int(dedupe) if dedupe else 0)
        while len(self.recent) > self.window:
            self.recent_set.discard(self.recent.popleft())

    def handled(self, message_id: Any) -> None:
        """One more message handled (or dropped as a duplicate)."""
        self.position += 1
        if self.window and message_id.__class__ is str:
            recent = self.recent
            recent.append(message_id)
            self.recent_set.add(message_id)
            if len(recent) > self.window:
                self.recent_set.discard(recent.popleft())

    def take(self, state: dict[str, Any] | None) -> bool:
        """Save the checkpoint now with ``state`` (the task's, if stateful) if anything
        changed; return whether it was saved. Not while messages the task sent wait in the
        overflow (they exist only in memory: a crash must make them again from the input
        before this position); the process's journals are written first, so every message
        the task sent in memory is journaled by its receiver. Errors are reported, not
        raised. The caller makes sure no handler of the task is half done."""
        if not self.kept:
            return False
        guard = self.guard
        if guard is not None:
            if guard.holds_from(self.name):
                return False
            try:
                guard.flush_journals()
            except StateError as exc:
                self.report_error(f"checkpoint not taken: {exc}")
                return False
        ticks = sum(self.data.ticks.values())
        if (not self.stateful and self.position == self.checkpointed_position
                and ticks == self.checkpointed_ticks):
            return False
        checkpoint = self.data
        checkpoint.position = self.position
        if self.stateful:
            checkpoint.state = state
        checkpoint.recent_ids = list(self.recent) if self.window else []
        try:
            self.store.save(self.name, checkpoint)
        except StateError as exc:
            self.report_error(str(exc))
            return False
        self.checkpointed_position = self.position
        self.checkpointed_ticks = ticks
        if self.journal is not None:
            self.journal.checkpointed(self.position)
        return True

    @property
    def since_checkpoint(self) -> int:
        """Messages handled since the last checkpoint: what a kill now would redo."""
        return self.position - self.checkpointed_position
