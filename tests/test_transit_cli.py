"""Acceptance: mmctl (and strans, rtrans, qtrans) run as real processes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sysv_ipc

from multimodule.transit import META_KEY, Transit

BIN = Path(sys.executable).parent
MMCTL = [sys.executable, "-m", "multimodule.cli.mmctl"]


def run(argv, env, stdin: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, input=stdin if stdin is not None else "",
                          capture_output=True, text=True, timeout=timeout)


def script(name: str) -> list[str]:
    path = BIN / name
    assert path.is_file(), f"console script {name} not installed next to {sys.executable}"
    return [str(path)]


def parse_objects(text: str) -> list:
    """The JSON values printed one after another (pretty-printed, so over several lines)."""
    decoder = json.JSONDecoder()
    out, pos = [], 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos == len(text):
            return out
        value, pos = decoder.raw_decode(text, pos)
        out.append(value)


def strip_meta(message: dict) -> dict:
    return {k: v for k, v in message.items() if k != META_KEY}


# -- send ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("cmd", [MMCTL + ["send"], script("strans")], ids=["mmctl", "strans"])
def test_send_json_argument(transit, child_env, cmd):
    # Given a JSON object on the command line
    # When it is sent with the CLI
    res = run(cmd + ["cli-q", '{"a": 1, "b": [true, null, "x"]}'], child_env)

    # Then it exits 0 and the message is on the queue, with its meta
    assert res.returncode == 0, res.stderr
    msg = transit.receive("cli-q", timeout=5)
    assert strip_meta(msg) == {"a": 1, "b": [True, None, "x"]}
    assert "send_ts" in msg[META_KEY]


def test_send_json_from_stdin(transit, child_env):
    # Given a JSON object on standard input
    res = run(MMCTL + ["send", "cli-stdin"], child_env, stdin='{"from": "stdin", "n": [1, 2]}\n')
    # Then it is sent
    assert res.returncode == 0, res.stderr
    assert strip_meta(transit.receive("cli-stdin", timeout=5)) == {"from": "stdin", "n": [1, 2]}


@pytest.mark.parametrize("argv, stdin, words", [
    (["cli-bad", '{"a": '], None, "not valid JSON"),
    (["cli-bad", "not json at all"], None, "not valid JSON"),
    (["cli-bad"], "{broken", "not valid JSON"),
    (["cli-bad", "[1, 2]"], None, "must be a JSON object"),
    (["cli-bad", '"text"'], None, "must be a JSON object"),
    (["cli-bad", "42"], None, "must be a JSON object"),
    (["cli-bad"], "null", "must be a JSON object"),
    (["cli-bad", '{"n": 123456789012345678901234567890}'], None, "outside the 64-bit range"),
    (["cli-bad", '{"n": NaN}'], None, "not valid JSON"),
], ids=["truncated", "garbage", "stdin-garbage", "array", "string", "number", "stdin-null",
        "huge-integer", "nan"])
def test_send_bad_input_exits_2_and_sends_nothing(transit, child_env, argv, stdin, words):
    # Given an existing, empty queue
    transit.sysv_queue("cli-bad")
    # When bad input is given to send
    res = run(MMCTL + ["send", *argv], child_env, stdin=stdin)
    # Then the exit status is 2, stderr says why, and nothing was sent
    assert res.returncode == 2
    assert words in res.stderr
    assert res.stdout == ""
    assert transit.stat("cli-bad").messages == 0


@pytest.mark.parametrize("cmd, name, words", [
    (MMCTL + ["send"], "a/b", "slash"),
    (MMCTL + ["recv"], ".hidden", "reserved"),
    (script("strans"), "x" * 201, "too long"),
    (script("rtrans"), "a\nb", "control character"),
], ids=["send-slash", "recv-dot", "strans-long", "rtrans-newline"])
def test_bad_queue_name_exits_2(transit_dir, child_env, cmd, name, words):
    # Given a bad queue name, When the CLI is asked to use it
    rest = ["--timeout", "0"] if "recv" in cmd or "rtrans" in cmd[0] else ["{}"]
    res = run(cmd + [name, *rest], child_env)
    # Then it exits 2 with the reason on stderr, and no queue is registered
    assert res.returncode == 2
    assert words in res.stderr
    assert not transit_dir.exists() or sorted(p.name for p in transit_dir.iterdir()) == [".spill"]


# -- recv ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("cmd", [MMCTL + ["recv"], script("rtrans")], ids=["mmctl", "rtrans"])
def test_recv_prints_count_messages_as_pretty_json(transit, child_env, cmd):
    # Given four messages waiting
    for i in range(4):
        transit.send("cli-recv", {"i": i, "nested": {"list": [i, i + 1]}})

    # When three are received with the CLI
    res = run(cmd + ["cli-recv", "--count", "3", "--timeout", "5"], child_env)

    # Then it prints exactly three JSON objects, pretty-printed, in order, with their meta
    assert res.returncode == 0, res.stderr
    objects = parse_objects(res.stdout)
    assert [strip_meta(o) for o in objects] == [
        {"i": i, "nested": {"list": [i, i + 1]}} for i in range(3)]
    assert all(META_KEY in o for o in objects)
    assert "\n  " in res.stdout  # indented, not one line each
    # And the fourth is still waiting
    assert transit.stat("cli-recv").messages == 1


def test_recv_times_out_with_exit_1(transit, child_env):
    # Given an empty queue
    transit.sysv_queue("cli-empty")
    # When receiving with a 0.3 s timeout
    t0 = time.monotonic()
    res = run(MMCTL + ["recv", "cli-empty", "--timeout", "0.3"], child_env)
    # Then it exits 1 after at least 0.3 s, printing nothing, saying why on stderr
    assert time.monotonic() - t0 >= 0.3
    assert res.returncode == 1
    assert res.stdout == ""
    assert "timed out" in res.stderr


def test_recv_fewer_than_count_exits_1_after_printing_what_came(transit, child_env):
    # Given one message waiting
    transit.send("cli-short", {"only": 1})
    # When three are asked for
    res = run(MMCTL + ["recv", "cli-short", "-n", "3", "-t", "0.2"], child_env)
    # Then the one is printed and the status is 1
    assert res.returncode == 1
    assert [strip_meta(o) for o in parse_objects(res.stdout)] == [{"only": 1}]
    assert "1 of 3" in res.stderr


# -- queues --------------------------------------------------------------------------------------

def raw_sizes(key: int) -> list[int]:
    """Take every raw message off the queue with ``key``; return their sizes in bytes."""
    queue = sysv_ipc.MessageQueue(key)
    sizes = []
    while True:
        try:
            sizes.append(len(queue.receive(False)[0]))
        except sysv_ipc.BusyError:
            return sizes


@pytest.fixture
def three_queues(transit, transit_dir):
    """alpha with 3 small messages, beta with 5 larger ones, gamma empty."""
    for i in range(3):
        transit.send("alpha", {"i": i})
    for i in range(5):
        transit.send("beta", {"i": i, "pad": "b" * 900})
    transit.sysv_queue("gamma")
    return {name: int((transit_dir / name).read_text()) for name in ("alpha", "beta", "gamma")}


def expected_rows(keys: dict[str, int], max_bytes: int) -> dict[str, dict]:
    """What the kernel holds, measured independently: by taking the raw messages off."""
    rows = {}
    for name, key in keys.items():
        sizes = raw_sizes(key)
        total = sum(sizes)
        rows[name] = {"messages": len(sizes), "bytes": total, "max_bytes": max_bytes,
                      "fill_percent": round(100.0 * total / max_bytes, 1)}
    return rows


@pytest.mark.parametrize("cmd", [MMCTL + ["queues"], script("qtrans")], ids=["mmctl", "qtrans"])
def test_queues_json(three_queues, child_env, cmd):
    # Given three queues holding 3, 5 and 0 messages
    # When listing them as JSON
    res = run(cmd + ["--json"], child_env)
    assert res.returncode == 0, res.stderr
    (listing,) = parse_objects(res.stdout)

    # Then each is listed with its count, bytes, capacity and fill
    max_bytes = int(open("/proc/sys/kernel/msgmnb").read())
    expected = expected_rows(three_queues, max_bytes)
    assert [r["name"] for r in listing] == ["alpha", "beta", "gamma"]
    for row in listing:
        want = expected[row["name"]]
        got = {k: row[k] for k in want}
        assert got == want, row["name"]
        assert row["key"] == three_queues[row["name"]]
    assert expected["alpha"]["messages"] == 3 and expected["beta"]["messages"] == 5
    assert expected["beta"]["fill_percent"] > 25.0


def test_queues_table(three_queues, transit_dir, child_env):
    # Given three queues holding 3, 5 and 0 messages
    # When listing them as a table
    res = run(MMCTL + ["queues"], child_env)
    assert res.returncode == 0, res.stderr

    # Then there is a header, one row per queue with the right figures, and a footer
    lines = res.stdout.splitlines()
    assert re.split(r"\s{2,}", lines[0]) == ["NAME", "MESSAGES", "BYTES", "MAX BYTES", "FULL"]
    rows = {cells[0]: cells[1:] for cells in (re.split(r"\s{2,}", ln) for ln in lines[1:4])}
    max_bytes = int(open("/proc/sys/kernel/msgmnb").read())
    expected = expected_rows(three_queues, max_bytes)
    for name, want in expected.items():
        assert rows[name] == [str(want["messages"]), str(want["bytes"]), str(max_bytes),
                              f"{want['fill_percent']:.1f}%"]
    assert lines[4] == ""
    assert lines[5] == f"3 queues listed in {transit_dir}."


# -- -T DIR --------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["before", "after"])
def test_transit_dir_option(transit, transit_dir, other_transit_dir, child_env, where):
    # Given a second transit directory (the environment names the first one)
    other = str(other_transit_dir)

    def argv(command, *rest):
        if where == "before":
            return MMCTL + ["-T", other, command, *rest]
        return MMCTL + [command, "--transit-dir", other, *rest]

    # When a message is sent with -T to the second directory
    res = run(argv("send", "cli-other", '{"where": "other"}'), child_env)
    assert res.returncode == 0, res.stderr

    # Then it is in the second directory, not the first
    assert (other_transit_dir / "cli-other").is_file()
    assert not (transit_dir / "cli-other").exists()
    assert Transit(other_transit_dir).stat("cli-other").messages == 1
    # And the queue listing of that directory shows it
    res = run(argv("queues", "--json"), child_env)
    assert [(r["name"], r["messages"]) for r in parse_objects(res.stdout)[0]] == [("cli-other", 1)]
    # And receiving with -T from that directory gets it
    res = run(argv("recv", "cli-other", "--timeout", "5"), child_env)
    assert res.returncode == 0, res.stderr
    assert [strip_meta(o) for o in parse_objects(res.stdout)] == [{"where": "other"}]


# -- help ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    MMCTL + ["--help"], MMCTL + ["send", "--help"], MMCTL + ["recv", "--help"],
    MMCTL + ["queues", "--help"], script("mmctl") + ["--help"], script("strans") + ["--help"],
    script("rtrans") + ["--help"], script("qtrans") + ["--help"],
], ids=["mmctl", "mmctl-send", "mmctl-recv", "mmctl-queues", "bin-mmctl", "strans", "rtrans",
        "qtrans"])
def test_help_exits_0(child_env, argv):
    res = run(argv, child_env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage:")


# -- argument checks -----------------------------------------------------------------------------

@pytest.mark.parametrize("argv, words", [
    (["recv", "argq", "-t", "nan"], "argument -t/--timeout: 'nan' must be a finite number >= 0"),
    (["recv", "argq", "-t", "inf"], "argument -t/--timeout: 'inf' must be a finite number >= 0"),
    (["recv", "argq", "-t", "-1"], "argument -t/--timeout: '-1' must be a finite number >= 0"),
    (["recv", "argq", "-n", "0"], "argument -n/--count: '0' must be at least 1"),
    (["status", "--wait", "-1"], "argument --wait: '-1' must be a finite number >= 0"),
    (["config", "bad name", "{}"], "argument TASK: 'bad name' is not a task name"),
    (["state", "1x"], "argument TASK: '1x' is not a task name"),
], ids=["recv-t-nan", "recv-t-inf", "recv-t-negative", "recv-n-0", "status-wait-negative",
        "config-bad-name", "state-bad-name"])
def test_bad_arguments_exit_2_with_a_clear_message(transit_dir, child_env, argv, words):
    # When mmctl is given a bad argument
    res = run(MMCTL + argv, child_env, timeout=20)
    # Then it exits 2 (usage) saying which argument and why, and touches no queue
    assert res.returncode == 2, res
    assert words in res.stderr, res.stderr
    assert res.stderr.startswith("usage: mmctl "), res.stderr
    assert "Traceback" not in res.stderr
    assert not (transit_dir / "argq").exists()
    assert not (transit_dir / "MultiModule_control").exists()


def test_recv_skips_a_malformed_message_with_a_warning(transit, child_env):
    # Given a queue holding raw junk and then a good message
    transit.sysv_queue("mixed").send_raw(b"junk")
    transit.send("mixed", {"good": 1})
    # When one message is received with mmctl
    res = run(MMCTL + ["recv", "mixed", "-t", "5"], child_env)
    # Then the good one is printed, the junk is reported on stderr, and it exits 0
    assert res.returncode == 0, res
    assert [strip_meta(o) for o in parse_objects(res.stdout)] == [{"good": 1}]
    assert "mmctl: discarded a malformed message" in res.stderr, res.stderr
    assert "b'junk'" in res.stderr, res.stderr
    assert transit.stat("mixed").messages == 0


@pytest.mark.parametrize("name", ["strans", "rtrans", "qtrans"])
def test_alias_help_names_the_alias(child_env, name):
    # When an alias is asked for help / Then its usage names it, not "mmctl send" etc.
    res = run(script(name) + ["--help"], child_env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"usage: {name} "), res.stdout


@pytest.mark.parametrize("name, argv", [
    ("strans", ["aliasq", "{}", "--no-such-option"]),
    ("rtrans", ["aliasq", "--no-such-option"]),
    ("qtrans", ["--no-such-option"]),
])
def test_alias_unknown_option_error_names_the_alias(transit_dir, child_env, name, argv):
    # When an alias is given an option it does not know
    res = run(script(name) + argv, child_env)
    # Then it exits 2 with its own usage and name, not mmctl's
    assert res.returncode == 2, res
    assert res.stderr.startswith(f"usage: {name} "), res.stderr
    assert f"{name}: error: unrecognized arguments: --no-such-option" in res.stderr, res.stderr
    assert not (transit_dir / "aliasq").exists()


def test_the_man_page_lists_every_mmctl_command():
    # The package's man page shows each command's --help from this list: none may be missing
    from multimodule.cli import mmctl as mmctl_cli

    text = (Path(__file__).resolve().parent.parent / "debian" / "man-commands").read_text()
    listed = re.search(r"for sub in ([^;]*); do", text).group(1).replace("\\\n", " ").split()
    assert sorted(listed) == sorted(mmctl_cli.build_parser().subcommands)
