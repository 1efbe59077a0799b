"""The fault suite in CI: what ``kill -9`` of real daemons and task processes loses, with small
counts (the instrument is ``tests/fault_harness.py``; ``bench/faults.py`` runs it with large
counts and prints a table).

Goals of crash-safe delivery, asserted per scenario: 0 messages lost, FaultCounter's saved
state consistent with what the sink received, 0 duplicates a receiver with ``dedupe`` would
take (the sink, a plain queue, sees the copies made again after a kill; each carries the id
of its first copy), and with an unread sink queue the daemon's RSS under 100 MB while the
producer is held back. Run with ``-s`` to see each run's figures. The baseline (no fault)
checks the instrument itself: a pipeline that is not disturbed loses, repeats and reorders
nothing, and the run leaves no process or queue behind.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fault_harness import (
    FaultResult,
    Options,
    SinkRecord,
    run_scenario,
    sink_figures,
    state_consistency,
)
from multimodule.transit import Transit

#: Slow (soaks real daemons and task processes killed -9 for many seconds): run by CI, left out by
#: ``-m "not slow"``.
pytestmark = pytest.mark.slow

#: Small runs: each stream paced so that it outlasts its faults.
CI = {
    "0": Options(count=2000, kills=0, dedupe=True, quiet_s=1.0, drain_timeout_s=30.0),
    "a": Options(count=3000, kills=5, rate=600, dedupe=True, drain_timeout_s=30.0,
                 recovery_timeout_s=30.0),
    # b: the detached backend's restart backoff doubles (1, 2, 4 s) over three quick kills:
    # a 10 s stream still flows after the third.
    "b": Options(count=4000, kills=3, rate=400, dedupe=True, drain_timeout_s=30.0,
                 recovery_timeout_s=30.0),
    # c and f: streams long enough (5-6 s) that the third kill, after two restarts of about
    # 0.7 s each and a wait for a save, still finds messages to flow on a loaded machine.
    "c": Options(count=3000, kills=3, rate=600, dedupe=True, drain_timeout_s=30.0,
                 recovery_timeout_s=30.0),
    "d": Options(count=2000, kills=2, rate=400, dedupe=True, drain_timeout_s=30.0,
                 recovery_timeout_s=30.0),
    # 8 s of an unread queue fill 2 MiB of outbox, not the default 16 MiB, here.
    "e": Options(unread_s=8.0, dedupe=True, drain_timeout_s=30.0, rss_cap_bytes=200 * 2**20,
                 outbox_max_bytes=2 * 2**20),
    "f": Options(count=1800, kills=3, rate=300, dedupe=True, drain_timeout_s=30.0,
                 recovery_timeout_s=30.0),
}


def run(key: str, tmp_path: Path, transit_dir: Path) -> FaultResult:
    """Run scenario ``key`` with its CI options; print its figures (shown with ``-s``)."""
    result = run_scenario(key, CI[key], tmp_path / "run", transit_dir)
    print(result.summary())
    return result


def assert_goals(result: FaultResult) -> None:
    """Every goal of crash-safe delivery (see :meth:`FaultResult.goals_missed`)."""
    missed = result.goals_missed()
    assert not missed, "goals missed:\n  " + "\n  ".join(missed) + "\n" + result.summary()


# -- the instrument ----------------------------------------------------------------------------


def record(n: int, *, id_: str | None = None, in_id: str | None = None) -> SinkRecord:
    """A sink record of number ``n`` (transit id ``id_``, forwarded from input ``in_id``);
    times and counts are not used."""
    return SinkRecord(n=n, arrived=0.0, forwarded=0.0, count=0, pid=1, id=id_, in_id=in_id)


def test_sink_figures_count_lost_duplicates_and_reordering():
    # Given 0..5 sent, and the sink receiving 0 1 1 3 2 3 (4 and 5 never)
    records = [record(n) for n in (0, 1, 1, 3, 2, 3)]
    figures = sink_figures(records, sent=6)
    # Then two are lost, two are repeats, and 2 after 3 is one reordering (a repeat of an
    # already seen number is not compared)
    assert figures["lost"] == 2
    assert figures["duplicates"] == 2
    assert figures["out_of_order"] == 1
    assert figures["distinct"] == 4 and figures["received"] == 6
    assert figures["last_n"] == 3 and not figures["ids_seen"]


def test_sink_figures_tell_resends_inputs_handled_twice_and_numbers_never_sent():
    # 0 delivered twice from one send; 1 forwarded twice from one input (handled twice);
    # 7 was never sent
    records = [record(0, id_="a", in_id="x"), record(0, id_="a", in_id="x"),
               record(1, id_="b", in_id="y"), record(1, id_="c", in_id="y"),
               record(7, id_="d", in_id="z")]
    figures = sink_figures(records, sent=2)
    assert figures["duplicates"] == 2
    assert figures["duplicates_same_id"] == 1 and figures["duplicates_same_input"] == 2
    assert figures["unexpected"] == 1 and figures["lost"] == 0 and figures["ids_seen"]


def test_state_consistency_compares_the_saved_count_and_last_number_with_the_sink():
    state = {"streams": {"s": {"count": 3, "last_n": 2}}, "ballast": "bb"}
    assert state_consistency(state, "s", 3, 2, ballast_bytes=2)[:2] == (True, None)
    ok, why, _, _ = state_consistency(state, "s", 4, 3)
    assert not ok and "count 3 != 4" in why and "last_n 2 != last received 3" in why
    assert not state_consistency(state, "s", 3, 2, ballast_bytes=5)[0]
    assert not state_consistency(None, "s", 0, None)[0]
    assert not state_consistency({"streams": {}}, "s", 1, 0)[0]


def test_an_undisturbed_pipeline_loses_nothing_and_leaves_nothing_behind(tmp_path, transit_dir):
    # Given the daemon, FaultCounter and the sink, with no fault
    result = run("0", tmp_path, transit_dir)
    # Then every number arrives once, in order, the saved state agrees, and the run drained
    assert_goals(result)
    assert result.received == result.sent == CI["0"].count
    assert result.out_of_order == 0 and result.drained
    assert result.cold_start_s is not None
    # and none of its processes or System V queues is left
    assert result.leftovers == []
    assert Transit(transit_dir).queues() == []


def test_bad_options_are_refused_before_anything_starts(tmp_path):
    with pytest.raises(ValueError, match="count must be at least kills"):
        run_scenario("a", Options(count=3, kills=5), tmp_path / "run")
    with pytest.raises(ValueError, match="route"):
        run_scenario("0", Options(route="sideways"), tmp_path / "run")
    with pytest.raises(KeyError, match="no scenario 'z'"):
        run_scenario("z", Options(), tmp_path / "run")
    assert not (tmp_path / "run").exists()


# -- the scenarios ---------------------------------------------------------------------------


def test_a_daemon_killed_five_times_mid_stream_with_the_sink_full_at_times(tmp_path,
                                                                         transit_dir):
    result = run("a", tmp_path, transit_dir)
    assert len(result.kills) == CI["a"].kills
    assert_goals(result)


def test_b_external_task_killed_repeatedly(tmp_path, transit_dir):
    result = run("b", tmp_path, transit_dir)
    assert len(result.kills) == CI["b"].kills
    assert_goals(result)


def test_c_daemon_and_external_task_killed_together(tmp_path, transit_dir):
    result = run("c", tmp_path, transit_dir)
    assert len(result.kills) == CI["c"].kills
    assert_goals(result)


def test_d_daemon_killed_during_migrations_under_a_stream(tmp_path, transit_dir):
    result = run("d", tmp_path, transit_dir)
    assert len(result.kills) == CI["d"].kills
    assert_goals(result)


def test_e_unread_sink_queue_keeps_the_daemon_small_and_holds_the_producer_back(tmp_path,
                                                                                transit_dir):
    result = run("e", tmp_path, transit_dir)
    assert_goals(result)


def test_f_daemon_killed_while_saving_a_5_mb_state(tmp_path, transit_dir):
    result = run("f", tmp_path, transit_dir)
    assert len(result.kills) == CI["f"].kills
    assert_goals(result)
