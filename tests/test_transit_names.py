"""Acceptance: bad queue names are refused with a clear message; long and unicode names work."""

from __future__ import annotations

import json
import os

import pytest

from multimodule.transit import MAX_NAME_CHARS, InvalidQueueName, validate_qname

BAD_NAMES = [
    pytest.param("", "empty", id="empty"),
    pytest.param("a/b", "slash", id="slash"),
    pytest.param("a\x00b", "control character", id="nul"),
    pytest.param("a\nb", "control character", id="newline"),
    pytest.param("tab\there", "control character", id="tab"),
    pytest.param(".hidden", "starts with '.'", id="dot"),
    pytest.param("..", "starts with '.'", id="dotdot"),
    pytest.param("x" * 201, "too long", id="201-chars"),
    pytest.param("é" * 128, "too long", id="256-bytes"),
    pytest.param(42, "must be a str", id="int"),
    pytest.param(None, "must be a str", id="none"),
    pytest.param(b"bytes", "must be a str", id="bytes"),
    pytest.param(["a"], "must be a str", id="list"),
]

OPERATIONS = {
    "send": lambda t, n: t.send(n, {"a": 1}),
    "receive": lambda t, n: t.receive(n, timeout=0),
    "stat": lambda t, n: t.stat(n),
    "declare_local": lambda t, n: t.declare_local(n),
}


def test_max_name_chars_is_200():
    assert MAX_NAME_CHARS == 200


@pytest.mark.parametrize("op", list(OPERATIONS))
@pytest.mark.parametrize("name, words", BAD_NAMES)
def test_bad_names_are_refused(transit, transit_dir, name, words, op):
    # Given a bad queue name
    # When it is used
    with pytest.raises(InvalidQueueName) as info:
        OPERATIONS[op](transit, name)

    # Then the error says what is wrong with it
    assert words in str(info.value)
    # And nothing was created for it
    assert os.listdir(transit_dir) == [".spill"]


@pytest.mark.parametrize("name, words", BAD_NAMES)
def test_validate_qname_refuses(name, words):
    with pytest.raises(InvalidQueueName, match=words.replace(".", r"\.")):
        validate_qname(name)


RECEIVER = """
import json, sys
from multimodule import transit
msg = transit.receive(sys.argv[1], timeout=15)
print(json.dumps(msg), flush=True)
"""

GOOD_NAMES = [
    pytest.param("q" * 200, id="200-chars"),
    pytest.param("naïve-queue", id="unicode"),
    pytest.param("é" * 127, id="254-bytes"),
    pytest.param("名前 with spaces-and_symbols!@#", id="cjk-spaces"),
]


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_good_names_work_across_processes(transit, transit_dir, spawn, name):
    # Given a long or unicode name
    assert validate_qname(name) == name

    # When a message is sent to it
    transit.send(name, {"to": name})

    # Then it is registered under exactly that name, and another process receives it
    assert (transit_dir / name).is_file()
    child = spawn(RECEIVER, name)
    assert json.loads(child.readline())["to"] == name
    assert child.finish() == 0
    assert transit.stat(name).messages == 0
