"""Finding a task's class: module ``<prefix>NAME`` defining class ``NAME``.

The built-in prefix ``multimodule.tasks.`` is tried first, then each configured prefix in
order (``-p``); a prefix is a dotted package path ending in ``.`` or the empty string (a
top-level module). Like Perl's ``use lib``, ``--task-path`` directories are added to
``sys.path``. This is the one lookup of every path (the config at start and on reload, control
messages, sends to a name not yet loaded): a top-level module is imported only if its file lies
under a ``--task-path`` directory, so no name can make the daemon import a module of the
standard library or of site-packages.
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
    # Built-in and frozen modules have no file: their origin ("built-in", "frozen") is no
    # path, and would resolve against the working directory.
    if spec is None or not spec.has_location or not spec.origin \
            or not Path(spec.origin).is_absolute():
        return False
    origin = Path(spec.origin).resolve()
    return any(origin.is_relative_to(Path(p).resolve()) for p in paths)


def find_task_class(name: str, prefixes: Sequence[str],
                    task_path: Sequence[Path]) -> type[Task]:
    """The task class for ``name``.

    A top-level module (the empty prefix) is only imported if its file lies under one of the
    ``task_path`` directories; the built-ins and the modules of a package prefix (one the
    operator named with ``-p``) are imported wherever the package is.

    Raises :class:`TaskNotFound` (no such module or class, or the class is not a ``Task``)
    or :class:`TaskImportFailed` (a module was found but failed to import).
    """
    if not is_task_name(name):
        raise TaskNotFound(f"{name!r} is not a task name (it must be a Python identifier)")
    tried = []
    not_task = []
    for prefix in (BUILTIN_PREFIX, *prefixes):
        module_name = f"{prefix}{name}"
        if "." not in module_name and not _found_under(module_name, task_path):
            continue  # a top-level module outside the task path: never imported
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



def import_afresh(cls: type[Task]) -> type[Task]:
    """Task class ``cls`` from its module imported again: compiled from the module's source
    file (never from a cached ``.pyc``, whose timestamp check could miss an edit made within
    the same second) into a new module object, which then takes the old one's place in
    ``sys.modules``. The old module and class are untouched, so what runs them goes on if
    this fails. Raises :class:`TaskImportFailed` (the module no longer imports) or
    :class:`TaskNotFound` (it no longer defines a ``Task`` subclass of that name)."""
    module_name, name = cls.__module__, cls.__name__
    old = sys.modules.get(module_name)
    spec = getattr(old, "__spec__", None)
    if spec is None or not spec.origin or not str(spec.origin).endswith(".py"):
        raise TaskImportFailed(f"task module {module_name} has no source file to import "
                               "again")
    module = importlib.util.module_from_spec(spec)
    try:
        code = compile(Path(spec.origin).read_bytes(), spec.origin, "exec", dont_inherit=True)
        sys.modules[module_name] = module  # as an import does, while the module runs
        exec(code, module.__dict__)  # noqa: S102 - the task's own module, from --task-path
    except Exception as exc:  # SyntaxError, OSError, or anything the module raised
        if old is not None:
            sys.modules[module_name] = old
        raise TaskImportFailed(f"task module {module_name} failed to import: "
                               f"{type(exc).__name__}: {exc}", traceback.format_exc()) from exc
    new = getattr(module, name, None)
    if not (isinstance(new, type) and issubclass(new, Task)):
        sys.modules[module_name] = old
        raise TaskNotFound(f"module {module_name} no longer has a Task subclass named {name}")
    return new
