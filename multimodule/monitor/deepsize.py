"""Memory of internal tasks: the deep size of each task's objects, within a budget.

Internal tasks share the daemon's process, so no process or cgroup figure is theirs alone. An
internal task's memory figure is the *deep size* of its instance: the ``sys.getsizeof`` of
every object reachable from the instance's attributes (its ``state``, ``config`` and
whatever else it keeps in ``self``), each object counted once per task. This is the recursive
``sizeof`` recipe the Python documentation of ``sys.getsizeof`` points to, as Pympler's
``asizeof`` does it; ``getsizeof`` includes the garbage collector's header of the object.

What the walk follows: dicts (keys and values), lists, tuples, sets, frozensets, deques, and
the objects of classes defined outside the standard library and this package (a task's own
classes, a third-party library's), through ``gc.get_referents``: no code of the task runs
while it walks (no ``__iter__``, ``__getattr__`` or property is called; a container subclass
is read through its built-in base), and an instance dict not yet made is not made. Every other
object of the standard library (a socket, a lock, an event loop, a datetime) is a leaf: its
shallow size only. Modules, classes, functions, methods and code count 0 (the program, not the
task's data), and so do objects of this package's own modules (the task's host, its counters:
the framework's), except the task instance itself.

Budget: of a container with more than ``sample_items`` items, ``sample_items`` are walked (a
list's or tuple's evenly spaced; a dict's or deque's first and last halves and a set's first
ones, which cost nothing to reach) and the rest is estimated as their mean size times the count; and one task's
walk visits at most ``max_objects`` objects (the rest of each container open then is estimated
from the items it visited). So the cost of one task does not grow with its size, and the
figure of a large task is an estimate (:attr:`SizeEstimate.exact` says whether it is). The
budget left is shared out among a container's items as the walk reaches them, so a large
attribute cannot leave the next ones unvisited.
:class:`MemoryAttribution` spreads the walks of many tasks over samples within a budget of
objects per sample. ``bench/monitor.py`` measures the cost, and the error against a full walk.

What the figure cannot see (it stays in the daemon's own memory, see
:meth:`~multimodule.monitor.monitor.Monitor.tick`):

- memory that ``__sizeof__`` does not report: buffers of C extension objects that do not
  count them, the buffer under a ``memoryview``, memory-mapped files;
- what the task keeps outside its instance: module globals, class attributes, closures of
  functions, objects reachable only from a coroutine's frame or a scheduled callback, the
  items of standard library objects other than the containers above (an ``asyncio.Queue``);
- the allocator's share: memory freed but kept by pymalloc or malloc, fragmentation;
- the messages waiting in the task's in-memory queue (its ``queue_depth``: like a full
  System V queue, the senders' backpressure rather than the task's fault), and the copy of its
  last saved state the state store keeps.

An object two tasks both reach is charged to each. Sampling assumes a container's items are
alike: a container of items of very different sizes may be over- or under-estimated; one
that holds the same object many times is over-estimated (each sampled repeat after the first
counts 0, but the first one is scaled by the count); and items that two large containers
share (an index over a list of records) are counted in each, since the two samples differ.
"""

from __future__ import annotations

import gc
import sys
import time
import types
import weakref
from collections import OrderedDict, deque
from dataclasses import dataclass
from itertools import islice
from typing import Any, Callable, Iterable, Mapping

#: Items of a container walked before the rest is estimated from them.
DEFAULT_SAMPLE_ITEMS = 32

#: Objects one task's walk visits at most.
DEFAULT_MAX_OBJECTS = 4_000

#: Objects all the walks of one sample visit at most (at least one task is walked each
#: sample; the others keep their last figure until their turn comes).
DEFAULT_OBJECTS_PER_SAMPLE = 10_000

#: Nesting deeper than this is counted shallow (and makes the figure an estimate).
MAX_DEPTH = 100

#: Types whose objects are leaves: ``getsizeof`` is their whole size.
_LEAF_TYPES = frozenset({str, bytes, bytearray, int, float, bool, complex, type(None),
                         range, slice, memoryview})

#: The program rather than its data: counted 0, never followed.
_PROGRAM_TYPES = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType,
                  types.MethodType, types.CodeType, types.MethodDescriptorType,
                  types.WrapperDescriptorType, types.GetSetDescriptorType,
                  types.MemberDescriptorType, property, staticmethod, classmethod)

#: Standard library classes whose objects are followed like a task's own (data holders).
_FOLLOWED_STDLIB = frozenset({types.SimpleNamespace})

#: Modules whose objects count 0: the framework's (the task instance itself excepted).
_FRAMEWORK_PREFIX = "multimodule."


