"""Finding a task's class: module ``<prefix>NAME`` defining class ``NAME``.

The built-in prefix ``multimodule.tasks.`` is tried first, then each configured prefix in
order (``-p``); a prefix is a dotted package path ending in ``.`` or the empty string (a
top-level module on ``sys.path``, e.g. from ``--task-path``). Like Perl's ``use lib``,
``--task-path`` directories are added to ``sys.path``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import traceback
from pathlib import Path
from typing import Sequence

from multimodule.config import is_task_name
from multimodule.errors import TaskImportFailed, TaskNotFound
from multimodule.task import Task

BUILTIN_PREFIX = "multimodule.tasks."


def _is_missing(exc: ModuleNotFoundError, module_name: str) -> bool:
    # Only the module itself (or a parent package) missing means "not here"; a missing
    # dependency imported by the task module is an import failure.
    missing = exc.name or ""
    return module_name == missing or module_name.startswith(missing + ".")


def _found_under(module_name: str, paths: Sequence[Path]) -> bool:
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.origin:
        return False
    origin = Path(spec.origin).resolve()
    return any(origin.is_relative_to(Path(p).resolve()) for p in paths)


def find_task_class(name: str, prefixes: Sequence[str],
                    bare_paths: Sequence[Path] | None = None) -> type[Task]:
    """The task class for ``name``.

    ``bare_paths``: when given, a module found through the empty prefix (a top-level module)
    is only imported if its file lies under one of these directories (the daemon passes its
    ``--task-path`` for tasks loaded on first use, so that a queue name cannot make it import
    an arbitrary module).

    Raises :class:`TaskNotFound` (no such module or class, or the class is not a ``Task``)
    or :class:`TaskImportFailed` (a module was found but failed to import).
    """
    if not is_task_name(name):
        raise TaskNotFound(f"{name!r} is not a task name (it must be a Python identifier)")
    tried = []
    not_task = []
    for prefix in (BUILTIN_PREFIX, *prefixes):
        module_name = f"{prefix}{name}"
        if prefix == "" and bare_paths is not None and not _found_under(module_name,
                                                                        bare_paths):
            continue
        tried.append(module_name)
        try:
            # A module that failed to import is not kept in sys.modules, so the next lookup
            # (after a config change) reads the file again.
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if _is_missing(exc, module_name):
                continue
            raise TaskImportFailed(f"task module {module_name} failed to import: {exc}",
                                   traceback.format_exc()) from exc
        except Exception as exc:  # SyntaxError, or anything the module raised
            sys.modules.pop(module_name, None)
            raise TaskImportFailed(f"task module {module_name} failed to import: "
                                   f"{type(exc).__name__}: {exc}",
                                   traceback.format_exc()) from exc
        cls = getattr(module, name, None)
        if isinstance(cls, type) and issubclass(cls, Task):
            return cls
        not_task.append(f"module {module_name} has no Task subclass named {name}")
    detail = f"; {'; '.join(not_task)}" if not_task else ""
    raise TaskNotFound(f"no task {name!r} (tried modules {', '.join(tried) or 'none'}{detail})")

