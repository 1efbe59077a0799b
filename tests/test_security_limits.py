"""What a config section, a control message or one message may make the daemon do: import only
task modules (built-ins, ``--task-path`` modules, modules of an explicit ``-p`` package), and
create only so many System V queues (``static_forwards`` naming at most
``max_static_forward_queues`` queues; new queues at most ``--queue-creation-rate`` per second,
``--queue-creation-burst`` at once), every refusal reported and counted.

Logic runs the daemon in-process (tests/inprocess.py); one test runs it as a process with a
module planted on its ``PYTHONPATH`` that leaves a marker file when imported."""

from __future__ import annotations

import json
import os
import sys

import pytest

from helpers import route, router_section
from multimodule.cli.daemon import build_parser, parse_options
from multimodule.config import DaemonOptions
from multimodule.errors import QueueCreationRefused
from multimodule.transit import META_KEY, Transit
from multimodule.transit.lowlevel import Overflow

UPPER = """
    from multimodule import Task

    class Upper(Task):
        def message(self, message):
            self.emit({"text": message["text"].upper()})
"""

SPRAYER = """
    from multimodule import Task

    class Sprayer(Task):
        def message(self, message):
            for qname in message["to"]:
                self.send(qname, {"x": 1})
"""

#: A module that leaves a marker file when imported (proof that the daemon imported it).
PLANTED = """
open({marker!r}, "w").close()

from multimodule import Task


class {name}(Task):
    def message(self, message):
        pass
"""


@pytest.fixture
def no_this():
    """``this`` (the stdlib's Zen module) not imported before the test, nor left after."""
    sys.modules.pop("this", None)
    yield
    sys.modules.pop("this", None)


def static(*qnames: str) -> dict:
    """A message to the Router with one hop of static forwards to ``qnames``."""
    return {"static_forwards": [[{"forward": {"qname": q}} for q in qnames]], "x": 1}


async def status(inproc) -> dict:
    return (await inproc.control(query="status"))["status"]


def queues(inproc, prefix: str) -> list[str]:
    """The queue names registered in the transit directory that start with ``prefix``."""
    return [n for n in inproc.transit.directory.names() if n.startswith(prefix)]


# -- task classes are looked up in one restricted way --------------------------------------


async def test_a_config_section_at_start_imports_no_module_outside_the_task_path(
        inproc, no_this):
    # Given a config file with a section [this] (the stdlib module's name)
    inproc.config("[this]\n")
    # When the daemon starts
    await inproc.start()
    # Then the module was not imported, and the unknown task is reported
    assert "this" not in sys.modules
    failure = inproc.records_of("error", "cannot load task this")
    assert failure and "no task 'this'" in failure[0].text
    assert "this" not in inproc.daemon.registry.runners


async def test_a_config_section_on_reload_imports_no_module_outside_the_task_path(
        inproc, no_this):
    # Given a running daemon
    await inproc.start()
    # When its config file gains a section [this] and is reloaded
    inproc.config("[this]\n")
    assert inproc.daemon.reload() is None
    await inproc.quiet()
    # Then the module was not imported, and the unknown task is reported
    assert "this" not in sys.modules
    assert inproc.records_of("error", "cannot load task this")


async def test_mmctl_config_of_a_stdlib_module_exits_4_and_imports_nothing(inproc, no_this):
    # Given a running daemon
    await inproc.start()
    # When mmctl sets a config for "this"
    code, _, err = await inproc.mmctl("config", "this", "{}")
    # Then it exits 4 (no such task) and the module was not imported
    assert code == 4, err
    assert "no task 'this'" in err
    assert "this" not in sys.modules
    assert "this" not in inproc.daemon.configs.overrides


