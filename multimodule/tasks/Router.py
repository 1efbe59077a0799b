"""The built-in ``Router`` task: forwards each message by match rules.

Config::

    [Router]
    routes = [
      { match = { source = "Example1" }, forwards = [ { qname = "Example2" } ] },
      { match = { source = "Sensor" }, forwards = [ { qname = "Store", destination = "db1" } ] },
      { match = { tags = "urgent", text = "/disk (full|failing)/" },
        transform = { priority = 1 }, forwards = [ { qname = "pager" }, { qname = "log" } ],
        short_circuit = true },
    ]

Every matching route fires, in order, until one with ``short_circuit = true`` has matched.
Routes are looked up by their equality on a scalar field (:class:`RouteIndex`), so routes
that cannot match a message cost nothing, however many there are.
Match rules: every key of ``match`` must be present in the message; a scalar must be equal
(``true`` does not equal ``1``); a table recurses into a table; a scalar (or regex) matches a
list in the message that contains a matching element; a string ``"/regex/"`` is a regular
expression searched in a string (or number) value; a list must be equal; ``{}`` matches
everything. ``transform`` sets top-level fields on that route's forwarded copy. Every forward
gets its own copy; the message is never modified. A forward with ``destination`` goes to the
queue of that name on that host, through the Bridge (see ``multimodule.tasks.Bridge``).

Each pass through a Router counts in the message's ``.router_hops``; after 64 the message is
reported on ``error`` and not forwarded, which breaks routing loops.

A message carrying ``static_forwards`` (a list of hops, each a list of
``{forward = {qname = ...}, transform = {...}}``) ignores the routes: it goes to the first hop
and carries the remaining hops with it. One that names more distinct queues, over all its hops,
than ``max_static_forward_queues`` (default 16), or whose hops would make more copies than
``max_static_forward_copies`` (default 64: the sum over its hops of the product of their
sizes, so a hop naming the Router 150 times cannot multiply a message without bound), is
refused whole: reported on ``error``, counted (``static_forwards_refused``), sent nowhere. A
forward the daemon refuses because it would create a queue over its rate
(:class:`~multimodule.errors.QueueCreationRefused`) is reported naming the queue and counted
(``forwards_refused``); the other forwards go out.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from multimodule.config import HostName, QueueName
from multimodule.errors import QueueCreationRefused
from multimodule.task import Task

Matcher = Callable[[Any], bool]

#: Field counting how often a message went through a Router; at MAX_HOPS it is not forwarded
#: again (a route that leads back to the Router would otherwise spin for ever).
HOPS_KEY = ".router_hops"
MAX_HOPS = 64

#: Default of ``max_static_forward_queues``: the distinct queues one message may name.
MAX_STATIC_FORWARD_QUEUES = 16
#: Default of ``max_static_forward_copies``: the copies one message's static_forwards may make.
MAX_STATIC_FORWARD_COPIES = 64


def _is_regex(pattern: Any) -> bool:
    return isinstance(pattern, str) and len(pattern) >= 2 and pattern[0] == "/" \
        and pattern[-1] == "/"


def compile_value(pattern: Any, where: str = "match") -> Matcher:
    """A predicate for one message value against ``pattern`` (see the module docstring).

    Raises ``ValueError`` naming ``where`` for an invalid regular expression.
    """
    if isinstance(pattern, dict):
        match_object = compile_match(pattern, where)
        single = lambda value: isinstance(value, dict) and match_object(value)  # noqa: E731
    elif _is_regex(pattern):
        try:
            search = re.compile(pattern[1:-1]).search
        except re.error as exc:
            raise ValueError(f"{where}: invalid regular expression {pattern!r}: {exc}") from exc

        def single(value: Any) -> bool:
            if isinstance(value, str):
                return search(value) is not None
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return search(str(value)) is not None
            return False
    elif isinstance(pattern, list):
        return lambda value: value == pattern
    else:
        is_bool = isinstance(pattern, bool)

        def single(value: Any) -> bool:
            return value == pattern and isinstance(value, bool) == is_bool

    def matcher(value: Any) -> bool:
        if isinstance(value, list):
            # Membership: look at the elements without consuming the message's list.
            return any(single(item) for item in value)
        return single(value)

    return matcher


def compile_match(match: dict[str, Any], where: str = "match") -> Callable[[dict], bool]:
    """A predicate for a whole message against a ``match`` table."""
    checks = [(key, compile_value(pattern, f"{where}.{key}")) for key, pattern in match.items()]
    if not checks:
        return lambda message: True

    def matcher(message: dict[str, Any]) -> bool:
        for key, check in checks:
            if key not in message or not check(message[key]):
                return False
        return True

    return matcher


#: Pattern types an equality index can look up: a message value equal to one of these (or a
#: list holding one) is found by hashing, not by trying every route.
_INDEXABLE = (str, int, float, bool, type(None))


def _index_key(value: Any) -> tuple[Any, ...] | None:
    """The hash key of a scalar under the match rules' equality: ``true`` is not ``1``
    (bools apart), ``1`` is ``1.0``; ``None`` for what no scalar pattern can equal."""
    if value.__class__ is bool:
        return (bool, value)
    if isinstance(value, _INDEXABLE):
        return (None, value)
    return None


class RouteIndex:
    """The routes that can match a message, found without trying those that cannot.

    Each route with an equality on a scalar (``source = "Example1"``, not a regex, table or
    list) is filed under its first such key and value; the others are tried for every
    message. For a message, the candidates are the routes filed under the value of each
    indexed key it holds (or under each element, when that value is a list: a scalar pattern
    matches a list containing it), plus the unfiled ones, in their configured order; each is
    then matched in full. So the routes that cannot match cost nothing, whatever their number:
    the equality index compiled when the config loads that issue 15 asked for (the original's
    Router tries every route in turn).

    ``routes``: one match table per route, in order. :meth:`candidates` returns route
    positions, ascending.
    """

    def __init__(self, routes: list[dict[str, Any]]):
        self.by_key: dict[str, dict[tuple[Any, ...], list[int]]] = {}
        self.always: list[int] = []
        for position, match in enumerate(routes):
            for key, pattern in match.items():
                hashed = None if _is_regex(pattern) else _index_key(pattern)
                if hashed is not None:
                    self.by_key.setdefault(key, {}).setdefault(hashed, []).append(position)
                    break
            else:
                self.always.append(position)
        self.keys = tuple(self.by_key.items())

    def candidates(self, message: dict[str, Any]) -> list[int]:
        """Positions of the routes that may match ``message``, in configured order."""
        found: list[int] = []
        for key, table in self.keys:
            if key not in message:
                continue
            value = message[key]
            if value.__class__ is list:
                for item in value:
                    hashed = _index_key(item)
                    if hashed is not None and hashed in table:
                        found.extend(table[hashed])
            else:
                hashed = _index_key(value)
                if hashed is not None and hashed in table:
                    found.extend(table[hashed])
        if not found:
            return self.always
        found.extend(self.always)
        return sorted(set(found))


class Forward(BaseModel):
    """One destination: the queue name ``qname``, on host ``destination`` if given (another
    host's name: sent there through the Bridge; this host's own name: a local send)."""

    model_config = ConfigDict(extra="forbid")
    qname: QueueName
    destination: HostName | None = None


class Route(BaseModel):
    """One route: ``match`` (table), optional ``transform`` (table), ``forwards`` (at least
    one), ``short_circuit`` (stop at this route when it matches)."""

    model_config = ConfigDict(extra="forbid")
    match: dict[str, Any] = Field(default_factory=dict)
    transform: dict[str, Any] | None = None
    forwards: list[Forward] = Field(min_length=1)
    short_circuit: bool = False
    _matcher: Callable[[dict], bool] = PrivateAttr()

    def model_post_init(self, __context: Any) -> None:
        self._matcher = compile_match(self.match)

    @field_validator("match")
    @classmethod
    def _compilable(cls, value: dict[str, Any]) -> dict[str, Any]:
        compile_match(value)  # raises ValueError for a bad regex, reported with the field
        return value

    @property
    def matcher(self) -> Callable[[dict], bool]:
        """The compiled ``match``: a callable taking a message dict, returning a bool."""
        return self._matcher

    def matches(self, message: dict[str, Any]) -> bool:
        """Whether ``message`` satisfies this route's ``match``."""
        return self._matcher(message)


