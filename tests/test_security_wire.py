"""Security: what may come off a queue, a spill file or a parked outbox, and what may be sent.

Spill references are names in the transit directory's ``.spill/``, opened without following a
symbolic link, and only regular files of a user allowed on that directory are read; their
content never reaches an error. A message holds only what both ends carry exactly: no NaN or
infinity, integers from -2**63 to 2**64-1; anything else is refused at ``send``
(:class:`UnserializableMessage`) and at receive (:class:`BadMessage`), never rounded or nulled.
Lines of a parked ``outbox.QNAME.jsonl`` are checked like any received message.

The spill tests play the attacker with real users made for the test (one in a group made for a
shared transit directory, one outside it), acting in forked children that took their
identities; they need root (skipped otherwise, but never under CI).
"""

from __future__ import annotations

import asyncio
import dataclasses
import grp
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import threading
import traceback
import uuid
from pathlib import Path
from typing import Any, Callable

import orjson
import pytest

from multimodule.errors import BadMessage, Empty, TransitBroken, UnserializableMessage
from multimodule.transit import META_KEY, Transit
from multimodule.transit.lowlevel import encode_body, make_meta

from helpers import strip_meta

SECRET_JSON = b'{"secret": "root-only-json-7f3a"}'
SECRET_TEXT = b"root-only text 9c1e: hunter2\n\x00\xff"


# -- real users ---------------------------------------------------------------------------------


def _need_root() -> None:
    missing = [tool for tool in ("useradd", "userdel", "groupadd", "groupdel")
               if shutil.which(tool) is None]
    if os.geteuid() != 0 or missing:
        why = "needs root" if os.geteuid() != 0 else f"needs {', '.join(missing)}"
        if os.environ.get("CI"):
            raise RuntimeError(f"the security tests must run under CI, but this one {why}")
        pytest.skip(why)


@dataclasses.dataclass
class Users:
    """A group made for a shared transit directory, a member of it and a user outside it."""

    group: str
    gid: int
    member: str
    member_uid: int
    outsider: str
    outsider_uid: int


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=60)


def _drop_user(name: str) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        pass
    else:
        subprocess.run(["userdel", name], capture_output=True, timeout=60)
    try:  # the user's own group, where useradd made one and userdel left it
        grp.getgrnam(name)
    except KeyError:
        return
    subprocess.run(["groupdel", name], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def users():
    """A group ``mmtestg-*`` with a member ``mmtestm-*`` (a supplementary group), and a user
    ``mmtesto-*`` in no such group; all removed after."""
    _need_root()
    tag = secrets.token_hex(3)
    group, member, outsider = f"mmtestg-{tag}", f"mmtestm-{tag}", f"mmtesto-{tag}"
    common = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin"]
    try:
        _run("groupadd", "--system", group)
        _run(*common, "--groups", group, member)
        _run(*common, outsider)
        yield Users(group, grp.getgrnam(group).gr_gid, member, pwd.getpwnam(member).pw_uid,
                    outsider, pwd.getpwnam(outsider).pw_uid)
    finally:
        for name in (member, outsider):
            _drop_user(name)
        try:
            grp.getgrnam(group)
        except KeyError:
            pass
        else:
            subprocess.run(["groupdel", group], capture_output=True, timeout=60)


def as_user(name: str, work: Callable[[], None]) -> None:
    """Run ``work()`` in a forked child that became user ``name`` (its groups, then its ids);
    fail with the child's traceback if it raised."""
    pw = pwd.getpwnam(name)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_fd)
            os.setgroups(os.getgrouplist(name, pw.pw_gid))
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
            work()
            os._exit(0)
        except BaseException:  # never return into pytest in the child
            os.write(write_fd, traceback.format_exc().encode())
            os._exit(1)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        report = f.read().decode(errors="replace")
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    assert status == 0, f"as {name}: exit {status}\n{report}"


@dataclasses.dataclass
class Shared:
    """A transit directory shared with ``users.group`` (the receiving side is root's
    ``transit``), and root-only files elsewhere."""

    path: Path
    top: Path
    transit: Transit
    secret_json: Path
    secret_text: Path