@dataclass(frozen=True)
class SizeEstimate:
    """The deep size of one object graph: ``bytes``; ``objects`` visited; ``exact``: no
    container was sampled and no budget cut the walk short (else ``bytes`` is an estimate)."""

    bytes: int
    objects: int
    exact: bool


#: What the walk does with an object of a class: count it 0, count its shallow size only, or
#: count it and walk into what it refers to.
ZERO, SHALLOW, FOLLOW = 0, 1, 2

#: Classes a cache of decisions keeps at most (a task making classes on the fly must not
#: make it grow without end).
MAX_CACHED_CLASSES = 10_000


def _kind(cls: type, cache: dict[type, int]) -> int:
    """:data:`ZERO`, :data:`SHALLOW` or :data:`FOLLOW` for an object of ``cls`` that is not
    a container (see the module docstring)."""
    kind = cache.get(cls)
    if kind is None:
        module = getattr(cls, "__module__", None) or "builtins"
        if issubclass(cls, _PROGRAM_TYPES) or module == "multimodule" \
                or module.startswith(_FRAMEWORK_PREFIX):
            kind = ZERO
        elif cls in _FOLLOWED_STDLIB or module.partition(".")[0] not in sys.stdlib_module_names:
            kind = FOLLOW
        else:
            kind = SHALLOW
        if len(cache) >= MAX_CACHED_CLASSES:
            cache.clear()
        cache[cls] = kind
    return kind


def _ends(items: Callable[[], Iterable[Any]], backwards: Callable[[], Iterable[Any]],
          count: int, wanted: int) -> list[Any]:
    """``wanted`` of ``count`` items: the first half from ``items()``, the rest from the
    end (``backwards()``); O(wanted), whatever ``count``."""
    head = wanted // 2
    return list(islice(items(), head)) + list(islice(backwards(), wanted - head))