class StaticForward(BaseModel):
    """One entry of a ``static_forwards`` hop."""

    forward: Forward
    transform: dict[str, Any] | None = None


class Router(Task):
    """Forwards messages by routes; see the module docstring. Counts ``unrouted`` messages,
    ``loops_broken``, ``static_forwards_refused`` and ``forwards_refused``; the messages each
    route matched (``route_matches``, a list in route order, started afresh when the routes
    change), and those that followed their own ``static_forwards`` (``static_forwarded``)."""

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        routes: list[Route] = Field(default_factory=list)
        max_static_forward_queues: int = Field(
            MAX_STATIC_FORWARD_QUEUES, ge=1,
            description="most distinct queues one message's static_forwards may name, over "
                        "all its hops; a message naming more is refused whole")
        max_static_forward_copies: int = Field(
            MAX_STATIC_FORWARD_COPIES, ge=1,
            description="most copies one message's static_forwards may make, over all its "
                        "hops (each hop multiplies the copies of the one before); a message "
                        "that would make more is refused whole")

    def set_config(self, config: dict[str, Any]) -> None:
        routes = self.settings.routes if self.settings else []
        # Plain tuples for the hot path: pydantic attribute access costs microseconds.
        self.compiled: list[tuple[Callable[[dict], bool], tuple[tuple[str, str | None], ...],
                                  dict[str, Any] | None, bool]] = [
            (route.matcher, tuple((f.qname, f.destination) for f in route.forwards),
             route.transform or None, route.short_circuit)
            for route in routes
        ]
        self.index = RouteIndex([route.match for route in routes])
        self.unrouted = getattr(self, "unrouted", 0)
        shapes = [route.model_dump() for route in routes]
        if shapes != getattr(self, "_route_shapes", None):
            self._route_shapes = shapes
            self.route_matches = [0] * len(routes)  # by position: new routes count afresh

    def extra_figures(self) -> dict[str, int | list[int]]:
        return {"unrouted": getattr(self, "unrouted", 0), "loops_broken": self.loops_broken,
                "static_forwards_refused": self.static_forwards_refused,
                "forwards_refused": self.forwards_refused,
                "route_matches": list(getattr(self, "route_matches", ())),
                "static_forwarded": self.static_forwarded}

    loops_broken = 0
    static_forwards_refused = 0
    forwards_refused = 0
    static_forwarded = 0

    def message(self, message: dict[str, Any]) -> None:
        hops = message.get(HOPS_KEY, 0)
        if type(hops) is not int or hops >= MAX_HOPS:
            self.loops_broken += 1
            self.error(f"message passed the Router {MAX_HOPS} times: a routing loop? "
                       "Not forwarded.", message=message)
            return
        if "static_forwards" in message:
            self._static_forward(message, hops + 1)
            return
        targets: list[tuple[tuple[str, str | None], dict[str, Any] | None]] = []
        compiled, matches = self.compiled, self.route_matches
        for position in self.index.candidates(message):
            matcher, forwards, transform, short_circuit = compiled[position]
            if matcher(message):
                matches[position] += 1
                for forward in forwards:
                    targets.append((forward, transform))
                if short_circuit:
                    break
        if not targets:
            self.unrouted += 1
            self.debug("no route matched", source=message.get("source"))
            return
        self._forward(message, targets, hops + 1)

    def _forward(self, message: dict[str, Any],
                 targets: list[tuple[tuple[str, str | None], dict[str, Any] | None]],
                 hops: int) -> None:
        # Every destination but the last gets a copy (made by send); the last one gets this
        # message itself, which the Router owns and no longer needs (one copy saved per hop).
        last = len(targets) - 1
        for i, ((qname, destination), transform) in enumerate(targets):
            out = dict(message)
            out[HOPS_KEY] = hops
            if transform:
                out.update(transform)
            try:
                if i < last or transform:
                    self.send(qname, out, destination=destination)
                else:
                    self.send(qname, out, owned=True, destination=destination)
            except QueueCreationRefused as exc:
                self._refused(qname, exc, out)

    def _refused(self, qname: str, exc: QueueCreationRefused, message: dict[str, Any]) -> None:
        self.forwards_refused += 1
        self.error(f"not forwarded to {qname!r}: {exc}", message=message)

    def _static_forward(self, message: dict[str, Any], hops: int) -> None:
        plan = message["static_forwards"]
        if not isinstance(plan, list) or not plan or not isinstance(plan[0], list):
            self.error("malformed static_forwards, message not forwarded: static_forwards "
                       "must be a non-empty list of hops (lists)", message=message)
            return
        limit = self.settings.max_static_forward_queues if self.settings \
            else MAX_STATIC_FORWARD_QUEUES
        named = _named_queues(plan)
        if len(named) > limit:
            self.static_forwards_refused += 1
            self.error(f"static_forwards names {len(named)} queues, more than "
                       f"max_static_forward_queues ({limit}): message refused, not forwarded",
                       source=message.get("source"), first_queues=sorted(named)[:5])
            return
        copies, most = _copies(plan), self.settings.max_static_forward_copies \
            if self.settings else MAX_STATIC_FORWARD_COPIES
        if copies > most:
            self.static_forwards_refused += 1
            self.error(f"static_forwards would make {copies} copies of the message, more than "
                       f"max_static_forward_copies ({most}): message refused, not forwarded",
                       source=message.get("source"))
            return
        try:
            hop = [StaticForward.model_validate(entry) for entry in plan[0]]
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            self.error(f"malformed static_forwards, message not forwarded: {exc}",
                       message=message)
            return
        rest = plan[1:]
        self.static_forwarded += 1
        for entry in hop:
            out = dict(message)
            out[HOPS_KEY] = hops
            if rest:
                out["static_forwards"] = rest
            else:
                del out["static_forwards"]
            if entry.transform:
                out.update(entry.transform)
            try:
                # a copy each: the hops list is shared
                self.send(entry.forward.qname, out, destination=entry.forward.destination)
            except QueueCreationRefused as exc:
                self._refused(entry.forward.qname, exc, out)


def _copies(plan: list[Any]) -> int:
    """How many messages a ``static_forwards`` plan makes over all its hops: each hop sends
    one copy per entry of every copy the hop before made."""
    total, made = 0, 1
    for hop in plan:
        made *= len(hop) if isinstance(hop, list) else 0
        total += made
    return total


def _named_queues(plan: list[Any]) -> set[str]:
    """The distinct queue names a ``static_forwards`` plan gives, over all its hops (entries
    that are not well-formed name none; a later Router refuses them)."""
    named = set()
    for hop in plan:
        for entry in hop if isinstance(hop, list) else ():
            forward = entry.get("forward") if isinstance(entry, dict) else None
            qname = forward.get("qname") if isinstance(forward, dict) else None
            if isinstance(qname, str):
                named.add(qname)
    return named
