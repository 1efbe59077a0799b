"""The input journal (files only): numbering, recovery past a checkpoint, torn records,
segments dropped once checkpointed."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from multimodule import journal as journal_mod
from multimodule.journal import Journal


def message(n: int) -> dict:
    return {"n": n, ".ipc_transit_meta": {"id": f"m-{n}"}}


def test_records_are_numbered_in_order_and_recovered_past_the_checkpoint(tmp_path: Path):
    journal = Journal(tmp_path / "j")
    assert [journal.append(message(n)) for n in range(1, 6)] == [1, 2, 3, 4, 5]
    journal.flush()
    journal.close()
    # A new process recovers what is past position 3, and numbers on after the last record
    again = Journal(tmp_path / "j")
    assert [m["n"] for m in again.recover(3)] == [4, 5]
    assert again.next_seq == 6
    assert again.last_ids == {f"m-{n}" for n in range(1, 6)}
    assert stat.S_IMODE((tmp_path / "j").stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in (tmp_path / "j").iterdir())


def test_buffered_records_are_not_on_disk_until_flushed(tmp_path: Path):
    journal = Journal(tmp_path / "j")
    journal.append(message(1))
    assert journal.pending
    assert Journal(tmp_path / "j").recover(0) == []
    journal.flush()
    assert not journal.pending
    assert [m["n"] for m in Journal(tmp_path / "j").recover(0)] == [1]


def test_a_record_written_in_part_is_cut_off_and_numbering_goes_on(tmp_path: Path):
    journal = Journal(tmp_path / "j")
    for n in (1, 2):
        journal.append(message(n))
    journal.close()
    segment = next((tmp_path / "j").iterdir())
    with open(segment, "ab") as f:
        f.write(b'{"n": 3, ".ipc_tr')  # the process was killed inside write()
    again = Journal(tmp_path / "j")
    assert [m["n"] for m in again.recover(0)] == [1, 2]
    assert segment.read_bytes().endswith(b"}\n")
    # The next record gets number 3, and a later recovery sees all three
    assert again.append(message(3)) == 3
    again.close()
    assert [m["n"] for m in Journal(tmp_path / "j").recover(0)] == [1, 2, 3]


def test_a_record_that_is_not_an_object_is_skipped_and_named(tmp_path: Path):
    directory = tmp_path / "j"
    Journal(directory)  # makes the directory
    (directory / f"{1:020d}.journal").write_bytes(b'{"n": 1}\n[2]\n{"n": 3}\n')
    journal = Journal(directory)
    assert [m["n"] for m in journal.recover(0)] == [1, 3]
    assert journal.bad_records == [f"{1:020d}.journal record 2: not a JSON object"]
    assert journal.next_seq == 4


def test_checkpointed_segments_are_deleted_but_the_newest_is_kept(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(journal_mod, "SEGMENT_BYTES", 100)
    journal = Journal(tmp_path / "j")
    for n in range(1, 21):  # one flush per record: a new segment every ~3 records
        journal.append(message(n))
        journal.flush()
    segments = sorted((tmp_path / "j").iterdir())
    assert len(segments) > 3
    # When everything up to 10 is checkpointed
    journal.checkpointed(10)
    # Then the segments wholly at or below 10 are gone, the rest still recover
    left = sorted((tmp_path / "j").iterdir())
    assert len(left) < len(segments)
    first_left = int(left[0].name.split(".")[0])
    assert first_left <= 11
    assert [m["n"] for m in Journal(tmp_path / "j").recover(10)] == list(range(11, 21))
    # When everything is checkpointed, the newest segment alone stays (its last ids matter)
    journal.checkpointed(20)
    assert len(list((tmp_path / "j").iterdir())) == 1
    again = Journal(tmp_path / "j")
    assert again.recover(20) == [] and "m-20" in again.last_ids and again.next_seq == 21


def test_an_empty_segment_left_by_a_kill_is_removed(tmp_path: Path):
    directory = tmp_path / "j"
    journal = Journal(directory)
    journal.append(message(1))
    journal.close()
    (directory / f"{2:020d}.journal").write_bytes(b"")  # made, killed before the write
    again = Journal(directory)
    assert [m["n"] for m in again.recover(0)] == [1]
    assert again.append(message(2)) == 2
    again.flush()  # the new segment can be made under that name
    assert [m["n"] for m in Journal(directory).recover(1)] == [2]


def test_a_journal_directory_writable_by_others_is_refused(tmp_path: Path):
    from multimodule.errors import ConfigError
    directory = tmp_path / "j"
    directory.mkdir()
    os.chmod(directory, 0o777)
    with pytest.raises(ConfigError, match="journal directory"):
        Journal(directory)


def test_a_checkpoint_past_the_last_record_and_a_cut_record_are_reported(tmp_path: Path):
    journal = Journal(tmp_path / "j")
    for n in (1, 2, 3):
        journal.append(message(n))
    journal.close()
    segment = next((tmp_path / "j").iterdir())
    segment.write_bytes(segment.read_bytes()[:-5])  # the last record cut short
    again = Journal(tmp_path / "j")
    assert [m["n"] for m in again.recover(0)] == [1, 2]
    assert again.cut_off and "written in part" in again.cut_off[0]
    # A position beyond every record (a checkpoint from elsewhere) is said, not taken silently
    third = Journal(tmp_path / "j")
    assert third.recover(100) == []
    assert any("past the journal's last record 2" in why for why in third.bad_records)


def test_a_journal_root_writable_by_others_is_refused(tmp_path: Path):
    from multimodule.errors import ConfigError
    root = tmp_path / "journal"
    root.mkdir()
    os.chmod(root, 0o777)
    with pytest.raises(ConfigError, match="journal directory"):
        Journal(root / "Task")
