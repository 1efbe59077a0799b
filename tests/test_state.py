"""State store and instance lock unit tests (files only, no daemon)."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import orjson
import pytest

from multimodule.errors import AlreadyRunning, ConfigError, StateError
from multimodule.state import (
    Checkpoint,
    InstanceLock,
    StateStore,
    claim_temp_files,
    remove_temp_files,
    temp_owner_tag,
    write_atomic,
)


def cp(state: dict) -> Checkpoint:
    """A checkpoint of ``state`` at position 0."""
    return Checkpoint(state=state, incarnation="i0")


def saved(path: Path) -> dict:
    """The state a checkpoint file holds."""
    return Checkpoint.from_json(json.loads(path.read_text()), True).state


def test_save_then_load_round_trip(tmp_path: Path):
    # Given a store / When a state is saved / Then a new store loads the same state
    store = StateStore(tmp_path / "state")
    state = {"ct": 3, "nested": {"l": [1, "two", None]}, "f": 1.5}
    assert store.save("T", cp(state)) is True
    assert StateStore(tmp_path / "state").load("T") == (cp(state), None)
    assert saved(store.file_for("T")) == state


def test_checkpoint_keeps_position_ticks_and_recent_ids_with_the_state(tmp_path: Path):
    store = StateStore(tmp_path)
    checkpoint = Checkpoint(state={"ct": 1}, position=41, incarnation="abc",
                            ticks={"tick": 7}, recent_ids=["x-1", "x-2"])
    store.save("T", checkpoint)
    assert StateStore(tmp_path).load("T") == (checkpoint, None)
    # A stateless task's checkpoint is its position alone, in a file of its own
    position = Checkpoint(state=None, position=9, incarnation="def")
    store.save("S", position)
    assert store.file_for("S", stateful=False).name == "S.checkpoint.json"
    assert not store.file_for("S").exists()
    assert StateStore(tmp_path).load("S", stateful=False) == (position, None)


def test_state_file_from_before_checkpoints_loads_at_position_zero(tmp_path: Path):
    store = StateStore(tmp_path)
    store.file_for("T").write_text('{"ct": 5}')
    checkpoint, problem = store.load("T")
    assert problem is None and checkpoint.state == {"ct": 5} and checkpoint.position == 0


@pytest.mark.parametrize("version, position, why", [
    (1, -3, "'position' is not a non-negative integer"),
    (99, 1, "unknown checkpoint version 99"),
])
def test_a_checkpoint_with_a_bad_field_or_version_is_moved_aside_naming_it(
        tmp_path: Path, version: int, position: int, why: str):
    store = StateStore(tmp_path)
    store.file_for("T").write_text(f'{{"multimodule.checkpoint": {version}, "position": '
                                   f'{position}, "incarnation": "a", "ticks": {{}}, '
                                   f'"recent_ids": [], "state": {{"ct": 1}}}}')
    checkpoint, problem = store.load("T")
    assert (checkpoint.state, checkpoint.position) == ({}, 0)
    assert why in problem and "moved aside" in problem


def test_missing_state_is_empty_without_a_problem(tmp_path: Path):
    checkpoint, problem = StateStore(tmp_path).load("Nothing")
    assert (checkpoint.state, checkpoint.position, problem) == ({}, 0, None)


def test_state_dir_created_private(tmp_path: Path):
    store = StateStore(tmp_path / "a" / "b")
    assert store.path.is_dir()
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o700


def test_state_dir_that_cannot_be_created_is_a_config_error(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot create state directory"):
        StateStore(blocker / "state")


def test_unchanged_state_not_rewritten(tmp_path: Path):
    store = StateStore(tmp_path)
    assert store.save("T", cp({"ct": 1})) is True
    inode = store.file_for("T").stat().st_ino
    assert store.save("T", cp({"ct": 1})) is False
    assert store.file_for("T").stat().st_ino == inode
    assert store.save("T", cp({"ct": 2})) is True
    assert saved(store.file_for("T")) == {"ct": 2}


def test_loaded_state_counts_as_saved(tmp_path: Path):
    StateStore(tmp_path).save("T", cp({"ct": 1}))
    store = StateStore(tmp_path)
    checkpoint, _ = store.load("T")
    assert store.save("T", checkpoint) is False


def test_save_is_atomic_private_and_leaves_no_temporary(tmp_path: Path):
    store = StateStore(tmp_path)
    store.save("T", cp({"ct": 1}))
    store.save("T", cp({"ct": 2}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["T.state.json"]
    assert stat.S_IMODE(store.file_for("T").stat().st_mode) == 0o600


def test_unserialisable_state_refused_and_old_file_kept(tmp_path: Path):
    store = StateStore(tmp_path)
    store.save("T", cp({"ct": 1}))
    with pytest.raises(StateError, match="state of T is not JSON-serialisable"):
        store.save("T", cp({"ct": object()}))
    assert saved(store.file_for("T")) == {"ct": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["T.state.json"]


def test_write_failure_is_a_state_error(tmp_path: Path):
    # Given a state file path that cannot be replaced (a non-empty directory is in the way)
    store = StateStore(tmp_path)
    store.file_for("T").mkdir()
    (store.file_for("T") / "x").write_text("x")
    # When the state is saved / Then a StateError names the task and the cause
    with pytest.raises(StateError, match="cannot save state of T: .*Is a directory"):
        store.save("T", cp({"ct": 1}))


def test_failed_save_leaves_no_temporary_file(tmp_path: Path):
    # Given a save that fails at the rename
    store = StateStore(tmp_path)
    store.file_for("T").mkdir()
    (store.file_for("T") / "x").write_text("x")
    with pytest.raises(StateError):
        store.save("T", cp({"ct": 1}))
    # Then the temporary file written before the rename is removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["T.state.json"]


@pytest.mark.parametrize("content, why", [
    (b"{not json", "not valid JSON"),
    (b"", "not valid JSON"),
    (b"[1, 2]", "a JSON list, not an object"),
    (b'"text"', "a JSON str, not an object"),
])
def test_corrupt_state_moved_aside_with_content_kept(tmp_path: Path, content: bytes, why: str):
    # Given a state file that is not a JSON object
    store = StateStore(tmp_path)
    store.file_for("T").write_bytes(content)
    # When it is loaded
    checkpoint, problem = store.load("T")
    # Then the task starts empty, the file is moved aside intact, the problem says so
    assert checkpoint.state == {}
    aside = list(tmp_path.glob("T.state.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == content
    assert not store.file_for("T").exists()
    assert why in problem and aside[0].name in problem and "starting empty" in problem
    # and saving afterwards writes a fresh file beside the corrupt one
    store.save("T", cp({"ct": 0}))
    assert saved(store.file_for("T")) == {"ct": 0}
    assert aside[0].exists()


# -- the instance lock ------------------------------------------------------------------------


def test_lock_writes_status_and_second_holder_refused_with_pid(tmp_path: Path):
    # Given a held lock
    first = InstanceLock(tmp_path, "multimodule")
    first.acquire()
    try:
        status = orjson.loads((tmp_path / "multimodule.status.json").read_bytes())
        assert status["pid"] == os.getpid()
        assert status["argv"] == sys.argv
        assert isinstance(status["start_time"], float)
        # When a second lock on the same directory is tried (another open file description)
        second = InstanceLock(tmp_path, "multimodule")
        with pytest.raises(AlreadyRunning) as info:
            second.acquire()
        # Then it is refused naming the holder's pid, and the holder's status is untouched
        assert info.value.pid == os.getpid()
        assert f"pid {os.getpid()}" in str(info.value)
        assert orjson.loads((tmp_path / "multimodule.status.json").read_bytes()) == status
    finally:
        first.release()
    # After release: the status file is gone and the lock can be taken again
    assert not (tmp_path / "multimodule.status.json").exists()
    third = InstanceLock(tmp_path, "multimodule")
    third.acquire()
    third.release()


def test_locks_of_different_names_do_not_conflict(tmp_path: Path):
    a = InstanceLock(tmp_path, "multimodule")
    b = InstanceLock(tmp_path, "task-Example1")
    a.acquire()
    try:
        b.acquire()
        b.release()
    finally:
        a.release()


@pytest.fixture
def claimed():
    """This process's temporary files carry the daemon's lock name while the test runs."""
    claim_temp_files("multimodule")
    yield temp_owner_tag("multimodule")
    claim_temp_files(None)


def test_temporary_files_carry_the_name_of_their_writers_lock(tmp_path: Path, claimed,
                                                              monkeypatch):
    renamed = []
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append(Path(a).name),
                                                      replace(a, b)))
    write_atomic(tmp_path / "T.state.json", b"{}")
    claim_temp_files("task-T")
    write_atomic(tmp_path / "T.state.json", b"{}")
    claim_temp_files(None)
    write_atomic(tmp_path / "T.state.json", b"{}")
    assert [name[:-16] for name in renamed] == [
        f".T.state.json.tmp-{claimed}-", f".T.state.json.tmp-{temp_owner_tag('task-T')}-",
        ".T.state.json.tmp-"]
    assert all(len(set(name[-16:]) - set("0123456789abcdef")) == 0 for name in renamed)
    assert len({temp_owner_tag(n) for n in ("multimodule", "task-T", "task-T2")}) == 3


def test_only_the_owners_own_temporary_files_are_removed(tmp_path: Path, claimed):
    # Given a state dir where the daemon (owner "multimodule") was killed during two saves
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    rand = "0123456789abcdef"
    ours = [f".Big.state.json.tmp-{claimed}-{rand}", f".x.tmp-y.tmp-{claimed}-{rand[::-1]}"]
    for name in ours:
        (state / name).write_bytes(b"x" * 1000)
    # And beside them what is not its to remove
    outside = tmp_path / "outside"
    outside.write_bytes(b"keep")
    external = temp_owner_tag("task-Big")
    kept = {
        f".Big.state.json.tmp-{external}-{rand}": "file",  # an external task's save
        f".Big.state.json.tmp-{rand}": "file",  # written without a claim
        f".Big.state.json.tmp-{claimed}-{rand}0": "file",  # not the pattern
        f".Big.state.json.tmp-{claimed}-{rand.upper()}": "file",
        f"Big.state.json.tmp-{claimed}-{rand}": "file",
        f".Big.state.json.tmp-{claimed}-{rand[:-1]}x": "file",
        "Big.state.json": "file",
        f".link.tmp-{claimed}-{rand}": "symlink",  # never followed, never removed
        f".dir.tmp-{claimed}-{rand}": "dir",
    }
    if os.geteuid() == 0:  # a file of another user's (only root can make one here)
        kept[f".theirs.tmp-{claimed}-{rand}"] = "other user's"
    for name, kind in kept.items():
        path = state / name
        if kind == "symlink":
            path.symlink_to(outside)
        elif kind == "dir":
            path.mkdir()
        else:
            path.write_bytes(b"y")
            if kind == "other user's":
                os.chown(path, 65534, 65534)
    # When the daemon, holding its lock again, removes its own
    removed, size = remove_temp_files(state, "multimodule")
    # Then exactly those are gone, and everything else is as it was
    assert sorted(removed) == sorted(ours) and size == 2000
    assert sorted(os.listdir(state)) == sorted(kept)
    assert outside.read_bytes() == b"keep"
    # And an external task's process removes its own only
    assert remove_temp_files(state, "task-Big") == ([f".Big.state.json.tmp-{external}-{rand}"],
                                                    1)
