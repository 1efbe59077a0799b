"""Metric sources: cgroup v1 and v2 layouts (file trees in the kernel's formats, and this
machine's real cgroups) and psutil figures of a real process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from multimodule.monitor.sources import (
    CgroupSource,
    Figures,
    ProcessSource,
    parse_proc_cgroup,
)

V1_PROC = """12:pids:/system.slice/t.service
11:blkio:/system.slice/t.service
4:memory:/system.slice/t.service
2:cpu,cpuacct:/system.slice/t.service
1:name=systemd:/system.slice/t.service
0::/system.slice/t.service
"""


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_parse_proc_cgroup_both_layouts():
    paths = parse_proc_cgroup(V1_PROC)
    assert paths["memory"] == paths["cpu"] == paths["cpuacct"] == "/system.slice/t.service"
    assert paths["name=systemd"] == paths[""] == "/system.slice/t.service"
    assert parse_proc_cgroup("0::/a/b\n") == {"": "/a/b"}


def test_cgroup_v2_figures(tmp_path):
    # Given a pure v2 host: one unified hierarchy
    root, proc = tmp_path / "cgroup", tmp_path / "proc"
    write(root / "cgroup.controllers", "cpu io memory pids\n")
    write(proc / "42" / "cgroup", "0::/system.slice/t.service\n")
    group = root / "system.slice" / "t.service"
    write(group / "memory.current", "1048576\n")
    write(group / "memory.stat", "anon 700000\nfile 348576\nactive_file 48576\n"
                                 "inactive_file 300000\n")
    write(group / "cpu.stat", "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n")
    write(group / "io.stat", "8:0 rbytes=100 wbytes=200 rios=1 wios=2 dbytes=0 dios=0\n"
                             "8:16 rbytes=1 wbytes=2 rios=1 wios=1 dbytes=0 dios=0\n")
    write(group / "pids.current", "3\n")
    source = CgroupSource(root, proc)
    # Then the figures come from the unified files; memory is the working set (charged
    # memory less the inactive file cache)
    assert source.layout() == "v2"
    assert source.read(42) == Figures(cpu_seconds=2.5, memory_bytes=1048576 - 300000,
                                      io_read_bytes=101, io_write_bytes=202, tasks=3)


def test_cgroup_v1_figures_with_comounted_cpu_and_missing_accounting(tmp_path):
    # Given a hybrid host: v1 controllers (cpu and cpuacct co-mounted) and an empty v2 tree
    root, proc = tmp_path / "cgroup", tmp_path / "proc"
    (root / "unified").mkdir(parents=True)
    write(proc / "7" / "cgroup", V1_PROC)
    unit = "system.slice/t.service"
    write(root / "memory" / unit / "memory.usage_in_bytes", "2097152\n")
    write(root / "memory" / unit / "memory.stat", "cache 1000\ninactive_file 5\n"
                                                  "total_inactive_file 97152\n")
    write(root / "cpu,cpuacct" / unit / "cpuacct.usage", "3000000000\n")
    write(root / "blkio" / unit / "blkio.throttle.io_service_bytes",
          "8:0 Read 4096\n8:0 Write 8192\n8:0 Sync 0\n8:0 Async 0\n8:0 Total 12288\n"
          "8:16 Read 1\n8:16 Write 2\nTotal 12291\n")
    source = CgroupSource(root, proc)
    # Then the figures come from each controller; pids has no file: None, not 0
    assert source.layout() == "hybrid"
    assert source.read(7) == Figures(cpu_seconds=3.0, memory_bytes=2000000,
                                     io_read_bytes=4097, io_write_bytes=8194, tasks=None)
    # Only the unit's own cgroups count when the unit is named: a controller that shows
    # another cgroup (not delegated to a container) gives nothing
    assert source.read(7, unit="t.service").memory_bytes == 2000000
    assert source.read(7, unit="other.service") == Figures()


def test_gone_process_gives_no_figures(tmp_path):
    assert CgroupSource(tmp_path, tmp_path).read(99) == Figures()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert ProcessSource().read(child.pid) == Figures()


def test_real_cgroups_of_this_process():
    # This machine's own cgroups (whatever their layout): memory is charged somewhere
    figures = CgroupSource().read(os.getpid())
    assert figures.memory_bytes is not None and figures.memory_bytes > 0
    assert figures.cpu_seconds is None or figures.cpu_seconds > 0


def test_process_figures_follow_a_real_process():
    # Given a child that opens 20 files and then waits
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "files = [open('/dev/null') for _ in range(20)]\n"
         "print('ready', flush=True)\n"
         "sys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        figures = ProcessSource().read(child.pid)
        # Then psutil sees its descriptors, memory, threads and CPU time
        assert figures.open_fds is not None and figures.open_fds >= 20 + 3
        assert figures.memory_bytes > 1 << 20
        assert figures.tasks >= 1 and figures.cpu_seconds > 0
        # and merged cgroup figures keep their own values, filling the gaps
        merged = Figures(memory_bytes=5).merged(figures)
        assert merged.memory_bytes == 5 and merged.open_fds == figures.open_fds
    finally:
        child.stdin.close()
        child.wait(10)