async def test_package_and_task_path_modules_load_and_nothing_else(inproc, tmp_path,
                                                                   monkeypatch):
    # Given a package mypkg (outside the task path) given with -p, with task Pkgd
    site = tmp_path / "site"
    (site / "mypkg").mkdir(parents=True)
    (site / "mypkg" / "__init__.py").write_text("")
    (site / "mypkg" / "Pkgd.py").write_text(PLANTED.format(
        marker=str(tmp_path / "pkgd-imported"), name="Pkgd"))
    # and a bare module planted next to it, on sys.path but not in the task path
    (site / "planted.py").write_text(PLANTED.format(
        marker=str(tmp_path / "planted-imported"), name="planted"))
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "mypkg", raising=False)
    monkeypatch.delitem(sys.modules, "mypkg.Pkgd", raising=False)
    # and task Upper in the task path, all three configured
    inproc.task("Upper", UPPER)
    inproc.config("[Upper]\n[Pkgd]\n[planted]\n" + router_section(route("Upper", "out")))
    inproc.capture("out")
    # When the daemon starts with the prefixes "" and "mypkg."
    await inproc.start(prefixes=["", "mypkg."])
    try:
        # Then Upper and Pkgd run, and planted was never imported (reported as no task)
        assert {"Upper", "Pkgd"} <= set(inproc.daemon.registry.runners)
        assert (tmp_path / "pkgd-imported").exists()
        assert not (tmp_path / "planted-imported").exists()
        assert "no task 'planted'" in inproc.daemon.registry.failures["planted"]
        # and a control message reaches the package's task but not the planted module
        assert await inproc.control(config={"Pkgd": {}}) == {"ok": True}
        reply = await inproc.control(config={"planted": {}})
        assert reply["error"].startswith("no task 'planted'")
        assert not (tmp_path / "planted-imported").exists()
        inproc.send("Upper", {"text": "a"})
        assert (await inproc.next("out"))["text"] == "A"
    finally:
        assert await inproc.stop() == 0
        for name in ("mypkg", "mypkg.Pkgd", "planted"):
            sys.modules.pop(name, None)


def test_a_daemon_process_imports_no_module_named_by_config_or_control(mm, tmp_path):
    # Given a module on the daemon's PYTHONPATH (not its task path) that leaves a marker
    site = tmp_path / "site"
    site.mkdir()
    marker = tmp_path / "planted-imported"
    (site / "planted.py").write_text(PLANTED.format(marker=str(marker), name="planted"))
    mm.env["PYTHONPATH"] = os.pathsep.join([str(site), mm.env["PYTHONPATH"]])
    # and a config naming it
    mm.config("[planted]\n")
    # When the daemon starts
    daemon = mm.start()
    # Then it reports no such task and did not import it
    daemon.expect("stderr", "cannot load task planted: no task 'planted'")
    assert not marker.exists()
    # When mmctl sets a config for it
    code, _, err = mm.mmctl("config", "planted", "{}")
    # Then mmctl exits 4 and the module is still not imported
    assert code == 4, err
    assert not marker.exists()


# -- one message creates only so many queues -----------------------------------------------


async def test_300_static_forwards_are_refused_whole_and_create_no_queue(inproc):
    # Given a running daemon (the default limit: 16 queues per message's static_forwards)
    await inproc.start()
    # When a message to the Router names 300 queues in its static_forwards
    inproc.send("Router", static(*(f"flood{i}" for i in range(300))))
    await inproc.quiet()
    # Then no queue was created, nothing was forwarded, and the refusal is reported
    assert queues(inproc, "flood") == []
    refused = inproc.records_of("error", "static_forwards names 300 queues")
    assert refused and "max_static_forward_queues" in refused[0].text
    # and counted in the status
    assert (await status(inproc))["tasks"]["Router"]["static_forwards_refused"] == 1


