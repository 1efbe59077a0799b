"""The transit directory: queue names, their System V keys, and the spill area.

Every process that names the same transit directory maps a queue name to the same System V key.
The directory holds one small file per queue name whose content is the key in decimal followed by
a newline; the file is created and filled under an exclusive ``flock`` so that two processes
creating the same name at once end up with one queue. ``.spill/`` holds messages too large for
one System V message (see :mod:`multimodule.transit._sysv`).

Layout::

    DIR/            0700 (0770 with a group)
    DIR/NAME        "<key>\\n", 0600 (0660)
    DIR/.spill/     0700 (0770), files 0600 (0660), removed once received

An existing ``DIR`` or ``DIR/.spill`` that others may write, or that another user owns (unless
it is shared with the group: that group's, with group access), is refused: its owner could
plant links in it. Name files are never opened through a symbolic link.
"""

from __future__ import annotations

import errno
import fcntl
import grp
import os
import random
import stat as stat_mod
import unicodedata
from pathlib import Path

import sysv_ipc

from multimodule.errors import InvalidQueueName, TransitBroken
from multimodule.files import make_private_dirs

#: Longest queue name accepted, in characters (and at most 255 bytes once UTF-8 encoded).
MAX_NAME_CHARS = 200

#: Keys are drawn from 1 .. 2**31-1: ``key_t`` is a 32-bit signed int on Linux.
MAX_KEY = 2**31 - 1

ENV_TRANSIT_DIR = "MULTIMODULE_TRANSIT_DIR"
ENV_TRANSIT_GROUP = "MULTIMODULE_TRANSIT_GROUP"


def validate_qname(qname: object) -> str:
    """Return ``qname`` if it is a usable queue name, else raise :class:`InvalidQueueName`.

    A name is a non-empty ``str`` of at most :data:`MAX_NAME_CHARS` characters (255 bytes in
    UTF-8) with no ``/``, no NUL or other control character, and not starting with ``.``
    (reserved for the directory's own entries).
    """
    if not isinstance(qname, str):
        raise InvalidQueueName(f"queue name must be a str, not {type(qname).__name__}")
    if not qname:
        raise InvalidQueueName("queue name is empty")
    if len(qname) > MAX_NAME_CHARS:
        raise InvalidQueueName(
            f"queue name is too long ({len(qname)} characters; at most {MAX_NAME_CHARS})"
        )
    if len(qname.encode("utf-8", "surrogatepass")) > 255:
        raise InvalidQueueName("queue name is too long (over 255 bytes in UTF-8)")
    if "/" in qname:
        raise InvalidQueueName(f"queue name {qname!r} contains a slash")
    if qname.startswith("."):
        raise InvalidQueueName(f"queue name {qname!r} starts with '.', which is reserved")
    for ch in qname:
        if unicodedata.category(ch) in ("Cc", "Cs"):
            raise InvalidQueueName(f"queue name {qname!r} contains a control character")
    return qname


#: The transit directory of the system's daemon (the packaged service).
SYSTEM_TRANSIT_DIR = Path("/run/multimodule/transit")


