"""The seed example end to end: examples/seed.toml with the repository's tasks/ directory.

Example1 ticks once a second as shipped; the test runs the same file with its schedule's
interval set to 0.1 s through the config's own ``intervals`` key (what an operator would
write), so that it takes a second rather than seven."""

from __future__ import annotations

import json
import re

from helpers import REPO, saved_state

SEED = REPO / "examples" / "seed.toml"
#: The seed config as shipped, with Example1's schedule ticking every 0.1 s.
FAST_SEED = SEED.read_text().replace('[Example1]\n', '[Example1]\nintervals = { emit = 0.1 }\n', 1)
LINE = re.compile(r"^Example2: received a message: (\d+) \(howdy\)$")


def printed_numbers(daemon) -> list[int]:
    return [int(LINE.match(line).group(1)) for line in daemon.lines_matching("stdout", LINE)]


def test_seed_example_counts_persists_and_obeys_new_ct(mm):
    assert FAST_SEED != SEED.read_text()  # the interval was set
    seed = mm.config(FAST_SEED)
    argv = ("--task-path", str(REPO / "tasks"))
    # Given the seed example running with an empty state dir
    first = mm.start(*argv, config=seed)
    # Then Example2 prints 0, 1, 2 in order
    for n in range(3):
        first.expect("stdout", LINE, timeout=5)
    assert printed_numbers(first)[:3] == [0, 1, 2]
    # When it gets SIGTERM
    first.stop_ok()
    # Then the saved counter is the next number to print (nothing lost or repeated)
    printed = printed_numbers(first)
    assert printed == list(range(len(printed)))
    saved = saved_state(mm.state_file("Example1"))["ct"]
    assert saved == printed[-1] + 1

    # Given a second run on the same state dir
    second = mm.start(*argv, config=seed)
    # Then it continues the count from the saved counter
    n = int(LINE.match(second.expect("stdout", LINE, timeout=5)).group(1))
    assert n == saved
    # When mmctl send sets new_ct
    result = mm.mmctl_proc("send", "Example1", '{"new_ct": 999}')
    assert result.returncode == 0, result.stderr
    # Then the count jumps to 999, then 1000
    line = second.expect("stdout", "received a message: 999 (howdy)", timeout=5)
    assert LINE.match(line)
    line = second.expect("stdout", LINE, timeout=5)
    assert line == "Example2: received a message: 1000 (howdy)"
    second.wait_line("stdout", "Example1: counter set to 999")
    # and the numbers before the jump were contiguous from the saved count
    numbers = printed_numbers(second)
    jump = numbers.index(999)
    assert numbers[:jump] == list(range(saved, saved + jump))
    second.stop_ok()
    assert saved_state(mm.state_file("Example1"))["ct"] == \
        printed_numbers(second)[-1] + 1