async def test_static_forwards_limit_counts_distinct_queues_of_every_hop(inproc):
    # Given the Router allowing 3 queues per message
    inproc.config("[Router]\nmax_static_forward_queues = 3\n")
    await inproc.start()
    # When one message names 3 distinct queues (one twice, over two hops)
    inproc.send("Router", {"static_forwards": [[{"forward": {"qname": "hopa"}},
                                                {"forward": {"qname": "hopb"}}],
                                               [{"forward": {"qname": "hopa"}}],
                                               [{"forward": {"qname": "hopc"}}]],
                           "x": 1})
    # and another names 4 (the fourth in a later hop)
    inproc.send("Router", {"static_forwards": [[{"forward": {"qname": "hopd"}}],
                                               [{"forward": {"qname": "hope"}},
                                                {"forward": {"qname": "hopf"}},
                                                {"forward": {"qname": "hopg"}}]],
                           "x": 2})
    await inproc.quiet()
    # Then the first went to its first hop, the second was refused whole
    assert sorted(queues(inproc, "hop")) == ["hopa", "hopb"]
    assert inproc.records_of("error", "static_forwards names 4 queues")
    assert (await status(inproc))["tasks"]["Router"]["static_forwards_refused"] == 1


async def test_new_queues_beyond_the_burst_are_refused_and_reported(inproc, transit):
    # Given a daemon that may create 3 queues at once (and hardly any more per second)
    inproc.task("Sprayer", SPRAYER)
    inproc.config("[Sprayer]\n")
    await inproc.start(queue_creation_burst=3, queue_creation_rate=0.001)
    # and 5 queues that exist already (made by another process)
    for i in range(5):
        transit.sysv_queue(f"old{i}")
    # When a task sends to the 5 existing queues
    inproc.send("Sprayer", {"to": [f"old{i}" for i in range(5)]})
    await inproc.quiet()
    # Then every message is there: opening a queue is no creation
    assert [transit.stat(f"old{i}").messages for i in range(5)] == [1] * 5
    assert not inproc.records_of("error")
    # When it sends to 5 new queues
    inproc.send("Sprayer", {"to": [f"new{i}" for i in range(5)]})
    await inproc.quiet()
    # Then 3 are created and the fourth send is refused: an error of the sending task's
    # handler, naming the queue, never silent
    assert sorted(queues(inproc, "new")) == ["new0", "new1", "new2"]
    [failure] = inproc.records_of("error", "QueueCreationRefused")
    assert failure.task == "Sprayer" and "'new3'" in failure.text
    report = await status(inproc)
    assert report["tasks"]["Sprayer"]["task_message_failure"] == 1
    assert report["queue_creations_refused"] == 1


async def test_router_forwards_over_the_creation_rate_are_refused_one_by_one(inproc):
    # Given a daemon that may create 2 queues at once
    inproc.capture("kept")
    await inproc.start(queue_creation_burst=2, queue_creation_rate=0.001)
    # When one message is forwarded to 4 new queues and one that is served here
    inproc.send("Router", static("fresh0", "fresh1", "fresh2", "fresh3", "kept"))
    await inproc.quiet()
    # Then 2 queues are created, the 2 forwards over the rate are reported by name, and the
    # queue that needs no creation still gets its copy
    assert sorted(queues(inproc, "fresh")) == ["fresh0", "fresh1"]
    texts = [r.text for r in inproc.records_of("error", "not forwarded to")]
    assert len(texts) == 2 and "'fresh2'" in texts[0] and "'fresh3'" in texts[1]
    assert [{k: v for k, v in m.items() if k != META_KEY} for m in inproc.taken("kept")] \
        == [{"x": 1, ".router_hops": 1}]
    report = await status(inproc)
    assert report["tasks"]["Router"]["forwards_refused"] == 2
    assert report["queue_creations_refused"] == 2