@pytest.fixture
def shared(users: Users):
    top = Path(tempfile.mkdtemp(prefix="mm-secwire-"))
    private = Path(tempfile.mkdtemp(prefix="mm-secwire-root-"))
    top.chmod(0o755)  # the members reach the transit directory; it is 0770 root:group
    transit = None
    try:
        transit = Transit(top / "transit", group=users.gid)
        secret_json, secret_text = private / "secret.json", private / "secret.bin"
        for path, data in ((secret_json, SECRET_JSON), (secret_text, SECRET_TEXT)):
            path.write_bytes(data)
            path.chmod(0o600)
        transit.sysv_queue("victim")  # registered by the owner, shared with the group
        yield Shared(top / "transit", top, transit, secret_json, secret_text)
    finally:
        if transit is not None:
            transit.remove_all()
        shutil.rmtree(top, ignore_errors=True)
        shutil.rmtree(private, ignore_errors=True)


def send_spill_reference(shared: Shared, gid: int, name: str) -> Callable[[], None]:
    """What the member does after planting ``.spill/NAME``: send a reference to it, as a raw
    sender (the queue is the group's)."""
    def work() -> None:
        Transit(shared.path, group=gid).sysv_queue("victim").send_raw(
            b"MM\x01S" + name.encode())
    return work


def error_texts(exc: BaseException) -> str:
    """Everything an error record could show of ``exc``: its text, its ``raw`` bytes, and the
    same of every exception chained to it (``doc`` included, where JSON errors keep their
    input)."""
    out = []
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        out += [str(exc), repr(exc), repr(getattr(exc, "raw", b"")),
                repr(getattr(exc, "doc", "")), repr(exc.args)]
        exc = exc.__cause__ or exc.__context__
    return "\n".join(out)


def assert_refused_then_next_arrives(transit: Transit, exc_info, reason: str,
                                     reference: bytes) -> None:
    err = exc_info.value
    assert reason in err.reason, err.reason
    assert err.raw == reference  # the reference only, never the file's bytes
    assert err.qname == "victim"
    transit.send("victim", {"good": 1})
    assert strip_meta(transit.receive("victim", timeout=5)) == {"good": 1}
    with pytest.raises(Empty):
        transit.receive("victim", timeout=0)


# -- 1. a spill reference is a name, opened without following a link ---------------------------


def test_spill_symlink_to_a_root_only_json_file_is_refused(users, shared):
    # Given a member of the group that shares the transit directory, who puts a symbolic
    # link to a root-only JSON file in .spill/ and sends a spill reference naming it
    name = uuid.uuid4().hex
    link = shared.path / ".spill" / name

    def plant() -> None:
        os.symlink(shared.secret_json, link)
        send_spill_reference(shared, users.gid, name)()

    as_user(users.member, plant)
    assert link.is_symlink()

    # When root's side receives from that queue
    with pytest.raises(BadMessage) as info:
        got = shared.transit.receive("victim", timeout=5)
        pytest.fail(f"the root-only file was delivered: {got!r}")

    # Then it is refused as a link, without the file's content, and the next message arrives
    assert "root-only-json-7f3a" not in error_texts(info.value)
    assert_refused_then_next_arrives(shared.transit, info, "symbolic link",
                                     b"MM\x01S" + name.encode())
    # And the file it pointed at is untouched
    assert shared.secret_json.read_bytes() == SECRET_JSON


def test_spill_symlink_to_a_root_only_text_file_is_refused_without_its_bytes(users, shared):
    # Given a member's symbolic link in .spill/ to a root-only file that is not JSON
    name = uuid.uuid4().hex

    def plant() -> None:
        os.symlink(shared.secret_text, shared.path / ".spill" / name)
        send_spill_reference(shared, users.gid, name)()

    as_user(users.member, plant)

    # When root's side receives, Then BadMessage
    with pytest.raises(BadMessage) as info:
        shared.transit.receive("victim", timeout=5)

    # And no byte of the file reaches the error (text, raw, or any chained exception)
    texts = error_texts(info.value)
    assert "hunter2" not in texts and "9c1e" not in texts, texts
    assert_refused_then_next_arrives(shared.transit, info, "symbolic link",
                                     b"MM\x01S" + name.encode())