def shared_group_of(path: str | os.PathLike[str]) -> int | None:
    """The group a transit directory is shared with: its group if the directory exists with
    group access (mode 0770, as :class:`TransitDirectory` makes a shared one), else ``None``.
    So the members of that group share its queues without setting
    ``$MULTIMODULE_TRANSIT_GROUP``."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_gid if stat_mod.S_IMODE(st.st_mode) & 0o070 == 0o070 else None


def default_transit_dir(environ: dict[str, str] | None = None) -> Path:
    """Where the transit directory lives when none is given.

    Order: ``$MULTIMODULE_TRANSIT_DIR``; ``$RUNTIME_DIRECTORY/transit`` when systemd set
    ``RuntimeDirectory=``; ``/run/multimodule/transit`` under systemd (``$INVOCATION_ID`` set),
    as root, or when this user may use it (a member of the group the packaged service shares
    it with); else ``$XDG_RUNTIME_DIR/multimodule/transit``; else
    ``/tmp/multimodule-<uid>/transit`` (created private).
    """
    env = os.environ if environ is None else environ
    if env.get(ENV_TRANSIT_DIR):
        return Path(env[ENV_TRANSIT_DIR])
    if env.get("RUNTIME_DIRECTORY"):
        # systemd may list several directories separated by ':'; ours is the first.
        return Path(env["RUNTIME_DIRECTORY"].split(":")[0]) / "transit"
    if env.get("INVOCATION_ID") or os.geteuid() == 0 or \
            os.access(SYSTEM_TRANSIT_DIR, os.R_OK | os.W_OK | os.X_OK):
        return SYSTEM_TRANSIT_DIR
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "multimodule" / "transit"
    return Path(f"/tmp/multimodule-{os.geteuid()}") / "transit"


def _group_id(group: str | int | None) -> int | None:
    if group is None or group == "":
        return None
    if isinstance(group, int) or str(group).isdigit():
        return int(group)
    try:
        return grp.getgrnam(str(group)).gr_gid
    except KeyError as exc:
        raise TransitBroken(f"transit group {group!r} does not exist") from exc


def _parse_key(data: bytes) -> int | None:
    """The key in a name file's content, or ``None`` if it is empty, half-written or corrupt
    (the locked path then makes a new queue and rewrites the file)."""
    if not data.endswith(b"\n"):
        return None
    try:
        key = int(data)
    except ValueError:
        return None
    return key if 0 < key <= MAX_KEY else None


class TransitDirectory:
    """Maps queue names to System V keys inside one directory.

    ``path``: the directory (created if missing, with its missing parents 0700). ``group``: a
    group name or id; when given, queues are 0660, files 0660 and directories 0770, owned by
    that group; otherwise 0600/0700.

    Raises :class:`TransitBroken` if the directory or its ``.spill`` cannot be created or is
    unsafe: a symlink, writable by others, or owned by another user (unless shared with
    ``group``: owned by that group with group access, as its owner made it).
    """

    def __init__(self, path: str | os.PathLike[str], group: str | int | None = None):
        self.path = Path(path)
        self.gid = _group_id(group)
        self.queue_mode = 0o660 if self.gid is not None else 0o600
        self.file_mode = self.queue_mode
        self.dir_mode = 0o770 if self.gid is not None else 0o700
        self._ensure_dir(self.path, "transit directory", parents=True)
        self.spill_path = self.path / ".spill"
        self._ensure_dir(self.spill_path, "spill directory", parents=False)

    def _ensure_dir(self, path: Path, what: str, *, parents: bool) -> None:
        euid = os.geteuid()
        try:
            if parents:
                # Intermediate directories (e.g. $XDG_RUNTIME_DIR/multimodule) are private too.
                make_private_dirs(path.parent)
            try:
                os.mkdir(path, self.dir_mode)
            except FileExistsError:
                pass
        except OSError as exc:
            raise TransitBroken(f"cannot prepare {what} {path}: {exc}") from exc
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise TransitBroken(
                    f"transit path {path} is not a directory (or is a symlink)") from None
            raise TransitBroken(f"cannot prepare {what} {path}: {exc}") from exc
        try:
            st, mode = self._check_dir_fd(fd, path, what)
            if st.st_uid != euid:
                return  # a shared directory made by its owner; we may not chmod it
            if self.gid is not None and st.st_gid != self.gid:
                os.fchown(fd, -1, self.gid)
            if mode != self.dir_mode:
                os.fchmod(fd, self.dir_mode)
        except OSError as exc:
            raise TransitBroken(f"cannot prepare {what} {path}: {exc}") from exc
        finally:
            os.close(fd)

    def _check_dir_fd(self, fd: int, path: Path, what: str) -> tuple[os.stat_result, int]:
        """``(stat, mode)`` of the open directory ``fd`` if it is one this process may use:
        not writable by others, and ours, or shared with our group (that group's, with group
        access). Raises :class:`TransitBroken` naming ``what`` and ``path`` otherwise."""
        st = os.fstat(fd)
        mode = stat_mod.S_IMODE(st.st_mode)
        if not stat_mod.S_ISDIR(st.st_mode):
            raise TransitBroken(f"{what} {path} is not a directory: refusing it")
        if mode & 0o002:
            raise TransitBroken(f"{what} {path} is writable by others (mode {mode:04o}): "
                                "refusing it")
        euid = os.geteuid()
        if st.st_uid != euid and not (self.gid is not None and st.st_gid == self.gid
                                      and mode & 0o070 == 0o070):
            shared = "" if self.gid is None else f", nor shared with group {self.gid}"
            raise TransitBroken(f"{what} {path} belongs to uid {st.st_uid}, not to this "
                                f"process's user (uid {euid}){shared}: refusing it")
        return st, mode

    def open_spill_dir(self) -> int:
        """A descriptor of the spill directory, opened without following a link and checked
        as at start (its parent, the transit directory, may be writable by the group: a
        member could have swapped it since). The caller closes it. Raises
        :class:`TransitBroken`."""
        try:
            fd = os.open(self.spill_path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                         | os.O_CLOEXEC)
        except OSError as exc:
            raise TransitBroken(f"spill directory {self.spill_path} unusable: "
                                f"{exc.strerror}") from None
        try:
            self._check_dir_fd(fd, self.spill_path, "spill directory")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def names(self) -> list[str]:
        """The queue names registered in this directory, sorted."""
        try:
            return sorted(n for n in os.listdir(self.path) if not n.startswith("."))
        except OSError as exc:
            raise TransitBroken(f"cannot list transit directory {self.path}: {exc}") from exc

    def lookup_key(self, qname: str) -> int | None:
        """The key recorded for ``qname``, or ``None`` if the name is not registered yet."""
        try:
            fd = os.open(self.path / qname,
                         os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                data = os.read(fd, 32)
            finally:
                os.close(fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise TransitBroken(f"cannot read queue file {self.path / qname}: {exc}") from exc
        return _parse_key(data)

    def open_queue(self, qname: str, max_message_size: int) -> sysv_ipc.MessageQueue:
        """Open the System V queue for ``qname``, creating the name and the queue if needed.

        ``max_message_size`` (bytes) is the receive buffer; pass the kernel's ``msgmax`` so
        that no message can be too large to receive. Safe against concurrent creation from
        several processes: exactly one queue results. A name whose queue was removed behind our
        back gets a new queue.
        """
        validate_qname(qname)
        key = self.lookup_key(qname)
        if key is not None:
            try:
                return self.open_key(qname, key, max_message_size)
            except sysv_ipc.ExistentialError:
                pass  # removed under us: recreate below, under the lock
            except sysv_ipc.PermissionsError as exc:
                raise TransitBroken(f"no permission to open queue {qname!r}: {exc}") from exc
        return self._create_locked(qname, max_message_size)

    def open_key(self, qname: str, key: int, max_message_size: int = 0
                 ) -> sysv_ipc.MessageQueue:
        """The live queue of ``key`` (read from ``qname``'s name file) if it is one of this
        directory's: ours (a private directory), or of its group with group access (a shared
        one). A name file may be written by any member of a shared directory's group, and
        keys of every queue are public (``/proc/sysvipc/msg``): without this check a member
        could point a name at any queue this process may open (root: all of them). Raises
        ``sysv_ipc.ExistentialError`` if there is none, :class:`TransitBroken` if it is not
        one of ours."""
        queue = sysv_ipc.MessageQueue(key, 0, max_message_size=max_message_size)
        if self.gid is not None:
            ours = queue.gid == self.gid and queue.mode & 0o060 == 0o060
        else:
            ours = queue.uid == os.geteuid()
        if not ours:
            raise TransitBroken(
                f"queue {qname!r}: its name file leads to a queue that is not this transit "
                f"directory's (uid {queue.uid}, gid {queue.gid}, mode "
                f"{queue.mode & 0o777:04o}): refusing it")
        return queue

    def _create_locked(self, qname: str, max_message_size: int) -> sysv_ipc.MessageQueue:
        path = self.path / qname
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, self.file_mode)
        except OSError as exc:
            raise TransitBroken(f"cannot create queue file {path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            key = _parse_key(os.pread(fd, 32, 0))
            if key is not None:
                try:
                    return self.open_key(qname, key, max_message_size)
                except sysv_ipc.ExistentialError:
                    pass  # stale key: make a new queue
            queue = self._create_queue(max_message_size)
            os.ftruncate(fd, 0)
            os.pwrite(fd, b"%d\n" % queue.key, 0)
            if os.fstat(fd).st_uid == os.geteuid():
                # Ours: the umask must not narrow it. Another member of the group made it
                # (and its queue went, e.g. with that user's last session): the key is
                # written, and only its owner may change its mode.
                os.fchmod(fd, self.file_mode)
                if self.gid is not None:
                    os.fchown(fd, -1, self.gid)
            return queue
        except OSError as exc:
            raise TransitBroken(f"cannot register queue {qname!r} in {path}: {exc}") from exc
        finally:
            os.close(fd)  # releases the flock

    def _create_queue(self, max_message_size: int) -> sysv_ipc.MessageQueue:
        rng = random.SystemRandom()
        for _ in range(64):
            key = rng.randint(1, MAX_KEY)
            try:
                queue = sysv_ipc.MessageQueue(
                    key, sysv_ipc.IPC_CREX, self.queue_mode, max_message_size=max_message_size
                )
            except sysv_ipc.ExistentialError:
                continue  # key taken by someone else: draw again
            except OSError as exc:
                raise TransitBroken(f"cannot create a System V queue: {exc}") from exc
            if self.gid is not None:
                queue.gid = self.gid
            return queue
        raise TransitBroken("could not find a free System V key after 64 tries")

    def forget(self, qname: str) -> None:
        """Remove ``qname``'s queue (and its messages) and its name file, if they exist."""
        validate_qname(qname)
        key = self.lookup_key(qname)
        if key is not None:
            try:
                self.open_key(qname, key).remove()
            except sysv_ipc.ExistentialError:
                pass
            except sysv_ipc.PermissionsError as exc:
                raise TransitBroken(f"no permission to remove queue {qname!r}") from exc
        try:
            os.unlink(self.path / qname)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise TransitBroken(f"cannot remove queue file for {qname!r}: {exc}") from exc


__all__ = [
    "MAX_NAME_CHARS",
    "TransitDirectory",
    "default_transit_dir",
    "validate_qname",
]