def test_the_creation_rate_is_a_token_bucket_refilled_with_time(transit, transit_dir):
    # Given an overflow that may create 2 queues per second, 1 at once, on a clock of its own
    now = [100.0]
    overflow = Overflow(transit, lambda channel, text: None)
    overflow.limit_creations(2.0, 1, clock=lambda: now[0])
    # and a queue another process made
    Transit(transit_dir).sysv_queue("made")
    # When it sends to a new queue, then to another at once
    overflow.send("tb0", {"x": 0})
    with pytest.raises(QueueCreationRefused, match="'tb1'"):
        overflow.send("tb1", {"x": 1})
    # Then the existing queue still takes messages (no creation) while the bucket is empty
    overflow.send("made", {"x": 2})
    # and half a second later one more queue may be made, and no more
    now[0] += 0.5
    overflow.send("tb1", {"x": 3})
    with pytest.raises(QueueCreationRefused):
        overflow.send("tb2", {"x": 4})
    # and after a long pause, still only one at once (the burst)
    now[0] += 60
    overflow.send("tb2", {"x": 5})
    with pytest.raises(QueueCreationRefused):
        overflow.send("tb3", {"x": 6})
    assert overflow.creations_refused == 3
    assert [transit.stat(q).messages for q in ("tb0", "made", "tb1", "tb2")] == [1, 1, 1, 1]
    assert "tb3" not in transit.directory.names()


def test_the_limits_are_options_with_defaults_and_flags():
    # The daemon's defaults: 50 new queues per second, 100 at once
    defaults = DaemonOptions()
    assert (defaults.queue_creation_rate, defaults.queue_creation_burst) == (50, 100)
    # set on the command line, listed in multimodule -h with their field's description
    opts = parse_options(["--queue-creation-rate", "5", "--queue-creation-burst", "7"])
    assert (opts.queue_creation_rate, opts.queue_creation_burst) == (5, 7)
    helptext = build_parser().format_help()
    assert "--queue-creation-rate" in helptext and "--queue-creation-burst" in helptext
    # and refused when not positive
    for argv in (["--queue-creation-rate", "0"], ["--queue-creation-burst", "0"]):
        with pytest.raises(SystemExit):
            parse_options(argv)
    # The Router's: 16 queues per message, set in its config
    from multimodule.tasks.Router import Router
    assert Router.Config().max_static_forward_queues == 16
    assert Router.Config(max_static_forward_queues=2).max_static_forward_queues == 2


def test_built_in_and_frozen_modules_are_never_tasks_even_from_inside_the_task_path(
        tmp_path, monkeypatch):
    # Given the working directory inside a --task-path directory (built-in and frozen modules
    # have no file: their pseudo-paths "built-in" and "frozen" resolve against it)
    from multimodule.errors import TaskNotFound
    from multimodule.runtime.loader import find_task_class

    monkeypatch.chdir(tmp_path)
    for name in ("__hello__", "xxsubtype"):  # frozen, built-in
        sys.modules.pop(name, None)
        # When a task of that name is looked for / Then it is not imported
        with pytest.raises(TaskNotFound):
            find_task_class(name, [""], [tmp_path])
        assert name not in sys.modules, name


async def test_static_forwards_cannot_multiply_a_message_without_bound(inproc):
    # Given a running daemon (default: at most 64 copies per message's static_forwards)
    inproc.capture("copies")
    await inproc.start()
    # When a message's hops name the Router 150 times each (150**3 copies if followed)
    router_hop = [{"forward": {"qname": "Router"}}] * 150
    inproc.send("Router", {"static_forwards": [router_hop, router_hop,
                                               [{"forward": {"qname": "copies"}}]]})
    # and another makes 2 x 3 = 6 copies, within the limit
    inproc.send("Router", {"static_forwards": [[{"forward": {"qname": "Router"}}] * 2,
                                               [{"forward": {"qname": "copies"}}] * 3]})
    await inproc.quiet()
    # Then the first is refused whole and reported, the second makes its 6 copies
    assert inproc.records_of("error", "more than max_static_forward_copies (64)")
    assert len(inproc.taken("copies")) == 6
    assert (await status(inproc))["tasks"]["Router"]["static_forwards_refused"] == 1


# -- what a control message may set of a task's process ------------------------------------

KEEPER = """
    from multimodule import Task

    class Keeper(Task):
        is_stateful = True

        def message(self, message):
            self.state["n"] = self.state.get("n", 0) + 1
"""