def test_spill_file_owned_by_a_user_not_allowed_on_the_directory_is_refused(users, shared):
    # Given a file written by a user outside the group, in a directory both users may write
    drop = shared.top / "drop"
    drop.mkdir()
    drop.chmod(0o777)
    planted = drop / "planted"
    as_user(users.outsider, lambda: planted.write_bytes(b'{"planted": "by an outsider"}'))
    assert planted.stat().st_uid == users.outsider_uid
    # which the member moves into .spill/ (a rename: the owner stays the outsider) and names
    # in a spill reference
    name = uuid.uuid4().hex

    def plant() -> None:
        os.rename(planted, shared.path / ".spill" / name)
        send_spill_reference(shared, users.gid, name)()

    as_user(users.member, plant)

    # When root's side receives, Then the file is refused for its owner, not delivered
    with pytest.raises(BadMessage) as info:
        got = shared.transit.receive("victim", timeout=5)
        pytest.fail(f"the outsider's file was delivered: {got!r}")
    assert f"uid {users.outsider_uid}" in info.value.reason, info.value.reason
    assert "by an outsider" not in error_texts(info.value)
    assert_refused_then_next_arrives(shared.transit, info, "may not use",
                                     b"MM\x01S" + name.encode())


def test_spill_file_of_a_member_is_delivered(users, shared):
    # Given a member who sends a message too large for one System V message (it spills, as
    # the member's own file in .spill/)
    big = {"d": "x" * 50_000}
    as_user(users.member, lambda: Transit(shared.path, group=users.gid).send("victim", big))
    (spilled,) = (shared.path / ".spill").iterdir()
    assert spilled.stat().st_uid == users.member_uid

    # When root's side receives, Then the message arrives whole and the file is gone
    assert strip_meta(shared.transit.receive("victim", timeout=5)) == big
    assert list((shared.path / ".spill").iterdir()) == []


# -- 2. what a message may hold, refused at send ---------------------------------------------


@dataclasses.dataclass
class Point:
    x: float


NOT_CARRIED = {
    "nan": ({"outer": {"list": [0, float("nan")]}}, '["outer"]["list"][1]'),
    "inf": ({"outer": {"list": [0, float("inf")]}}, '["outer"]["list"][1]'),
    "minus_inf": ({"v": -float("inf")}, '["v"]'),
    "nan_beside_null": ({"n": None, "s": "null", "v": [float("nan")]}, '["v"][0]'),
    "nan_in_dataclass": ({"p": Point(float("nan"))}, '["p"].x'),
    "int_2_64": ({"outer": {"i": 2**64}}, '["outer"]["i"]'),
    "int_below_min": ({"i": [-2**63 - 1]}, '["i"][0]'),
    "int_30_digits": ({"i": 10**29}, '["i"]'),
}


@pytest.mark.parametrize("path", ["sysv", "local"])
@pytest.mark.parametrize("message, where", list(NOT_CARRIED.values()), ids=list(NOT_CARRIED))
def test_nan_infinities_and_huge_integers_are_refused_at_send(transit, path, message, where):
    # Given a System V or a local name
    qname = f"carry-{path}"
    if path == "local":
        transit.declare_local(qname)

    # When sending a value the other end could not get back exactly
    with pytest.raises(UnserializableMessage) as info:
        transit.send(qname, message)

    # Then it is refused, naming where it is, and nothing was queued (no null, no float)
    assert where in str(info.value), str(info.value)
    with pytest.raises(Empty):
        transit.receive(qname, timeout=0)


