"""The one error tree of multimodule.

Every exception multimodule raises derives from :class:`MultiModuleError`, and every one of its
exception classes is defined here. Families are split by who caused the problem (the idea
follows trio's and dramatiq's error modules)::

    MultiModuleError
        UsageError (ValueError)         the caller's misuse
            InvalidQueueName            (also a TransitError)
            UnserializableMessage       (also a TransitError)
            InvalidDestination          (also a TransitError)
        ConfigError                     the operator's configuration does not validate
        TaskError                       a task's code: not found, not importable, or hung
            TaskNotFound                    a name no module provides (misuse)
            TaskImportFailed                the task's own code or a missing dependency
            HandlerTimeout                  a handler held the event loop past its limit
        TransitError                    a queue operation that could not complete
            QueueFull, Empty                a timeout ran out (nobody's fault)
            BadMessage                      foreign or broken bytes on a queue (a sender's bug)
            QueueRemoved, TransitBroken     the environment (ipcrm, permissions, kernel limits)
            QueueCreationRefused            a new queue over the daemon's rate (a flood)
            Cancelled                       internal: a receive its owner stopped
            BridgeError                     the bridge to other hosts could not carry a message
                MessageTooLarge                 over the bridge's max_message_bytes (misuse)
        StateError                      the state directory (environment)
            AlreadyRunning                  another process holds its lock
        BackendError                    running an external task failed (environment)
            UnitError                       systemctl refused (the systemd backend)
            DetachedProcessError            a detached process could not be started or read
        CommandError                    an mmctl command failed (carries the exit status)

A bug in multimodule itself is not wrapped: it surfaces as the built-in exception
(``TypeError``, ``AssertionError``...) with its traceback. Third-party exceptions (``sysv_ipc``,
``OSError``) are wrapped at the boundary with ``raise ... from exc`` so they never escape raw;
``__cause__`` holds the original.
"""

from __future__ import annotations


class MultiModuleError(Exception):
    """Root of every error raised by multimodule."""


# -- the caller's misuse --------------------------------------------------------------------


class UsageError(MultiModuleError, ValueError):
    """The caller passed something invalid (a bad name, a non-object message, a bad option).

    Cause: the caller. Retrying with the same arguments fails the same way.
    """


class ConfigError(MultiModuleError):
    """Configuration that does not validate; the message names the file and the field
    (``Router.routes.0.forwards``) or the line and column.

    Cause: the operator's configuration (or options); the config in force is kept.
    """


# -- tasks ----------------------------------------------------------------------------------


class TaskError(MultiModuleError):
    """A task could not be found, imported or constructed, or its code hung the event loop."""


class TaskNotFound(TaskError):
    """No module ``<prefix>NAME`` with a ``Task`` subclass ``NAME`` exists for any prefix.

    Cause: the caller or the configuration named a task that is not there (or not a Python
    identifier). Raised by ``find_task_class``.
    """


class TaskImportFailed(TaskError):
    """A task module exists but raised while importing (syntax error, missing dependency).

    Cause: the task's own code (a bug) or its environment (a dependency not installed).
    ``details`` holds the formatted traceback; ``__cause__`` the exception raised.
    """

    def __init__(self, message: str, details: str):
        super().__init__(message)
        self.details = details


class TaskStartFailed(TaskError):
    """A task's instance did not take its config: its ``set_config`` raised while it was
    started with ``strict`` (a restart with new code).

    Cause: the task's own code. Raised by ``TaskRunner.start``; the restart puts the old
    version back.
    """


class HandlerTimeout(TaskError):
    """A task's message handler or scheduled work held the event loop longer than the task's
    ``handler_timeout_s`` and was interrupted: the handler watchdog raised this inside it, on
    the main thread, wherever it was (:mod:`multimodule.runtime.watchdog`).

    Cause: the task's own code (a blocking call such as ``time.sleep``, a loop that does not
    end). The runner catches it like any failure of the handler: reported on ``error`` with
    the traceback of where it was interrupted, counted (``task_message_failure`` or
    ``recur_failure``, and ``handler_timeouts``); the message it was handling is not handed
    to it again. What the handler was doing is left half done, as with ``KeyboardInterrupt``.
    Task code should let it pass: a handler that swallows it (``except Exception``) while it
    goes on blocking gets it again every second.
    """


# -- transit --------------------------------------------------------------------------------


class TransitError(MultiModuleError):
    """Base of the errors of the transit (queue) layer."""


class InvalidQueueName(UsageError, TransitError):
    """A queue name is empty, too long, or contains a slash, a NUL or a control character."""


class UnserializableMessage(UsageError, TransitError):
    """A message is not a JSON object (a ``dict`` with ``str`` keys and JSON-able values), or
    holds what JSON cannot carry exactly: NaN, an infinity, or an integer outside -2**63 ..
    2**64-1 (the text names where in the message, when it can)."""


