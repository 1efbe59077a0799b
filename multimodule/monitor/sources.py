"""Metric sources: what the resource monitor reads, per process or per unit.

- :class:`CgroupSource`: the cgroup a process belongs to, in either layout: cgroup v2 (one
  unified hierarchy: ``memory.current``, ``cpu.stat``, ``io.stat``, ``pids.current``) or v1
  (one hierarchy per controller: ``memory.usage_in_bytes``, ``cpuacct.usage``,
  ``blkio.throttle.io_service_bytes``, ``pids.current``), as described in the kernel's
  Documentation/admin-guide/cgroup-v1 and cgroup-v2. On a hybrid host (v1 controllers beside
  an empty v2 hierarchy, as on the machines we test on) the v1 controllers are used.
- :class:`ProcessSource`: psutil figures of one process (CPU times, RSS, I/O counters, open
  file descriptors, threads), the fallback where no cgroup of its own exists (internal
  tasks share the daemon's; detached processes have none).

Memory of a cgroup is its *working set*: the charged memory less the inactive file cache
(``memory.current`` - ``inactive_file`` in v2, ``memory.usage_in_bytes`` -
``total_inactive_file`` in v1), as cAdvisor and ``kubectl top`` count it: file pages a
process merely read once (its interpreter and libraries) are charged to its cgroup but are
reclaimed first, and would make every task look big.

Every figure is ``None`` when it cannot be read (a controller not mounted, accounting off, a
process gone), never a made-up 0. Units: bytes and seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import psutil

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class Figures:
    """One reading. ``cpu_seconds``: CPU time used so far (user + system), seconds;
    ``memory_bytes``: memory in use, bytes (cgroup: the working set; process: RSS; internal
    task: the estimated deep size of its objects, see :mod:`~multimodule.monitor.deepsize`);
    ``io_read_bytes``/``io_write_bytes``: block I/O so far; ``tasks``: processes and threads
    (cgroup ``pids.current``) or threads (process); ``open_fds``: file descriptors (process
    only)."""

    cpu_seconds: float | None = None
    memory_bytes: int | None = None
    io_read_bytes: int | None = None
    io_write_bytes: int | None = None
    tasks: int | None = None
    open_fds: int | None = None

    def merged(self, other: Figures) -> Figures:
        """These figures, with gaps filled from ``other``."""
        return Figures(**{f.name: getattr(self, f.name) if getattr(self, f.name) is not None
                          else getattr(other, f.name) for f in fields(self)})


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _int(path: Path) -> int | None:
    text = _read(path)
    if text is None:
        return None
    try:
        return int(text.split()[0])
    except (ValueError, IndexError):
        return None


def _stat_value(path: Path, key: str) -> int | None:
    """One ``key value`` line of a ``memory.stat`` file."""
    for line in (_read(path) or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            try:
                return int(value)
            except ValueError:
                return None
    return None


def working_set(charged: int | None, inactive_file: int | None) -> int | None:
    """Charged memory less the inactive file cache (never below 0)."""
    if charged is None:
        return None
    return max(0, charged - (inactive_file or 0))


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """``/proc/PID/cgroup`` as controller -> path; the v2 entry (``0::/path``) is under
    ``""``, named v1 hierarchies (``name=systemd``) under their name."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        for controller in controllers.split(",") if controllers else [""]:
            out[controller] = path
    return out


