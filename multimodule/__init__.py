"""multimodule: message-passing tasks under one control daemon, integrated with systemd.

The public API on one page:

- :class:`Task`: what a task derives from (``from multimodule import Task``);
- :mod:`multimodule.transit`: named queues (``send``, ``receive``, ``stat``, ``Transit``);
- the error tree, root :class:`MultiModuleError`, every class of it exported here and defined
  in :mod:`multimodule.errors` (whose docstring draws the tree and says who causes what);
- ``__version__``.

What only the daemon and tools need is in :mod:`multimodule.transit.lowlevel` and the
modules below the package (``config``, ``runtime``, ``supervise``...), not here.
"""

from multimodule import errors as _errors
from multimodule.errors import *  # noqa: F403 - the whole error tree: errors.__all__
from multimodule.task import Task

__version__ = "0.1.0"

__all__ = ["Task", "__version__", *_errors.__all__]
