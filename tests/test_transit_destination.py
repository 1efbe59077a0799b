"""Sends to another host: ``destination=HOST`` puts the message on the Bridge's queue, marked
for the queue on that host; this host's own name is a local send; bad names are refused."""

from __future__ import annotations

import pytest

from multimodule import transit as transit_api
from multimodule.errors import InvalidDestination, InvalidQueueName
from multimodule.transit import META_KEY
from multimodule.transit.lowlevel import hostname
from helpers import router_section


def test_a_send_to_another_host_goes_to_the_bridge_queue_marked_for_that_host(transit):
    # When a message is sent to queue "Orders" on host "far-away"
    transit.send("Orders", {"n": 1}, destination="far-away", trace="t")
    # Then it waits on the local Bridge queue, with where it goes in its meta
    message = transit.receive("Bridge", timeout=5)
    meta = message.pop(META_KEY)
    assert message == {"n": 1}
    assert meta["destination_host"] == "far-away"
    assert meta["destination_qname"] == "Orders"
    assert meta["trace"] == "t"
    assert meta["source_hostname"] == hostname()
    # And no queue "Orders" was made here
    assert not transit.exists("Orders")


def test_a_send_to_this_hosts_own_name_is_a_local_send(transit):
    # When a message is sent with this host's own name as destination
    transit.send("Orders", {"n": 2}, destination=hostname())
    # Then it is on the local queue, without destination keys, and the Bridge got nothing
    message = transit.receive("Orders", timeout=5)
    assert message["n"] == 2
    assert "destination_host" not in message[META_KEY]
    assert not transit.exists("Bridge")


def test_the_host_name_comes_from_the_environment_when_set(spawn, transit):
    # Given a sender whose $MULTIMODULE_HOSTNAME is "hostA"
    child = spawn("""
import os, sys
os.environ["MULTIMODULE_HOSTNAME"] = "hostA"
from multimodule import transit
transit.send("Here", {"n": 1}, destination="hostA")
transit.send("Here", {"n": 3}, destination="HOSTa")
transit.send("There", {"n": 2}, destination="hostB")
""")
    assert child.finish() == 0
    # Then a send to hostA stayed local and one to hostB went to the Bridge
    here = transit.receive("Here", timeout=5)
    assert here[META_KEY]["source_hostname"] == "hostA"
    assert transit.receive("Here", timeout=5)["n"] == 3
    there = transit.receive("Bridge", timeout=5)
    assert there[META_KEY]["destination_host"] == "hostb"  # carried in lower case
    # And this host's own name in another case is a local send too



@pytest.mark.parametrize("destination, words", [
    ("", "1 to 253"),
    ("a" * 254, "1 to 253"),
    ("two words", "not a host name"),
    ("a/b", "not a host name"),
    ("a*", "not a host name"),
    ("a>", "not a host name"),
    ("tab\there", "not a host name"),
    ("nul\x00", "not a host name"),
    (42, "not int"),
])
def test_a_bad_destination_is_refused_and_nothing_is_sent(transit, destination, words):
    with pytest.raises(InvalidDestination, match=words):
        transit.send("Orders", {"n": 1}, destination=destination)
    assert not transit.exists("Bridge")


def test_a_bad_queue_name_for_another_host_is_refused_here(transit):
    with pytest.raises(InvalidQueueName):
        transit.send("a/b", {"n": 1}, destination="far-away")
    assert not transit.exists("Bridge")


def test_the_module_level_send_takes_a_destination(transit):
    transit_api.configure(transit.path)
    transit_api.send("Orders", {"n": 3}, destination="far-away")
    assert transit.receive("Bridge", timeout=5)[META_KEY]["destination_qname"] == "Orders"


async def test_tasks_and_router_forwards_send_to_other_hosts_through_the_bridge(inproc):
    # Given a task that sends to host "b" directly, and a Router route forwarding to host "c"
    inproc.task("Sender", """
        from multimodule import Task
        class Sender(Task):
            def message(self, message):
                self.send("Remote", {"n": message["n"]}, destination="b")
                self.emit({"n": message["n"]})
    """)
    inproc.config("[Sender]\n" + router_section(
        '{ match = { source = "Sender" }, forwards = [ { qname = "Far", destination = "c" } ] }'))
    inproc.capture("Bridge")
    await inproc.start()
    # When the task handles one message
    inproc.send("Sender", {"n": 7})
    await inproc.quiet()
    # Then both sends wait on the Bridge queue, each marked for its host and queue, with ids
    got = [await inproc.next("Bridge", meta=True) for _ in range(2)]
    marks = sorted((m[META_KEY]["destination_host"], m[META_KEY]["destination_qname"], m["n"])
                   for m in got)
    assert marks == [("b", "Remote", 7), ("c", "Far", 7)]
    assert all(isinstance(m[META_KEY]["id"], str) for m in got)