class CgroupSource:
    """Reads a process's cgroup figures. ``root``: where cgroup file systems are mounted;
    ``proc``: the proc file system (both changeable for tests)."""

    def __init__(self, root: Path = CGROUP_ROOT, proc: Path = Path("/proc")):
        self.root = root
        self.proc = proc

    def layout(self) -> str:
        """``"v2"`` (unified), ``"hybrid"`` (v1 controllers and a v2 hierarchy) or ``"v1"``."""
        if (self.root / "cgroup.controllers").exists():
            return "v2"
        return "hybrid" if (self.root / "unified").is_dir() else "v1"

    def read(self, pid: int, unit: str | None = None) -> Figures:
        """The figures of the cgroup(s) ``pid`` is in; ``Figures()`` if the process is gone.

        ``unit``: read only cgroups of that unit (the last part of the path). A controller
        that puts the process elsewhere gives ``None``: in a container whose v1 controllers
        are not delegated, every process shows the container's own cgroup, whose figures
        are not the unit's."""
        text = _read(self.proc / str(pid) / "cgroup")
        if text is None:
            return Figures()
        paths = parse_proc_cgroup(text)
        if unit is not None:
            paths = {c: p for c, p in paths.items() if p.rstrip("/").rsplit("/", 1)[-1] == unit}
        if self.layout() == "v2":
            if "" not in paths:
                return Figures()
            return self._v2(self.root / paths[""].lstrip("/"))
        return self._v1(paths)

    def _v2(self, group: Path) -> Figures:
        cpu = None
        for line in (_read(group / "cpu.stat") or "").splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec" and value.strip().isdigit():
                cpu = int(value) / 1e6
        read = write = None
        io = _read(group / "io.stat")
        if io is not None:
            read = write = 0
            for line in io.splitlines():  # "8:0 rbytes=123 wbytes=456 rios=... ..."
                for item in line.split()[1:]:
                    key, _, value = item.partition("=")
                    if key == "rbytes":
                        read += int(value)
                    elif key == "wbytes":
                        write += int(value)
        memory = working_set(_int(group / "memory.current"),
                             _stat_value(group / "memory.stat", "inactive_file"))
        return Figures(cpu_seconds=cpu, memory_bytes=memory,
                       io_read_bytes=read, io_write_bytes=write,
                       tasks=_int(group / "pids.current"))

    def _v1(self, paths: dict[str, str]) -> Figures:
        def group(controller: str) -> Path | None:
            if controller not in paths:
                return None
            # cpu and cpuacct are often co-mounted as "cpu,cpuacct".
            names = [controller] + (["cpu,cpuacct", "cpuacct,cpu"]
                                    if controller in ("cpu", "cpuacct") else [])
            for name in names:
                base = self.root / name
                if base.is_dir():
                    return base / paths[controller].lstrip("/")
            return None

        cpu = None
        acct = group("cpuacct")
        if acct is not None:
            usage = _int(acct / "cpuacct.usage")  # nanoseconds
            cpu = usage / 1e9 if usage is not None else None
        memory = group("memory")
        pids = group("pids")
        read = write = None
        blkio = group("blkio")
        if blkio is not None:
            text = _read(blkio / "blkio.throttle.io_service_bytes")
            if text is not None:
                read = write = 0
                for line in text.splitlines():  # "8:0 Read 4096" ... "Total 8192"
                    parts = line.split()
                    if len(parts) == 3 and parts[1] == "Read":
                        read += int(parts[2])
                    elif len(parts) == 3 and parts[1] == "Write":
                        write += int(parts[2])
        used = working_set(_int(memory / "memory.usage_in_bytes"),
                           _stat_value(memory / "memory.stat", "total_inactive_file")) \
            if memory else None
        return Figures(cpu_seconds=cpu, memory_bytes=used,
                       io_read_bytes=read, io_write_bytes=write,
                       tasks=_int(pids / "pids.current") if pids else None)


class ProcessSource:
    """psutil figures of one process (see :class:`Figures`); ``Figures()`` if it is gone."""

    def read(self, pid: int) -> Figures:
        try:
            process = psutil.Process(pid)
            with process.oneshot():
                times = process.cpu_times()
                memory = process.memory_info().rss
                threads = process.num_threads()
                fds = process.num_fds()
                try:
                    io = process.io_counters()
                    read, write = io.read_bytes, io.write_bytes
                except (psutil.AccessDenied, AttributeError):
                    read = write = None
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return Figures()
        except psutil.AccessDenied:
            return Figures()
        return Figures(cpu_seconds=times.user + times.system, memory_bytes=memory,
                       io_read_bytes=read, io_write_bytes=write, tasks=threads, open_fds=fds)
