"""What one process leaves in the state directory for the next: messages that full queues
could not take before it exited (``STATE_DIR/outbox.QNAME.jsonl``, one wire body per line,
sent first at the next start), and the temporary files of a save it was killed in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from multimodule.errors import BadMessage
from multimodule.state import read_own_file, remove_temp_files, write_atomic
from multimodule.transit.lowlevel import Overflow, decode_body


class Leftovers:
    """The leftovers in the state directory ``path``. ``report(channel, text, **fields)``:
    a record on an out-of-band channel (``log`` or ``error``) from the process."""

    def __init__(self, path: Path, report: Callable[..., None]):
        self.path = path
        self.report = report

    def kept_file(self, qname: str) -> Path:
        """Where messages for ``qname`` are kept across a stop."""
        return self.path / f"outbox.{qname}.jsonl"

    def keep(self, held: dict[str, list[bytes]]) -> bool:
        """Keep ``held`` (wire bodies by queue name) for the next start; whether all were
        kept (what cannot be written is reported as lost)."""
        kept_all = True
        for qname, bodies in held.items():
            path = self.kept_file(qname)
            try:
                write_atomic(path, b"".join(body + b"\n" for body in bodies))
            except OSError as exc:
                self.report("error", f"{len(bodies)} messages for full queue {qname!r} are "
                                     f"lost: cannot save them to {path}: {exc}")
                kept_all = False
                continue
            self.report("error", f"queue {qname!r} stayed full: {len(bodies)} messages kept "
                                 f"in {path} and sent when the daemon starts again")
        return kept_all

    def resend_kept(self, overflow: Overflow) -> None:
        """Send what :meth:`keep` kept at the last exit through ``overflow`` (each file is
        removed once all of it is sent). Each line is checked like a received message; one
        that is not a message is reported (file and line number) and not sent."""
        for path in sorted(self.path.glob("outbox.*.jsonl")):
            qname = path.name[len("outbox."):-len(".jsonl")]
            try:
                lines = read_own_file(path).split(b"\n")
            except OSError as exc:
                self.report("error", f"cannot read {path}: {exc}")
                continue
            bodies = []
            for number, line in enumerate(lines, 1):
                if not line:
                    continue
                try:
                    decode_body(line, qname)
                except BadMessage as exc:
                    self.report("error", f"{path} line {number}: {exc.reason}; not sent")
                    continue
                bodies.append(line)
            if not bodies:
                path.unlink(missing_ok=True)
                continue
            overflow.resend(qname, bodies, when_sent=lambda p=path: p.unlink(missing_ok=True))
            self.report("log", f"sending {len(bodies)} messages kept for queue {qname!r} at "
                               "the last exit")

    def remove_interrupted_writes(self, state_lock: str) -> None:
        """Remove the temporary files that an earlier process under the lock ``state_lock``
        left when it was killed during a save (see :func:`~multimodule.state.remove_temp_files`)."""
        try:
            removed, size = remove_temp_files(self.path, state_lock)
        except OSError as exc:
            self.report("error", f"cannot remove the temporary files an interrupted save left "
                                 f"in {self.path}: {exc}")
            return
        if removed:
            files = "file" if len(removed) == 1 else "files"
            self.report("log", f"removed {len(removed)} temporary {files} ({size} bytes) that "
                               f"an interrupted save left in {self.path}", files=sorted(removed))