def deep_size(root: Any, *, max_objects: int = DEFAULT_MAX_OBJECTS,
              sample_items: int = DEFAULT_SAMPLE_ITEMS,
              cache: dict[type, int] | None = None) -> SizeEstimate:
    """The deep size in bytes of ``root`` and what it reaches (see the module docstring for
    what is followed, what is sampled and what cannot be seen). ``root`` itself is walked
    into whatever its class (a task of this package's too). ``max_objects`` and
    ``sample_items``: the budget (at least 1 each). ``cache``: what to do with each class,
    kept between calls (optional). Raises whatever an object's ``__sizeof__``
    raises, and ``RuntimeError`` if another thread changes a container while it is walked."""
    if max_objects < 1 or sample_items < 1:
        raise ValueError("max_objects and sample_items must be at least 1")
    kinds: dict[type, int] = {} if cache is None else cache
    seen: set[int] = set()
    visited = 0
    exact = True
    getsizeof = sys.getsizeof
    leaves = _LEAF_TYPES

    def walk_items(pick: list[Any], count: int, depth: int, pairs: bool, stop: int) -> float:
        """Sum of the sizes of ``pick`` (``pairs``: (key, value) tuples, both counted),
        scaled up to ``count`` items if fewer were walked. The walk stops once ``visited``
        reaches ``stop``. All the items of a container (its attributes, a small dict) are
        unalike: each may take an equal share of what is left, so that none goes unvisited
        because an earlier one took the whole budget. A sample of a large container stands
        for its alike items: each may take half of what is left, and the sample ends when
        what is left would not pay for one more item at the mean cost so far."""
        nonlocal exact, visited
        total = 0.0
        done = 0
        sampled = len(pick) < count
        start = visited
        left = len(pick)
        for item in pick:
            remaining = stop - visited
            if remaining <= 0 or (sampled and done and remaining * done < visited - start):
                break
            share = remaining // ((2 if left > 1 else 1) if sampled else left)
            item_stop = visited + (share or 1)
            left -= 1
            for part in item if pairs else (item,):
                key = id(part)
                if key in seen:
                    continue
                if type(part) in leaves:  # the common case, without a call
                    seen.add(key)
                    visited += 1
                    total += getsizeof(part)
                else:
                    total += size(part, depth, item_stop)
            done += 1
        if done < count:
            exact = False
            total = total * count / done if done else 0.0
        return total

    def size(obj: Any, depth: int, stop: int) -> float:
        nonlocal visited, exact
        key = id(obj)
        if key in seen:
            return 0.0
        seen.add(key)
        visited += 1
        cls = type(obj)
        if cls in leaves:
            return getsizeof(obj)
        kind = _kind(cls, kinds)
        is_root = depth == 0
        if kind == ZERO and not is_root:
            return 0.0
        shallow = getsizeof(obj, 0)
        if depth >= MAX_DEPTH or visited >= stop:
            exact = False
            return shallow
        depth += 1  # of what obj refers to
        if isinstance(obj, dict):
            count = dict.__len__(obj)
            if count <= sample_items:
                pick = list(dict.items(obj))
            else:
                pick = _ends(lambda: dict.items(obj), lambda: reversed(dict.items(obj)),
                             count, sample_items)
            return shallow + walk_items(pick, count, depth, True, stop)
        if isinstance(obj, (list, tuple)):
            base = list if isinstance(obj, list) else tuple
            count = base.__len__(obj)
            if count <= sample_items:
                pick = list(base.__iter__(obj))
            else:
                pick = [base.__getitem__(obj, i * count // sample_items)
                        for i in range(sample_items)]
            return shallow + walk_items(pick, count, depth, False, stop)
        if isinstance(obj, (set, frozenset, deque)):
            base = deque if isinstance(obj, deque) else \
                set if isinstance(obj, set) else frozenset
            count = base.__len__(obj)
            if count <= sample_items:
                pick = list(base.__iter__(obj))
            elif base is deque:
                pick = _ends(lambda: deque.__iter__(obj), lambda: deque.__reversed__(obj),
                             count, sample_items)
            else:  # no order to choose from: the first ones are as good as any
                pick = list(islice(base.__iter__(obj), sample_items))
            return shallow + walk_items(pick, count, depth, False, stop)
        if kind == SHALLOW and not is_root:
            return shallow
        referents = gc.get_referents(obj)
        return shallow + walk_items(referents, len(referents), depth, False, stop)

    total = size(root, 0, max_objects)
    return SizeEstimate(int(total), visited, exact)


class MemoryAttribution:
    """Memory figures of many tasks, walked in turn within a budget per sample.

    :meth:`measure` walks (:func:`deep_size`) the tasks not measured yet, then those measured
    longest ago, until ``objects_per_sample`` objects have been visited (at least one task per
    call), and returns the last figure of every task it has one for: with many or large
    tasks, a figure may be a few samples old. ``max_objects``, ``sample_items``: each walk's
    budget (see :func:`deep_size`). ``clock``: for :attr:`last_cost_s` (seconds the last call
    took).
    """

    def __init__(self, *, objects_per_sample: int = DEFAULT_OBJECTS_PER_SAMPLE,
                 max_objects: int = DEFAULT_MAX_OBJECTS,
                 sample_items: int = DEFAULT_SAMPLE_ITEMS,
                 clock: Callable[[], float] = time.perf_counter):
        self.objects_per_sample = objects_per_sample
        self.max_objects = max_objects
        self.sample_items = sample_items
        self.clock = clock
        #: Task name -> (a weak reference to the object measured, its last estimate), the
        #: least recently measured first.
        self.figures: OrderedDict[str, tuple[weakref.ref, SizeEstimate | None]] = OrderedDict()
        #: Task name -> why its last walk failed (its figure stays the one before).
        self.failures: dict[str, str] = {}
        self.last_cost_s = 0.0
        self.last_walked = 0
        self._kinds: dict[type, int] = {}

    def forget(self, name: str) -> None:
        """Drop ``name``'s figure (a new instance starts unmeasured)."""
        self.figures.pop(name, None)
        self.failures.pop(name, None)

    def measure(self, roots: Mapping[str, Any]) -> dict[str, int]:
        """Walk what the budget allows of ``roots`` (task name -> the task's instance, which
        must accept weak references); return task name -> bytes for every task with a
        figure. Names missing from ``roots`` are forgotten; a name whose instance changed
        starts unmeasured. A walk that raises keeps the task's previous figure and records
        why in :attr:`failures`."""
        started = self.clock()
        figures = self.figures
        for name in [n for n in figures if n not in roots]:
            self.forget(name)
        for name, root in roots.items():
            known = figures.get(name)
            if known is None or known[0]() is not root:
                figures[name] = (weakref.ref(root), None)
                figures.move_to_end(name, last=False)  # never measured: first in turn
        spent = walked = 0
        for name in list(figures):
            if spent >= self.objects_per_sample and walked:
                break
            ref, last = figures[name]
            root = ref()
            if root is None:
                continue
            try:
                estimate = deep_size(root, max_objects=self.max_objects,
                                     sample_items=self.sample_items, cache=self._kinds)
            except Exception as exc:  # a task's own __sizeof__, or a container changed
                self.failures[name] = f"{type(exc).__name__}: {exc}"
                estimate, cost = last, self.max_objects
            else:
                self.failures.pop(name, None)
                cost = estimate.objects
            figures[name] = (ref, estimate)
            figures.move_to_end(name)
            spent += cost
            walked += 1
        self.last_walked = walked
        self.last_cost_s = self.clock() - started
        return {name: estimate.bytes for name, (_, estimate) in figures.items()
                if estimate is not None}