class InvalidDestination(UsageError, TransitError):
    """A ``destination`` (another host's name, see ``send(..., destination=HOST)``) is not a
    non-empty string of at most 253 characters without whitespace, control characters, ``/``,
    ``*`` or ``>``."""


class QueueFull(TransitError):
    """``send`` waited ``timeout`` seconds and the queue still had no room; nothing was sent."""


class Empty(TransitError):
    """``receive`` waited ``timeout`` seconds and no message arrived; nothing was consumed."""


class BadMessage(TransitError):
    """Bytes taken from a queue were not a valid message (header, JSON, object, a number out
    of range, a spill reference refused).

    The offending bytes were consumed from the queue (they could never be delivered); the next
    message is unaffected. ``raw`` holds up to the first 256 bytes taken from the queue for
    diagnosis: for a spill reference, the reference only, never the spill file's content.
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


class QueueCreationRefused(TransitError):
    """A send would have created a System V queue while the daemon's rate of new queues was
    used up (``--queue-creation-rate``, ``--queue-creation-burst``); nothing was sent.

    Cause: a sender naming many new queues at once (one message fanned out to many names, or
    a flood). Raised by ``Task.send`` in the daemon to the sending task (a handler it escapes
    fails and is reported; the Router reports each forward refused); a queue that exists
    already is never refused.
    """


class Cancelled(TransitError):
    """A blocking System V receive was interrupted because its owner asked it to stop.

    Internal: raised only to a caller that passed a ``should_stop`` callable (the daemon's
    ``AsyncReceiver``, which catches it); the public ``receive`` never raises it.
    """


class BridgeError(TransitError):
    """The bridge to other hosts (the built-in ``Bridge`` task, NATS JetStream) could not
    carry a message: the server refused it, or its large-message store failed.

    Cause: the environment (the NATS servers) or, for :class:`MessageTooLarge`, the sender.
    Raised in the Bridge's handler, so it is reported on the ``error`` channel with the
    message's id and counted as a handler failure.
    """


class MessageTooLarge(BridgeError):
    """A message for another host is larger, encoded, than the bridge's
    ``max_message_bytes`` (``size`` and ``limit`` in bytes); it was not sent."""

    def __init__(self, size: int, limit: int):
        self.size = size
        self.limit = limit
        super().__init__(f"message of {size} bytes is over the bridge's max_message_bytes "
                         f"({limit} bytes): not sent to the other host")


# -- the state directory --------------------------------------------------------------------


class StateError(MultiModuleError):
    """State could not be saved (disk full, permissions, not JSON-serialisable); the previous
    file is intact. Also the family of the state directory's other errors.

    Cause: the environment (or a task whose state is not JSON). Raised by ``StateStore.save``.
    """


class AlreadyRunning(StateError):
    """Another process holds the lock on this state directory; ``pid`` is its pid (or None).

    A :class:`StateError` because the lock guards the state directory: two daemons (or two
    processes of one external task) on one directory would overwrite each other's state files.
    Cause: the environment (another process), not a misuse of the API. Raised by
    ``InstanceLock.acquire``.
    """

    def __init__(self, message: str, pid: int | None):
        super().__init__(message)
        self.pid = pid


# -- the backends of external tasks ---------------------------------------------------------


class BackendError(MultiModuleError):
    """Starting, stopping or reading an external task failed; ``status`` and ``stderr`` come
    from the command run, if one was (else ``None`` and ``""``).

    Cause: the environment (systemd, permissions, the process table). Catch this, not a
    subclass, to handle either backend.
    """

    def __init__(self, message: str, status: int | None = None, stderr: str = ""):
        super().__init__(message + (f": {stderr.strip()}" if stderr.strip() else ""))
        self.status = status
        self.stderr = stderr


class UnitError(BackendError):
    """The systemd backend failed: ``systemctl`` exited non-zero (``status``, ``stderr``) or
    could not run, or a unit drop-in could not be read or written (``__cause__``)."""


class DetachedProcessError(BackendError):
    """The detached backend failed: a task's process could not be started, its log opened,
    or ``/proc/locks`` read (``__cause__`` holds the ``OSError``)."""


# -- the command-line tool ------------------------------------------------------------------


class CommandError(MultiModuleError):
    """An ``mmctl`` command failed; ``status`` is the exit status to use (1 failed, 2 bad input,
    3 the daemon did not answer, 4 no such task), and the message says which cause it was."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


__all__ = [
    "AlreadyRunning",
    "BackendError",
    "BadMessage",
    "BridgeError",
    "Cancelled",
    "CommandError",
    "ConfigError",
    "DetachedProcessError",
    "Empty",
    "HandlerTimeout",
    "InvalidDestination",
    "InvalidQueueName",
    "MessageTooLarge",
    "MultiModuleError",
    "QueueCreationRefused",
    "QueueFull",
    "QueueRemoved",
    "StateError",
    "TaskError",
    "TaskImportFailed",
    "TaskStartFailed",
    "TaskNotFound",
    "TransitBroken",
    "TransitError",
    "UnitError",
    "UnserializableMessage",
    "UsageError",
]