@pytest.mark.parametrize("path", ["sysv", "local"])
def test_the_edges_of_what_a_message_may_hold_arrive_exactly(transit, path):
    # Given the extreme integers and floats a message may hold, and null beside them
    qname = f"edges-{path}"
    if path == "local":
        transit.declare_local(qname)
    message = {"max": 2**64 - 1, "min": -2**63, "big_float": 1.7976931348623157e308,
               "tiny": 5e-324, "neg_zero": -0.0, "none": None, "text": "null NaN 1e400"}

    # When sent and received, Then every value arrives exactly, with its type
    transit.send(qname, message)
    got = strip_meta(transit.receive(qname, timeout=5))
    assert repr(got) == repr(message)


# -- 3. ... and at receive -------------------------------------------------------------------

NOT_CARRIED_ON_THE_WIRE = {
    "int_30_digits": b'{"n": 123456789012345678901234567890}',
    "int_2_64": b'{"a": [1, {"n": 18446744073709551616}]}',
    "int_below_min": b'{"n": -9223372036854775809}',
    "nan_literal": b'{"x": NaN}',
    "infinity_literal": b'{"x": -Infinity}',
    "overflowing_float": b'{"x": 1e400}',
}


@pytest.mark.parametrize("body", list(NOT_CARRIED_ON_THE_WIRE.values()),
                         ids=list(NOT_CARRIED_ON_THE_WIRE))
def test_a_raw_senders_huge_integer_or_nan_is_refused_at_receive(transit, body):
    # Given a raw sender's message holding what JSON numbers cannot carry exactly here,
    # followed by a good message
    transit.sysv_queue("raw-q").send_raw(b"MM\x01J" + body)
    transit.send("raw-q", {"good": 2})

    # When receiving, Then BadMessage (not a float, not a null)
    with pytest.raises(BadMessage) as info:
        got = transit.receive("raw-q", timeout=5)
        pytest.fail(f"delivered as {got!r}")
    assert info.value.qname == "raw-q"
    # And the next message is unaffected
    assert strip_meta(transit.receive("raw-q", timeout=5)) == {"good": 2}


def test_a_spilled_huge_integer_is_refused_without_the_files_content(transit, transit_dir):
    # Given a spill file holding a 30-digit integer, and a reference to it
    name = uuid.uuid4().hex
    (transit_dir / ".spill" / name).write_bytes(b'{"n": 123456789012345678901234567890}')
    transit.sysv_queue("raw-spill").send_raw(b"MM\x01S" + name.encode())
    # When receiving, Then BadMessage that holds the reference only, and the file is removed
    with pytest.raises(BadMessage, match="64-bit") as info:
        transit.receive("raw-spill", timeout=5)
    assert info.value.raw == b"MM\x01S" + name.encode()
    assert "1234567890" not in error_texts(info.value)
    assert list((transit_dir / ".spill").iterdir()) == []


def test_the_edges_from_a_raw_sender_arrive_exactly(transit):
    # Given a raw sender's integers at both ends of the range, floats written without a
    # fraction, and long digit runs inside strings
    body = (b'{"max": 18446744073709551615, "min": -9223372036854775808, "f": 1e19, '
            b'"g": 12345678901234567890.5, "s": "123456789012345678901234567890", '
            b'"ns": 1700000000000000000}')
    transit.sysv_queue("raw-edges").send_raw(b"MM\x01J" + body)
    # When receiving, Then each value arrives as written
    got = transit.receive("raw-edges", timeout=5)
    assert repr(got) == repr(orjson.loads(body))
    assert got["max"] == 2**64 - 1 and type(got["max"]) is int
    assert got["min"] == -2**63 and type(got["f"]) is float


# -- 4. a parked outbox is checked like any received message ---------------------------------


def drain_all(transit: Transit, qname: str) -> list[Any]:
    """Every message (or BadMessage) waiting on ``qname`` now."""
    out: list[Any] = []
    while True:
        try:
            out.append(strip_meta(transit.receive(qname, timeout=0)))
        except BadMessage as exc:
            out.append(exc)
        except Empty:
            return out


