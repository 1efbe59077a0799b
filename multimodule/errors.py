"""The one error tree of multimodule.

Every exception the public API raises derives from :class:`MultiModuleError`. Families are split
by who caused the problem (the idea follows trio's and dramatiq's error modules):

- ``UsageError``: the caller's misuse (a bad queue name, a message that is not a JSON object).
- ``TransitError``: a queue operation that could not complete (full, empty, bad bytes on a queue,
  the queue removed under us, the kernel refusing).
- ``ConfigError``: configuration that does not validate.
- ``TaskError``: a task that cannot be found or imported.

Third-party exceptions (``sysv_ipc``, ``OSError``) are wrapped at the boundary with
``raise ... from exc`` so they never escape raw.
"""

from __future__ import annotations


class MultiModuleError(Exception):
    """Root of every error raised by multimodule."""


class UsageError(MultiModuleError, ValueError):
    """The caller passed something invalid (a bad name, a non-object message, a bad option)."""


class ConfigError(MultiModuleError):
    """Configuration that does not validate; the message names the file and the field."""


class TaskError(MultiModuleError):
    """A task could not be found, imported or constructed."""


class TransitError(MultiModuleError):
    """Base of the errors of the transit (queue) layer."""


class InvalidQueueName(UsageError, TransitError):
    """A queue name is empty, too long, or contains a slash, a NUL or a control character."""


class UnserializableMessage(UsageError, TransitError):
    """A message is not a JSON object (a ``dict`` with ``str`` keys and JSON-able values)."""


class QueueFull(TransitError):
    """``send`` waited ``timeout`` seconds and the queue still had no room; nothing was sent."""


class Empty(TransitError):
    """``receive`` waited ``timeout`` seconds and no message arrived; nothing was consumed."""


class BadMessage(TransitError):
    """Bytes taken from a queue were not a valid message (header, JSON, object).

    The offending bytes were consumed from the queue (they could never be delivered); the next
    message is unaffected. ``raw`` holds up to the first 256 bytes for diagnosis.
    """

    def __init__(self, reason: str, *, qname: str | None = None, raw: bytes = b""):
        self.reason = reason
        self.qname = qname
        self.raw = raw[:256]
        where = f" on queue {qname!r}" if qname else ""
        super().__init__(f"bad message{where}: {reason}")


class QueueRemoved(TransitError):
    """The System V queue behind a name was removed (``ipcrm``) while in use."""


class TransitBroken(TransitError):
    """The environment refused a queue operation (permissions, kernel limits, a bad directory).

    ``__cause__`` holds the original ``OSError`` or ``sysv_ipc`` exception.
    """
