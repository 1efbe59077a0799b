"""Security: the files a daemon running as root writes and reads, against another local user.

The attacker is a real second user, created for each test (``useradd``) and removed after; its
steps (directories, planted files, symbolic links) run in a forked child that has become that
user. The daemon is a real ``multimodule`` process run as root (the ``mm`` fixture). The
directories the attacker works in live under a fresh directory in /tmp that every user may
write, as the working directory of the issue was (the test's own tmp dir is root's only); a
root-only file ``secret`` there stands for what the attacker would have root overwrite.

Needs root (skipped otherwise, never under CI).
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest
import sysv_ipc

from helpers import receive_n, route, router_section, saved_state, wait_for_file

SECRET = b"root only: do not touch\n"

COUNTER = """
    from multimodule import Task

    class Counter(Task):
        is_stateful = True

        def message(self, message):
            self.state["ct"] = self.state.get("ct", 0) + 1
            self.emit({"ct": self.state["ct"]})
"""

COUNTER_CONFIG = "[Counter]\n\n" + router_section(route("Counter", "out"))


def _need_root() -> None:
    why = None
    if os.geteuid() != 0:
        why = "needs root (the daemon runs as root, the attacker as another user)"
    elif shutil.which("useradd") is None or shutil.which("userdel") is None:
        why = "needs useradd and userdel (package passwd)"
    if why:
        if os.environ.get("CI"):
            raise RuntimeError(f"the security tests must run under CI: {why}")
        pytest.skip(why)


@dataclass
class Attacker:
    """Another local user: ``run(work)`` calls ``work()`` in a forked child that is this user
    (with its own group only, umask 022) and fails the test if ``work`` raised."""

    name: str
    uid: int
    gid: int

    def run(self, work: Callable[[], None]) -> None:
        pid = os.fork()
        if pid == 0:
            try:
                os.setgroups([self.gid])
                os.setgid(self.gid)
                os.setuid(self.uid)
                os.umask(0o022)
                work()
                os._exit(0)
            except BaseException as exc:  # never return into pytest in the child
                os.write(2, f"attacker {self.name}: {type(exc).__name__}: {exc}\n".encode())
                os._exit(1)
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        assert status == 0, f"the attacker's step failed (status {status}); see stderr"


@pytest.fixture
def attacker() -> Iterator[Attacker]:
    """A throwaway system user with its own group, removed after the test."""
    _need_root()
    name = f"mmtest-{secrets.token_hex(4)}"
    subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                    "--shell", "/usr/sbin/nologin", name],
                   check=True, capture_output=True, text=True)
    try:
        entry = pwd.getpwnam(name)
        yield Attacker(name, entry.pw_uid, entry.pw_gid)
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)
        try:
            grp.getgrnam(name)
        except KeyError:
            pass
        else:
            subprocess.run(["groupdel", name], check=False, capture_output=True)


def _remove_queues(transit_dir: Path) -> None:
    """Remove the System V queues registered in ``transit_dir`` (without the library, which
    may refuse the directory)."""
    if not transit_dir.is_dir():
        return
    for entry in transit_dir.iterdir():
        if entry.name.startswith(".") or not entry.is_file():
            continue
        try:
            sysv_ipc.MessageQueue(int(entry.read_text())).remove()
        except (ValueError, OSError, sysv_ipc.Error):
            pass


@pytest.fixture
def top() -> Iterator[Path]:
    """A fresh directory every user may write (as the daemon's working directory was in the
    issue), with a root-only file ``secret`` in it; removed after."""
    path = Path(tempfile.mkdtemp(prefix="mm-sec-"))
    try:
        path.chmod(0o777)
        secret = path / "secret"
        secret.write_bytes(SECRET)
        secret.chmod(0o600)
        yield path
    finally:
        for transit_dir in path.glob("transit*"):
            _remove_queues(transit_dir)
        shutil.rmtree(path, ignore_errors=True)


def shared_state_dir(top: Path, attacker: Attacker) -> Path:
    """A state dir of root's, shared with the attacker's group (0770), as the packaged
    service's ``StateDirectoryMode=0770`` shares its own with its group."""
    path = top / "state"
    path.mkdir()
    os.chown(path, 0, attacker.gid)
    path.chmod(0o770)
    return path


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def outcome(daemon, timeout: float = 20.0) -> int | None:
    """Wait until the daemon exits (its status) or says it runs (``None``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.proc.poll() is not None:
            return daemon.wait_exit()
        if daemon.lines_matching("stdout", "running (pid "):
            return None
        time.sleep(0.02)
    raise AssertionError(f"daemon neither ran nor exited within {timeout} s\n"
                         f"{daemon.output()}")


# -- item 1: symbolic links and planted files in the state directory ----------------------


@pytest.mark.parametrize("where", ["attackers-state-dir", "group-shared-state-dir"])
def test_lock_symlink_does_not_make_root_overwrite_a_file(top, attacker, mm, where):
    # Given a state dir the attacker made (-s in a directory anyone may write), or one of
    # root's shared with the attacker's group, with multimodule.lock a symbolic link to a
    # root-only file
    secret = top / "secret"
    state = top / "state"
    if where == "group-shared-state-dir":
        shared_state_dir(top, attacker)
    attacker.run(lambda: (state.mkdir(exist_ok=True),
                          (state / "multimodule.lock").symlink_to(secret)))
    mm.config(router_section())
    # When root's daemon starts on it
    daemon = mm.start(state_dir=state, wait=False)
    status = outcome(daemon)
    # Then the root-only file is untouched, and the daemon refuses to start, saying why
    assert secret.read_bytes() == SECRET
    assert mode(secret) == 0o600
    assert status == 1, daemon.output()
    err = "\n".join(daemon.lines["stderr"])
    if where == "attackers-state-dir":
        assert f"state directory {state} belongs to uid {attacker.uid}" in err, err
    else:  # a state dir its group may write is refused before the lock is looked at
        assert f"state directory {state} is writable by its group or others" in err, err
    assert "Traceback" not in err, err


def test_temp_file_symlink_does_not_make_the_state_save_overwrite_a_file(
        top, attacker, mm, transit):
    # Given a daemon as root running a stateful task on its state dir, which is then shared
    # with the attacker's group (changed after the start's check: see the threat model's
    # known limits)
    secret = top / "secret"
    state = shared_state_dir(top, attacker)
    state.chmod(0o700)
    mm.task("Counter", COUNTER)
    mm.config(COUNTER_CONFIG)
    daemon = mm.start(state_dir=state)
    state.chmod(0o770)
    # And the attacker's symbolic links at the temporary names a save used to take
    # (".NAME.state.json.tmp-PID", the pid being known once the daemon runs)
    names = [f".Counter.state.json.tmp-{daemon.pid}",
             f".multimodule.status.json.tmp-{daemon.pid}"]
    attacker.run(lambda: [(state / name).symlink_to(secret) for name in names])
    # When the task's state changes and the daemon saves it (periodically and at its stop)
    transit.send("Counter", {})
    assert receive_n(transit, "out", 1)[0]["ct"] == 1
    daemon.stop_ok()
    # Then the root-only file is untouched
    assert secret.read_bytes() == SECRET
    assert mode(secret) == 0o600
    # and the state file is a regular file of root's, 0600, holding the state
    state_file = state / "Counter.state.json"
    st = os.lstat(state_file)
    assert stat.S_ISREG(st.st_mode) and st.st_uid == 0 and mode(state_file) == 0o600
    assert saved_state(state_file) == {"ct": 1}
    # and the attacker's links are still just links (nothing was written through them)
    for name in names:
        assert (state / name).is_symlink()


@pytest.mark.parametrize("planted", ["attackers-file", "symlink-to-root-file"])
def test_planted_state_file_is_not_loaded(top, attacker, mm, transit, planted):
    # Given a state dir of root's that was shared with the attacker's group (as the package's
    # was, 0770, before it became 0700), where the attacker put Counter's state file: a file
    # of its own, or a link to a root-only JSON file
    state = shared_state_dir(top, attacker)
    state_file = state / "Counter.state.json"
    if planted == "attackers-file":
        attacker.run(lambda: state_file.write_text('{"ct": 1000}'))
    else:
        private = top / "private.json"
        private.write_text('{"ct": 2000, "password": "hunter2"}')
        private.chmod(0o600)
        attacker.run(lambda: state_file.symlink_to(private))
    state.chmod(0o700)  # the directory is safe now; what was planted in it is not
    mm.task("Counter", COUNTER)
    mm.config(COUNTER_CONFIG)
    # When root's daemon starts Counter
    daemon = mm.start(state_dir=state)
    # Then the file is reported as unusable, left where it is (it is not root's), and the
    # task starts empty
    line = daemon.expect("stderr", "error: Counter: state file")
    assert str(state_file) in line and "starting empty" in line, line
    assert "left where it is" in line and f"uid {attacker.uid}" in line, line
    assert list(state.glob("Counter.state.json.corrupt-*")) == []
    status, out, err = mm.mmctl("state", "Counter")
    assert status == 0 and json.loads(out) == {}, (out, err)
    transit.send("Counter", {})
    assert receive_n(transit, "out", 1)[0]["ct"] == 1
    # and the next save replaces the planted entry with root's own file
    daemon.stop_ok()
    assert not state_file.is_symlink() and os.stat(state_file).st_uid == 0
    assert saved_state(state_file) == {"ct": 1}
    if planted == "symlink-to-root-file":
        assert (top / "private.json").read_text() == '{"ct": 2000, "password": "hunter2"}'


# -- an existing state, transit or spill directory that another user could write ----------


def _state_of_attacker(top: Path, attacker: Attacker) -> tuple[list[str], Path, str]:
    attacker.run(lambda: (top / "state").mkdir())
    return [], top / "state", f"belongs to uid {attacker.uid}"


def _state_world_writable(top: Path, attacker: Attacker) -> tuple[list[str], Path, str]:
    (top / "state").mkdir()
    (top / "state").chmod(0o777)
    return [], top / "state", "is writable by its group or others"


def _transit_of_attacker(top: Path, attacker: Attacker) -> tuple[list[str], Path, str]:
    attacker.run(lambda: (top / "transit").mkdir())
    return ["-T", str(top / "transit")], top / "transit", f"belongs to uid {attacker.uid}"


def _transit_world_writable(top: Path, attacker: Attacker) -> tuple[list[str], Path, str]:
    (top / "transit").mkdir()
    (top / "transit").chmod(0o777)
    return ["-T", str(top / "transit")], top / "transit", "is writable by others"


def _spill_of_attacker(top: Path, attacker: Attacker) -> tuple[list[str], Path, str]:
    # root's transit dir, open for a while (an earlier mode), the attacker's .spill in it
    transit_dir = top / "transit"
    transit_dir.mkdir()
    transit_dir.chmod(0o777)
    attacker.run(lambda: (transit_dir / ".spill").mkdir())
    transit_dir.chmod(0o700)
    return ["-T", str(transit_dir)], transit_dir / ".spill", f"belongs to uid {attacker.uid}"


def _spill_world_writable(top: Path, attacker: Attacker) -> tuple[list[str], Path, str]:
    transit_dir = top / "transit"
    transit_dir.mkdir(mode=0o700)
    (transit_dir / ".spill").mkdir()
    (transit_dir / ".spill").chmod(0o777)
    return ["-T", str(transit_dir)], transit_dir / ".spill", "is writable by others"


@pytest.mark.parametrize("make", [
    _state_of_attacker, _state_world_writable, _transit_of_attacker, _transit_world_writable,
    _spill_of_attacker, _spill_world_writable,
], ids=["state-of-another-user", "state-world-writable", "transit-of-another-user",
        "transit-world-writable", "spill-of-another-user", "spill-world-writable"])
def test_unsafe_existing_directory_is_refused_at_start(top, attacker, mm, make):
    # Given an existing directory another user owns or anyone may write
    args, unsafe, why = make(top, attacker)
    state = top / "state" if unsafe == top / "state" else mm.state_dir
    before = mode(unsafe), os.lstat(unsafe).st_uid
    mm.config(router_section())
    # When root's daemon starts on it
    daemon = mm.start(*args, state_dir=state, wait=False)
    status = outcome(daemon)
    # Then it exits 1 naming the directory and what is wrong with it, and leaves it alone
    assert status == 1, daemon.output()
    err = "\n".join(daemon.lines["stderr"])
    assert f"{unsafe} {why}" in err, err
    assert err.startswith("multimodule: ") and "Traceback" not in err, err
    assert (mode(unsafe), os.lstat(unsafe).st_uid) == before
    assert not any(unsafe.iterdir())


# -- item 4: files readable by others ----------------------------------------------------


@pytest.mark.parametrize("planted", ["symlink-to-root-file", "attackers-file"])
def test_debug_file_planted_by_another_user_is_not_written(top, attacker, mm, planted):
    # Given a debug file in a directory anyone may write, where the attacker put a link to a
    # root-only file, or a file of its own (to read the daemon's records)
    secret = top / "secret"
    debug_out = top / "debug.out"
    if planted == "symlink-to-root-file":
        attacker.run(lambda: debug_out.symlink_to(secret))
    else:
        attacker.run(lambda: (debug_out.write_bytes(b""), debug_out.chmod(0o666)))
    mm.config(router_section())
    # When root's daemon writes debug records there
    daemon = mm.start("-d", "1", "-o", f"debug:{debug_out}")
    line = daemon.expect("stderr", "oob: cannot write debug record")
    daemon.stop_ok()
    # Then it wrote nothing through the link or into the other user's file, and said why
    assert secret.read_bytes() == SECRET
    if planted == "symlink-to-root-file":
        assert debug_out.is_symlink() and "symbolic link" in line, line
    else:
        assert debug_out.read_bytes() == b""
        assert f"uid {attacker.uid}" in line, line


def test_debug_out_is_created_0600_under_umask_000(mm, umask):
    # Given a daemon with the default debug sink (./debug.out) and no umask at all
    umask(0o000)
    mm.config(router_section())
    # When it writes debug records
    daemon = mm.start("-d", "1")
    debug_out = mm.tmp / "debug.out"
    wait_for_file(debug_out, lambda p: p.exists() and p.stat().st_size > 0)
    daemon.stop_ok()
    # Then debug.out is its owner's only
    assert mode(debug_out) == 0o600


def test_detached_task_log_is_created_0600_under_umask_000(mm, umask, transit):
    # Given a daemon running an external task as a detached process, with no umask at all
    umask(0o000)
    mm.task("Counter", COUNTER)
    mm.config("[Counter]\nis_external = true\n\n" + router_section(route("Counter", "out")))
    daemon = mm.start("--task-backend", "detached")
    # When the task runs (its output goes to STATE_DIR/task-Counter.log)
    transit.send("Counter", {})
    assert receive_n(transit, "out", 1, timeout=20)[0]["ct"] == 1
    log = mm.state_dir / "task-Counter.log"
    assert log.exists()
    daemon.stop_ok()
    # Then the log is its owner's only
    assert mode(log) == 0o600


def test_an_append_target_that_is_another_users_fifo_is_refused_without_waiting(
        tmp_path, other_user_for_fifo):
    # Given a FIFO of another user where a -o file sink or a task log would be
    from multimodule.state import open_for_append

    fifo = tmp_path / "fifo.out"
    os.mkfifo(fifo, 0o666)
    os.chown(fifo, other_user_for_fifo, -1)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # its owner reading what we write
    try:
        # When it is opened to append / Then it is refused: it is not ours
        with pytest.raises(OSError, match="FIFO of uid"):
            open_for_append(fifo)
    finally:
        os.close(reader)
    # and one of our own with no reader is an error too, not a hang
    own = tmp_path / "own.fifo"
    os.mkfifo(own, 0o600)
    with pytest.raises(OSError):
        open_for_append(own)


@pytest.fixture
def other_user_for_fifo() -> int:
    """A uid that is not this process's (nobody's)."""
    import pwd
    return pwd.getpwnam("nobody").pw_uid


# -- the Bridge's record of the stream sequence (STATE_DIR/Bridge.inbound-STREAM) ---------


@pytest.mark.parametrize("planted", ["attackers-record", "symlink-to-root-file"])
def test_a_planted_bridge_record_is_refused_and_replaced(top, attacker, mm, planted):
    # Given a state dir of root's once shared with the attacker's group, where the attacker
    # put the Bridge's record of the last stream sequence delivered: a record of its own
    # (which would make the Bridge skip the first 5,000 messages for this host), or a link
    # to a root-only file
    from natsserver import free_port

    secret = top / "secret"
    state = shared_state_dir(top, attacker)
    record = state / "Bridge.inbound-MULTIMODULE"
    kept = top / "attackers-copy"  # a second name of the attacker's file, to look at it after
    if planted == "attackers-record":
        def plant() -> None:
            record.write_bytes(b"5000 hosta\n")
            record.chmod(0o644)
            os.link(record, kept)
        attacker.run(plant)
    else:
        attacker.run(lambda: record.symlink_to(secret))
    state.chmod(0o700)  # the directory is safe now; what was planted in it is not
    mm.config(f'[Bridge]\nhost = "hosta"\nservers = ["nats://127.0.0.1:{free_port()}"]\n')
    # When root's daemon starts the Bridge (its servers away: it reads the record at once)
    daemon = mm.start(state_dir=state)
    line = daemon.expect("stderr", f"error: Bridge: {record} refused")
    daemon.stop_ok()
    # Then the planted entry was reported and replaced by root's own record, 0600
    assert "replaced with a record of its own" in line, line
    if planted == "attackers-record":
        assert f"uid {attacker.uid}" in line, line
        # and the attacker's file was neither written nor chmodded
        assert kept.read_bytes().startswith(b"5000 ") and mode(kept) == 0o644
        assert os.lstat(kept).st_uid == attacker.uid
    else:
        assert "symbolic link" in line, line
    st = os.lstat(record)
    assert stat.S_ISREG(st.st_mode) and st.st_uid == 0 and mode(record) == 0o600
    assert not record.read_bytes().startswith(b"5000")
    # and the root-only file is untouched
    assert secret.read_bytes() == SECRET and mode(secret) == 0o600


# -- other files of the state directory read back: failsafe marks, published options -------


@pytest.mark.parametrize("planted", ["attackers-file", "symlink-to-root-file"])
def test_planted_failsafe_marks_are_not_loaded(top, attacker, mm, transit, planted):
    # Given a state dir of root's once shared with the attacker's group, where the attacker
    # put failsafe.json holding Counter back: a file of its own, or a link to a root-only
    # JSON file (whose text would show as the reason in mmctl status)
    state = shared_state_dir(top, attacker)
    marks = state / "failsafe.json"
    if planted == "attackers-file":
        attacker.run(lambda: marks.write_text('{"Counter": {"reason": "planted"}}'))
    else:
        private = top / "private.json"
        private.write_text('{"Counter": {"reason": "hunter2"}}')
        private.chmod(0o600)
        attacker.run(lambda: marks.symlink_to(private))
    state.chmod(0o700)
    mm.task("Counter", COUNTER)
    mm.config(COUNTER_CONFIG)
    # When root's daemon starts
    daemon = mm.start(state_dir=state)
    # Then the file is reported and set aside, and no task is held back
    line = daemon.expect("stderr", f"cannot read {marks}")
    assert "no task is held in failsafe" in line, line
    transit.send("Counter", {})
    assert receive_n(transit, "out", 1)[0]["ct"] == 1
    status, out, _ = mm.mmctl("status")
    assert "hunter2" not in out and "planted" not in out, out
    daemon.stop_ok()
    if planted == "symlink-to-root-file":
        assert (top / "private.json").read_text() == '{"Counter": {"reason": "hunter2"}}'


@pytest.mark.parametrize("planted", ["attackers-file", "symlink-to-attackers-file"])
def test_planted_published_options_are_not_inherited(top, attacker, planted):
    # Given a state dir of root's once shared with the attacker's group, where the attacker
    # put daemon-options.json (what a task's own process takes from its daemon), sending its
    # debug records to a file of the attacker's choosing
    from multimodule.config import DaemonOptions, inherit_options

    state = shared_state_dir(top, attacker)
    published = state / "daemon-options.json"
    text = json.dumps({"oob": "debug:/etc/cron.d/planted", "debug": 9})
    if planted == "attackers-file":
        attacker.run(lambda: published.write_text(text))
    else:
        elsewhere = top / "attackers-options.json"
        attacker.run(lambda: (elsewhere.write_text(text), published.symlink_to(elsewhere)))
    state.chmod(0o700)
    # When root's task process (multimodule -m) reads what its daemon published
    from multimodule.errors import ConfigError
    with pytest.raises(ConfigError) as info:
        opts = inherit_options(DaemonOptions(module="Counter", state_dir=state))
        pytest.fail(f"the planted options were taken: {opts.oob!r}")
    # Then it is refused, saying why
    why = f"uid {attacker.uid}" if planted == "attackers-file" else "symbolic link"
    assert str(published) in str(info.value) and why in str(info.value), str(info.value)


def test_a_planted_figures_file_is_not_read(top, attacker):
    # Given an external task's figures file planted by the attacker (a link to a root-only
    # file of the same form), and a file of the attacker's own
    from multimodule.monitor.monitor import read_figures_file

    private = top / "private.json"
    private.write_text('{"pid": 1, "counters": {"secret": 42}}')
    private.chmod(0o600)
    state = shared_state_dir(top, attacker)
    link, own = state / "Counter.figures.json", state / "Other.figures.json"
    attacker.run(lambda: (link.symlink_to(private),
                          own.write_text('{"pid": 1, "counters": {"messages_in": 10}}')))
    # When the daemon's monitor reads them / Then it takes neither
    assert read_figures_file(link) is None
    assert read_figures_file(own) is None