async def test_garbage_lines_in_a_parked_outbox_are_reported_and_not_sent(inproc, transit):
    # Given an outbox kept at the last exit for queue "kept", where lines 2 to 6 are not
    # messages (and line 5 is blank)
    inproc.state_dir.mkdir(mode=0o700)
    path = inproc.state_dir / "outbox.kept.jsonl"
    lines = [
        encode_body({"n": 1}, make_meta({})),
        b"garbage",
        b"[1, 2]",
        b'{"n": 123456789012345678901234567890}',
        b"",
        b'{"x": NaN}',
        encode_body({"n": 2}, make_meta({})),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")

    # When the daemon starts
    await inproc.start()
    for thread in [t for t in threading.enumerate() if t.name == "mm-overflow:kept"]:
        await asyncio.to_thread(thread.join, 10)

    # Then each bad line is reported on the error channel, naming the file and the line
    errors = inproc.records_of("error", str(path))
    for number, why in ((2, "not valid JSON"), (3, "not an object"), (4, "64-bit"),
                        (6, "not valid JSON")):
        assert any(f"{path} line {number}:" in r.text and why in r.text for r in errors), \
            (number, [r.text for r in errors])
    assert len(errors) == 4, [r.text for r in errors]
    assert inproc.records_of("log", "sending 2 messages kept for queue 'kept'")
    # And only the good lines were sent, in order
    assert drain_all(transit, "kept") == [{"n": 1}, {"n": 2}]
    assert not path.exists()


def test_a_spill_dir_swapped_for_a_link_after_start_is_not_written_through(transit, tmp_path):
    # Given a transit in use, and its .spill replaced by a link to another directory (as a
    # member of a shared group could do: the transit dir is group-writable)
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    spill = transit.path / ".spill"
    spill.rename(transit.path / ".spill-old")
    spill.symlink_to(target)
    # When a message too large for one System V message is sent
    big = {"blob": "x" * (transit.msgmax * 2)}
    try:
        with pytest.raises(TransitBroken, match="spill directory"):
            transit.send("big", big)
        # Then nothing was written through the link
        assert list(target.iterdir()) == []
    finally:
        spill.unlink()
        (transit.path / ".spill-old").rename(spill)


def test_a_spill_file_larger_than_a_message_may_be_is_refused_unread(transit, monkeypatch):
    # Given a small limit, and a spill file (sparse: it costs no disk) over it
    monkeypatch.setattr("multimodule.transit._sysv.MAX_MESSAGE_BYTES", 1 << 20)
    name = "f" * 32
    with open(transit.path / ".spill" / name, "wb") as f:
        f.truncate(2 << 20)
    # When a reference to it arrives / Then it is refused without being read
    transit.sysv_queue("huge").send_raw(b"MM\x01S" + name.encode())
    with pytest.raises(BadMessage, match="more than a message may"):
        transit.receive("huge", timeout=5)
    # and a message over the limit is refused at send, nothing sent
    with pytest.raises(UnserializableMessage, match="larger than a message may be"):
        transit.send("huge", {"blob": "y" * (2 << 20)})


def test_a_name_file_pointing_at_a_queue_not_of_this_directory_is_refused(transit_dir,
                                                                        other_transit_dir):
    # Given a private queue in another transit directory (another daemon's, say)
    private = Transit(other_transit_dir)
    private.send("secret", {"s": 42})
    key = private.directory.lookup_key("secret")
    # and, in a directory shared with a group, a name file rewritten to that queue's key (any
    # member may write name files there; every queue's key is public)
    group = os.getgid() if os.getgid() != 0 else grp.getgrnam("nogroup").gr_gid
    shared = Transit(transit_dir, group=group)
    shared.send("innocent", {"i": 1})
    innocent = shared.sysv_queue("innocent").queue  # its name no longer leads to it: ours
    try:
        (transit_dir / "innocent").write_text(f"{key}\n")
        # When a process opens that name afresh and receives from it / Then it is refused,
        # and the private queue is untouched
        with pytest.raises(TransitBroken, match="not this transit directory's"):
            Transit(transit_dir, group=group).receive("innocent", timeout=0)
        assert private.stat("secret").messages == 1
    finally:
        innocent.remove()
