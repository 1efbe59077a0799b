"""multimodule: message-passing tasks under one control daemon, integrated with systemd.

The public API on one page: :class:`Task` (what a task derives from),
:mod:`multimodule.transit` (``send``, ``receive``, ``stat``), and the error tree in
:mod:`multimodule.errors` (root :class:`MultiModuleError`).
"""

from multimodule.errors import MultiModuleError
from multimodule.task import Task

__version__ = "0.1.0"

__all__ = ["MultiModuleError", "Task", "__version__"]
