"""Router unit tests: match rules, routes, transforms, static_forwards, refused routes.

The Router runs in-process against a recording host (no queues): every ``send`` is recorded
as ``(qname, message)`` exactly as the Router handed it over.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from multimodule.config import validate_task_config
from multimodule.errors import ConfigError
from multimodule.tasks.Router import HOPS_KEY, MAX_HOPS, Router, compile_match


class RecordingChannels:
    def __init__(self):
        self.records: list[tuple[str, str, str, dict]] = []

    def emit(self, channel: str, task: str, text: str, **fields: Any) -> None:
        self.records.append((channel, task, text, fields))


class RecordingHost:
    """Records sends without copying (stricter than the daemon, which copies unless the
    sender gives the message away with ``owned=True``)."""

    def __init__(self):
        self.channels = RecordingChannels()
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.owned: list[bool] = []
        self.hops: list[int] = []
        self.destinations: list[str | None] = []

    def send(self, qname: str, message: dict[str, Any], *, owned: bool = False,
             destination: str | None = None) -> None:
        # The hop counter is checked by its own tests; the others compare the rest.
        self.destinations.append(destination)
        hop = message.pop(HOPS_KEY)
        assert type(hop) is int, f"{HOPS_KEY} must be a count, got {hop!r}"
        self.hops.append(hop)
        self.sent.append((qname, message))
        self.owned.append(owned)

    def recur(self, task, name, interval, work) -> None:  # pragma: no cover - unused
        raise AssertionError("the Router schedules nothing")


def make_router(routes: list[dict[str, Any]]) -> tuple[Router, RecordingHost]:
    """A Router configured with ``routes`` the way the daemon does it."""
    host = RecordingHost()
    router = Router()
    router.attach("Router", host)
    config, settings = validate_task_config("Router", Router.Config, {"routes": routes},
                                            "test.toml")
    router.config, router.settings = config, settings
    router.set_config(config)
    return router, host


def fwd(*qnames: str) -> list[dict[str, str]]:
    return [{"qname": q} for q in qnames]


def qnames(host: RecordingHost) -> list[str]:
    return [q for q, _ in host.sent]


# -- match rules (compile_match) ------------------------------------------------------------


@pytest.mark.parametrize("match, message, expected", [
    # field equality
    ({"source": "A"}, {"source": "A", "x": 1}, True),
    ({"source": "A"}, {"source": "B"}, False),
    ({"source": "A"}, {"x": 1}, False),                           # key missing
    ({"source": "A", "x": 1}, {"source": "A", "x": 2}, False),    # every key must match
    ({"n": None}, {"n": None}, True),
    ({"n": None}, {}, False),
    # nested tables recurse; extra keys in the message are fine
    ({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}}, True),
    ({"a": {"b": 1}}, {"a": {"b": 2}}, False),
    ({"a": {"b": 1}}, {"a": 1}, False),
    ({"a": {"b": {"c": "/x+/"}}}, {"a": {"b": {"c": "axxb"}}}, True),
    # list membership
    ({"tags": "urgent"}, {"tags": ["low", "urgent"]}, True),
    ({"tags": "urgent"}, {"tags": ["low"]}, False),
    ({"tags": "urgent"}, {"tags": []}, False),
    ({"items": {"k": "v"}}, {"items": [{"k": "x"}, {"k": "v"}]}, True),
    ({"items": {"k": "v"}}, {"items": [{"k": "x"}]}, False),
    # a list pattern must be equal
    ({"tags": ["a", "b"]}, {"tags": ["a", "b"]}, True),
    ({"tags": ["a", "b"]}, {"tags": ["b", "a"]}, False),
    ({"tags": ["a"]}, {"tags": "a"}, False),
    # regex: searched, not anchored; numbers are searched as text
    ({"text": "/disk (full|failing)/"}, {"text": "the disk full alarm"}, True),
    ({"text": "/disk (full|failing)/"}, {"text": "disk ok"}, False),
    ({"text": "/^disk/"}, {"text": "a disk"}, False),
    ({"code": "/^4\\d\\d$/"}, {"code": 404}, True),
    ({"code": "/^4\\d\\d$/"}, {"code": 500}, False),
    ({"flag": "/True/"}, {"flag": True}, False),                  # bools are not text
    ({"text": "/b/"}, {"text": ["a", "abc"]}, True),              # regex in a list
    ({"text": "/x/"}, {"text": {"x": 1}}, False),
    # a string that merely starts with "/" is not a regex
    ({"path": "/var"}, {"path": "/var"}, True),
    ({"path": "/var"}, {"path": "/var/log"}, False),
    # {} matches everything
    ({}, {}, True),
    ({}, {"anything": [1, 2]}, True),
    # bool vs int strictness
    ({"flag": True}, {"flag": True}, True),
    ({"flag": True}, {"flag": 1}, False),
    ({"n": 1}, {"n": True}, False),
    ({"n": 0}, {"n": False}, False),
    ({"flag": False}, {"flag": 0}, False),
    ({"n": 1}, {"n": [True, 2]}, False),
    ({"n": 1}, {"n": [True, 1]}, True),
])
def test_match_rules(match, message, expected):
    # Given a compiled match table / When a message is tested / Then the rule decides
    assert compile_match(match)(message) is expected


def test_match_does_not_modify_the_message():
    message = {"tags": ["a", "b"], "nested": {"k": ["v"]}}
    before = copy.deepcopy(message)
    assert compile_match({"tags": "b", "nested": {"k": "v"}})(message)
    assert message == before


# -- routes -----------------------------------------------------------------------------------


def test_matching_route_forwards_an_unmodified_copy():
    # Given a route for source A
    router, host = make_router([{"match": {"source": "A"}, "forwards": fwd("out")}])
    message = {"source": "A", "v": [1, 2]}
    # When a message from A arrives, and one from B
    router.message(message)
    router.message({"source": "B"})
    # Then only A's goes out, equal to the input, and the input dict was not forwarded itself
    assert host.sent == [("out", {"source": "A", "v": [1, 2]})]
    assert host.sent[0][1] is not message
    assert router.unrouted == 1


def test_list_is_not_consumed_by_membership_match_two_forwards_both_get_full_list():
    # Given a route matching on list membership with two forwards
    router, host = make_router([{"match": {"tags": "b"}, "forwards": fwd("q1", "q2")}])
    # When a message whose list contains the element arrives
    router.message({"tags": ["a", "b", "c"]})
    # Then both queues get the whole list
    assert host.sent == [("q1", {"tags": ["a", "b", "c"]}), ("q2", {"tags": ["a", "b", "c"]})]


def test_every_matching_route_fires_in_order():
    # Given three routes, the second of which does not match
    router, host = make_router([
        {"match": {"source": "A"}, "forwards": fwd("first")},
        {"match": {"source": "B"}, "forwards": fwd("never")},
        {"match": {}, "forwards": fwd("second", "third")},
    ])
    # When a message from A arrives
    router.message({"source": "A"})
    # Then the matching routes fire in order, each forward in order
    assert qnames(host) == ["first", "second", "third"]


def test_short_circuit_stops_at_the_first_matching_short_circuit_route():
    router, host = make_router([
        {"match": {"kind": "x"}, "forwards": fwd("before")},
        {"match": {"level": "high"}, "forwards": fwd("pager"), "short_circuit": True},
        {"match": {}, "forwards": fwd("catchall")},
    ])
    # When a message matches the short-circuit route
    router.message({"kind": "x", "level": "high"})
    # Then routes before it fire, routes after it do not
    assert qnames(host) == ["before", "pager"]
    host.sent.clear()
    # When the short-circuit route does not match, later routes fire
    router.message({"kind": "x", "level": "low"})
    assert qnames(host) == ["before", "catchall"]


def test_transform_applies_to_a_copy_per_forward():
    # Given two routes with different transforms of the same field, plus one without
    router, host = make_router([
        {"match": {}, "transform": {"priority": 1, "tag": "one"}, "forwards": fwd("a", "b")},
        {"match": {}, "transform": {"priority": 2}, "forwards": fwd("c")},
        {"match": {}, "forwards": fwd("d")},
    ])
    message = {"priority": 0, "body": "x"}
    # When a message goes through
    router.message(message)
    sent = dict(host.sent)
    # Then each forward carries its own route's transform, and the input is untouched
    assert sent["a"] == {"priority": 1, "tag": "one", "body": "x"}
    assert sent["b"] == {"priority": 1, "tag": "one", "body": "x"}
    assert sent["c"] == {"priority": 2, "body": "x"}
    assert sent["d"] == {"priority": 0, "body": "x"}
    assert message == {"priority": 0, "body": "x"}
    # and the copies are distinct objects (a forward changing one cannot change another)
    assert len({id(m) for m in sent.values()}) == 4
    sent["a"]["tag"] = "changed"
    assert sent["b"]["tag"] == "one"


def test_receivers_never_share_objects_with_each_other(monkeypatch):
    # Given a host that behaves like the daemon: a deep copy per send, unless the sender gives
    # the message away (owned=True), and routes sending one message to three queues
    router, host = make_router([
        {"match": {}, "forwards": fwd("a", "b")},
        {"match": {"k": "v"}, "forwards": fwd("c")},
    ])
    received: dict[str, dict] = {}

    def send(qname, message, *, owned=False):
        received[qname] = message if owned else copy.deepcopy(message)

    monkeypatch.setattr(host, "send", send)
    # When a message with nested values goes through
    router.message({"k": "v", "nested": {"list": [1, 2]}})
    # Then each receiver can change its message without the others seeing it
    assert set(received) == {"a", "b", "c"}
    received["c"]["nested"]["list"].append(3)
    received["a"]["nested"]["list"].append(4)
    assert received["b"]["nested"]["list"] == [1, 2]
    assert received["a"]["nested"]["list"] == [1, 2, 4]
    assert received["c"]["nested"]["list"] == [1, 2, 3]


def test_unrouted_message_is_counted_and_not_sent():
    router, host = make_router([{"match": {"source": "A"}, "forwards": fwd("out")}])
    router.message({"source": "Z"})
    assert host.sent == []
    assert router.unrouted == 1


def test_no_routes_configured_forwards_nothing():
    router, host = make_router([])
    router.message({"source": "A"})
    assert host.sent == [] and router.unrouted == 1


# -- static_forwards --------------------------------------------------------------------------


def test_static_forwards_first_hop_taken_rest_carried_routes_ignored():
    # Given routes that would match everything
    router, host = make_router([{"match": {}, "forwards": fwd("routed")}])
    hops = [
        [{"forward": {"qname": "hop1a"}, "transform": {"stage": 1}},
         {"forward": {"qname": "hop1b"}}],
        [{"forward": {"qname": "hop2"}, "transform": {"stage": 2}}],
    ]
    message = {"v": 1, "static_forwards": copy.deepcopy(hops)}
    # When a message with static_forwards arrives
    router.message(message)
    # Then it goes to every entry of the first hop (not the routes), carrying the rest
    assert qnames(host) == ["hop1a", "hop1b"]
    assert host.sent[0][1] == {"v": 1, "stage": 1, "static_forwards": hops[1:]}
    assert host.sent[1][1] == {"v": 1, "static_forwards": hops[1:]}
    assert message["static_forwards"] == hops  # the input is not modified
    # When the forwarded message comes back for its last hop
    host.sent.clear()
    last = {"v": 1, "static_forwards": copy.deepcopy(hops[1:])}
    router.message(last)
    # Then it goes to hop2 without static_forwards any more
    assert host.sent == [("hop2", {"v": 1, "stage": 2})]
    assert last["static_forwards"] == hops[1:]


@pytest.mark.parametrize("bad", [
    [],
    "hop",
    [{"forward": {"qname": "x"}}],          # a hop must be a list
    [[{"forward": {"qname": ""}}]],         # bad queue name
    [[{"forward": {}}]],                    # no qname
])
def test_malformed_static_forwards_reported_not_forwarded(bad):
    router, host = make_router([{"match": {}, "forwards": fwd("routed")}])
    router.message({"v": 1, "static_forwards": bad})
    assert host.sent == []
    errors = [r for r in host.channels.records if r[0] == "error"]
    assert len(errors) == 1 and "static_forwards" in errors[0][2]


# -- refused routes ---------------------------------------------------------------------------


@pytest.mark.parametrize("routes, field, words", [
    ([{"match": {"source": "A"}}], "Router.routes.0.forwards", "Field required"),
    ([{"match": {}, "forwards": []}], "Router.routes.0.forwards", "at least 1"),
    ([{"match": {}, "forwards": fwd("ok")}, {"match": {"t": "/(/"}, "forwards": fwd("x")}],
     "Router.routes.1.match", "invalid regular expression"),
    ([{"match": {"a": {"b": "/[z/"}}, "forwards": fwd("x")}],
     "Router.routes.0.match", "invalid regular expression"),
    ([{"forwards": fwd("a/b")}], "Router.routes.0.forwards.0.qname", "a/b"),
    ([{"forwards": fwd("")}], "Router.routes.0.forwards.0.qname", ""),
    ([{"forwards": [{"queue": "x"}]}], "Router.routes.0.forwards.0", "qname"),
    ([{"forwards": fwd("x"), "short_circut": True}], "Router.routes.0.short_circut",
     "Extra inputs"),
    ([{"forwards": fwd("x"), "match": "source"}], "Router.routes.0.match", "dict"),
    ([{"forwards": [{"qname": "x", "destination": "a b"}]}],
     "Router.routes.0.forwards.0.destination", "not a host name"),
    ([{"forwards": [{"qname": "x", "destination": ""}]}],
     "Router.routes.0.forwards.0.destination", "1 to 253"),
])
def test_invalid_routes_refused_with_the_field_named(routes, field, words):
    # When a Router config with a bad route is validated
    with pytest.raises(ConfigError) as info:
        validate_task_config("Router", Router.Config, {"routes": routes}, "conf.toml")
    # Then the error names the file and the field, and says what is wrong
    text = str(info.value)
    assert text.startswith("conf.toml: "), text
    assert field in text, text
    assert words in text, text


def test_a_forward_with_a_destination_sends_to_that_host_the_others_stay_local():
    # Given a route forwarding to a local queue and to a queue on host "b"
    router, host = make_router([{"match": {"source": "A"},
                                 "forwards": [{"qname": "Here"},
                                              {"qname": "There", "destination": "b"},
                                              {"qname": "StaticThere", "destination": "b"}]}])
    # When a matching message goes through, and then one with static_forwards to host "c"
    router.message({"source": "A", "n": 1})
    router.message({"source": "B", "static_forwards": [
        [{"forward": {"qname": "Far", "destination": "c"}}]]})
    # Then each forward names its own destination (None: this host)
    assert qnames(host) == ["Here", "There", "StaticThere", "Far"]
    assert host.destinations == [None, "b", "b", "c"]


def test_router_config_unknown_key_refused():
    with pytest.raises(ConfigError, match=r"Router\.route: Extra inputs"):
        validate_task_config("Router", Router.Config, {"route": []}, "conf.toml")


def test_each_pass_through_the_router_counts_a_hop():
    # Given a Router with one route
    router, host = make_router([{"match": {}, "forwards": fwd("out")}])
    # When a fresh message and one that already passed 5 Routers go through
    router.message({"a": 1})
    router.message({"a": 2, HOPS_KEY: 5})
    # Then the forwarded copies carry the incremented count
    assert host.hops == [1, 6]


def test_a_routing_loop_is_broken_and_reported():
    # Given a route that sends everything back to the Router itself
    router, host = make_router([{"match": {}, "forwards": fwd("Router")}])
    message: dict[str, Any] = {"a": 1}
    # When the message keeps coming back
    for _ in range(MAX_HOPS + 5):
        router.message(message)
        if not host.sent:
            break
        _, message = host.sent.pop()
        message[HOPS_KEY] = host.hops[-1]
    # Then after MAX_HOPS passes it is not forwarded, and the error says why
    assert host.hops[-1] == MAX_HOPS
    assert router.loops_broken == 1
    assert any("routing loop" in text for _, _, text, _ in host.channels.records)


# -- the route index: same semantics and order as trying every route ----------------------


def _linear_targets(router: Router, message: dict[str, Any]) -> list[str]:
    """What the Router would forward trying every route in turn (the semantics)."""
    out = []
    for matcher, forwards, _transform, short_circuit in router.compiled:
        if matcher(message):
            out += [qname for qname, _ in forwards]
            if short_circuit:
                break
    return out


def test_the_index_forwards_exactly_what_trying_every_route_would():
    import random

    rng = random.Random(15)
    values = ["a", "b", 1, 1.0, 2, True, False, None, "/^a/", [1, 2], {"x": 1}, "1"]
    keys = ["source", "kind", "n", "tags"]
    routes = []
    for i in range(60):
        match = {k: rng.choice(values) for k in rng.sample(keys, rng.randint(0, 2))}
        routes.append({"match": match, "forwards": fwd(f"q{i}"),
                       "short_circuit": rng.random() < 0.1})
    router, host = make_router(routes)
    checked = 0
    for _ in range(3000):
        message = {k: rng.choice(values + [["a", True], [None, "b", 2.0]])
                   for k in rng.sample(keys, rng.randint(0, 4))}
        expected = _linear_targets(router, message)
        host.sent.clear()
        router.message(dict(message))
        assert qnames(host) == expected, (message, expected)
        checked += bool(expected)
    assert checked > 500  # most messages matched something: the comparison means something


@pytest.mark.parametrize("pattern, value, matches", [
    ("a", ["b", "a"], True),     # a scalar pattern matches a list holding it
    ("a", ["b"], False),
    (1, 1.0, True),              # 1 is 1.0
    (1, True, False),            # true is not 1
    (True, 1, False),
    (True, [0, True], True),
    (None, None, True),
    (None, [None], True),
    ("1", 1, False),
])
def test_the_index_keeps_the_equality_rules(pattern, value, matches):
    router, host = make_router([{"match": {"k": pattern}, "forwards": fwd("hit")},
                                {"match": {"other": "x"}, "forwards": fwd("miss")}])
    router.message({"k": value})
    assert qnames(host) == (["hit"] if matches else [])


def test_the_index_tries_only_routes_that_can_match():
    # 1,000 routes on distinct sources and one catch-all: a message from one source is
    # matched against two routes, not 1,001
    routes = [{"match": {"source": f"S{i}"}, "forwards": fwd(f"q{i}")} for i in range(1000)]
    routes.append({"match": {"kind": "/./"}, "forwards": fwd("all")})
    router, host = make_router(routes)
    assert router.index.candidates({"source": "S500", "kind": "k"}) == [500, 1000]
    router.message({"source": "S500", "kind": "k"})
    assert qnames(host) == ["q500", "all"]


# -- figures per route (mmctl graph) ----------------------------------------------------------


def reconfigure(router: Router, routes: list[dict[str, Any]]) -> None:
    config, settings = validate_task_config("Router", Router.Config, {"routes": routes},
                                            "test.toml")
    router.config, router.settings = config, settings
    router.set_config(config)


def test_each_route_counts_the_messages_it_matched():
    # Given three routes, the second short-circuiting
    routes = [{"match": {"source": "A"}, "forwards": fwd("a1", "a2")},
              {"match": {"kind": "x"}, "forwards": fwd("x"), "short_circuit": True},
              {"match": {}, "forwards": fwd("all")}]
    router, host = make_router(routes)
    # When messages come: A twice (once of kind x), B of kind x, C, and one static_forwards
    for message in ({"source": "A"}, {"source": "A", "kind": "x"}, {"source": "B", "kind": "x"},
                    {"source": "C"}, {"static_forwards": [[{"forward": {"qname": "s"}}]]}):
        router.message(message)
    # Then each route counts the messages it matched (a forward each is not a match each),
    # none past a short circuit, and the static one counts apart
    assert router.extra_figures()["route_matches"] == [2, 2, 2]
    assert router.extra_figures()["static_forwarded"] == 1
    # When the config changes but not the routes, the counts go on
    reconfigure(router, copy.deepcopy(routes))
    assert router.extra_figures()["route_matches"] == [2, 2, 2]
    # and when the routes change, they start afresh, one per route
    reconfigure(router, routes[:2])
    assert router.extra_figures()["route_matches"] == [0, 0]
