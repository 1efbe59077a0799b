"""multimodule: message-passing tasks under one control daemon, integrated with systemd.

Public API on one page: :mod:`multimodule.transit` (``send``, ``receive``, ``stat``) and the
error tree in :mod:`multimodule.errors` (root :class:`MultiModuleError`).
"""

from multimodule.errors import MultiModuleError

__version__ = "0.1.0"

__all__ = ["MultiModuleError", "__version__"]
