"""Acceptance: the transit directory, its files and the queues are private (or group-shared),
never world-accessible."""

from __future__ import annotations

import grp
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
import sysv_ipc

from multimodule.transit import Transit


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def proc_row(key: int) -> dict:
    lines = Path("/proc/sysvipc/msg").read_text().splitlines()
    header = lines[0].split()
    rows = [dict(zip(header, line.split())) for line in lines[1:]]
    (row,) = [r for r in rows if int(r["key"]) == key]
    return row


def all_entries(root: Path) -> list[Path]:
    return [root, *root.rglob("*")]


def shared_group() -> int:
    """An existing group other than ours if there is one (adm, nogroup), else our own."""
    for name in ("adm", "nogroup"):
        try:
            gid = grp.getgrnam(name).gr_gid
        except KeyError:
            continue
        if gid != os.getgid():
            return gid
    return os.getgid()


@pytest.mark.parametrize("mask", [0o022, 0o000], ids=["umask022", "umask000"])
def test_private_by_default(transit_dir, umask, mask, monkeypatch):
    # Given a process with a permissive umask (and no group from the environment)
    monkeypatch.delenv("MULTIMODULE_TRANSIT_GROUP", raising=False)
    umask(mask)
    transit = Transit(transit_dir)

    # When it uses a queue and leaves a large (spilled) message waiting
    transit.send("perm-q", {"a": 1})
    transit.send("perm-big", {"d": "x" * 50_000})

    # Then the directory and the spill directory are 0700, the files 0600
    assert mode(transit_dir) == 0o700
    assert mode(transit_dir / ".spill") == 0o700
    assert mode(transit_dir / "perm-q") == 0o600
    assert mode(transit_dir / "perm-big") == 0o600
    (spilled,) = (transit_dir / ".spill").iterdir()
    assert mode(spilled) == 0o600
    # And the queues are 0600 (as the kernel reports them, two ways)
    for name in ("perm-q", "perm-big"):
        key = int((transit_dir / name).read_text())
        assert sysv_ipc.MessageQueue(key).mode & 0o777 == 0o600
        assert proc_row(key)["perms"] == "600"
    # And nothing is accessible to others
    assert [p for p in all_entries(transit_dir) if mode(p) & 0o007] == []


def test_group_shared_directory_and_queue(transit_dir, umask):
    # Given a transit shared with a group
    umask(0o022)
    gid = shared_group()
    transit = Transit(transit_dir, group=gid)

    # When a queue is used
    transit.send("grp-q", {"a": 1})

    # Then the directories are 0770 and belong to the group
    for d in (transit_dir, transit_dir / ".spill"):
        assert mode(d) == 0o770
        assert os.stat(d).st_gid == gid
    # And the queue is 0660 and belongs to the group
    key = int((transit_dir / "grp-q").read_text())
    queue = sysv_ipc.MessageQueue(key)
    assert queue.mode & 0o777 == 0o660
    assert queue.gid == gid
    row = proc_row(key)
    assert row["perms"] == "660" and int(row["gid"]) == gid
    # And nothing is accessible to others
    assert [p for p in all_entries(transit_dir) if mode(p) & 0o007] == []


def test_group_by_name(transit_dir):
    # Given a group given by name
    gid = shared_group()
    name = grp.getgrgid(gid).gr_name
    # When the transit is made and used, Then its queue belongs to that group
    Transit(transit_dir, group=name).send("grp-name", {"a": 1})
    key = int((transit_dir / "grp-name").read_text())
    assert sysv_ipc.MessageQueue(key).gid == gid


@pytest.mark.parametrize("mask", [0o022, 0o000], ids=["umask022", "umask000"])
def test_group_shared_files_are_group_writable(transit_dir, umask, mask):
    # Given a transit shared with a group, in a process with the usual umask (or none)
    umask(mask)
    gid = shared_group()
    transit = Transit(transit_dir, group=gid)

    # When a name is registered and a large message waits in the spill area
    transit.send("grp-files", {"d": "x" * 50_000})

    # Then the name file and the spill file are 0660 and belong to the group (as documented:
    # the other members must be able to open the name and read and remove the spill file)
    (spilled,) = (transit_dir / ".spill").iterdir()
    for path in (transit_dir / "grp-files", spilled):
        assert os.stat(path).st_gid == gid
        assert mode(path) == 0o660, f"{path.name}: {oct(mode(path))}"


def test_a_directory_shared_with_a_group_shares_its_queues_without_the_environment(
        transit_dir, umask, monkeypatch):
    # Given a transit directory its owner shares with a group (0770), as the packaged
    # service does with /run/multimodule/transit
    monkeypatch.delenv("MULTIMODULE_TRANSIT_GROUP", raising=False)
    umask(0o022)
    gid = shared_group()
    Transit(transit_dir, group=gid)
    # When another process uses it without being told the group (a member's mmctl)
    Transit(transit_dir).send("member-q", {"a": 1})
    # Then its queue and name file are shared with that group too
    key = int((transit_dir / "member-q").read_text())
    assert sysv_ipc.MessageQueue(key).gid == gid
    assert sysv_ipc.MessageQueue(key).mode & 0o777 == 0o660
    assert mode(transit_dir / "member-q") == 0o660
    # While a private directory stays private
    private = Transit(transit_dir.parent / "private-transit")
    try:
        private.send("own-q", {"a": 1})
        assert mode(private.path / "own-q") == 0o600
    finally:
        private.remove_all()


def _as_member(uid: int, gid: int, work) -> int:
    """Run ``work()`` in a forked child with user ``uid`` in group ``gid``; its exit status
    (0 if ``work`` returned)."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([gid])
            os.setgid(gid)
            os.setuid(uid)
            work()
            os._exit(0)
        except BaseException as exc:  # report, never return into pytest in the child
            os.write(2, f"member {uid}: {type(exc).__name__}: {exc}\n".encode())
            os._exit(1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as other users")
def test_a_member_renews_a_queue_another_member_registered():
    # Given a transit directory shared with a group, reachable by other users
    gid = shared_group()
    top = Path(tempfile.mkdtemp(prefix="mm-shared-"))
    top.chmod(0o755)
    path = top / "transit"
    owner = Transit(path, group=gid)
    try:
        # When one member registers a queue, and the queue is removed (as logind removes a
        # user's queues when the last session ends)
        assert _as_member(65534, gid, lambda: Transit(path).sysv_queue("Shared")) == 0
        assert os.stat(path / "Shared").st_uid == 65534
        sysv_ipc.MessageQueue(owner.directory.lookup_key("Shared")).remove()
        # Then another member (here, another uid of the group) makes it anew, in the same file
        def renew():
            Transit(path).send("Shared", {"n": 1}, timeout=0)

        assert _as_member(65533, gid, renew) == 0
        assert owner.receive("Shared", timeout=5)["n"] == 1
    finally:
        owner.remove_all()
        shutil.rmtree(top, ignore_errors=True)