async def test_a_control_message_cannot_set_the_environment_of_a_tasks_process(inproc):
    # Given a stateful task that its config file runs in its own process, with one variable
    inproc.task("Keeper", KEEPER)
    inproc.config('[Keeper]\nis_external = true\n'
                  'limits = { environment = { LANG = "C.UTF-8" } }\n')
    await inproc.start()
    assert inproc.backend.dropins == [("Keeper", "# Written by the multimodule daemon from the "
                                       "limits of task Keeper; do not edit.\n[Service]\n"
                                       'Environment="LANG=C.UTF-8"\n')]
    # When a control message (any member of the transit group may send one) gives its
    # process PYTHONPATH (a directory of modules of the sender's), or changes the file's
    # variable, and the task is moved in and out again (its process started anew)
    for env in ({"PYTHONPATH": "/run/multimodule/planted", "LANG": "C.UTF-8"},
                {"LANG": "xx"}):
        code, _, err = await inproc.mmctl(
            "config", "Keeper", json.dumps({"is_external": True,
                                            "limits": {"environment": env}}))
        # Then it is refused, naming the field and the variable
        assert code == 1, (code, err)
        assert "Keeper.limits.environment" in err and sorted(env)[-1] in err, err
    for to in ("--internal", "--external"):
        code, _, err = await inproc.mmctl("migrate", "Keeper", to)
        assert code == 0, err
    # and no process of the task was started with it
    assert len(inproc.backend.dropins) == 2
    assert all(text == inproc.backend.dropins[0][1] for _, text in inproc.backend.dropins)
    # while a control message that keeps the file's variables, or leaves them out, is applied
    for limits in ({"environment": {"LANG": "C.UTF-8"}, "tasks_max": 50}, {}):
        code, _, err = await inproc.mmctl(
            "config", "Keeper", json.dumps({"is_external": True, "limits": limits}))
        assert code == 0, err


TRUSTING = """
    from multimodule import Task

    class Trusting(Task):
        file_only_config = frozenset({"endpoint"})

        def message(self, message):
            pass
"""


async def test_keys_a_task_trusts_come_from_the_config_file_only(inproc):
    # Given a task whose "endpoint" only the config file may set
    inproc.task("Trusting", TRUSTING)
    inproc.config('[Trusting]\nendpoint = "file"\nlevel = 1\n')
    await inproc.start()
    # When a control message changes it, or leaves it out (its default would apply)
    for table in ({"endpoint": "sender's", "level": 2}, {"level": 2}):
        code, _, err = await inproc.mmctl("config", "Trusting", json.dumps(table))
        # Then it is refused naming the field, and the config in force is the file's
        assert code == 1 and "Trusting.endpoint" in err, (code, err)
        assert inproc.daemon.configs.effective("Trusting") == {"endpoint": "file", "level": 1}
    # while one that keeps it is applied
    code, _, err = await inproc.mmctl("config", "Trusting",
                                      json.dumps({"endpoint": "file", "level": 2}))
    assert code == 0, err
    assert inproc.daemon.configs.effective("Trusting")["level"] == 2


@pytest.mark.parametrize("key, value", [("servers", ["nats://192.0.2.1:4222"]),
                                        ("credentials", "/etc/hostname"),
                                        ("ca", "/etc/hostname")])
async def test_a_control_message_cannot_point_the_bridge_elsewhere(inproc, key, value):
    # Given a daemon whose config file has no Bridge
    inproc.task("Keeper", KEEPER)
    inproc.config("[Keeper]\n")
    await inproc.start()
    # When a control message (any member of the transit group) gives the Bridge servers or
    # files to trust: it would sign that server's challenge with this host's credentials
    code, _, err = await inproc.mmctl("config", "Bridge", json.dumps({key: value}))
    # Then it is refused naming the field, and no Bridge is started
    assert code == 1 and f"Bridge.{key}" in err, (code, err)
    assert "Bridge" not in inproc.daemon.runners
