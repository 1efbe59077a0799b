"""The Debian package, the whole operator's story on a real systemd.

``packaging/build-deb`` builds the .deb (and fails on lintian errors); it is installed with apt
in a fresh container booted with systemd (tests/systemd_box.py), nothing of this checkout in
it but the .deb. Then: the seed example under the packaged units, a task moved into its unit
and back, a daemon restart and a package upgrade that leave the task unit running, a member of
the group multimodule using mmctl, and a purge that leaves nothing behind. Each step's time is
printed (``pytest -s`` shows them), and the package's size.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from systemd_box import SystemdBox, binds_for, box_available

#: Boots a systemd container and builds the package: `-m "not slow"` leaves it out.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
UNIT = "multimodule-task@Example1.service"


@pytest.fixture(scope="module")
def deb(tmp_path_factory) -> Path:
    why = box_available()
    if why:
        if os.environ.get("CI"):
            raise RuntimeError(f"the package test must run under CI: {why}")
        pytest.skip(why)
    out = tmp_path_factory.mktemp("deb")
    started = time.monotonic()
    result = subprocess.run([str(REPO / "packaging" / "build-deb"), str(out)],
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    path = Path(result.stdout.strip().splitlines()[-1])
    print(f"\nbuilt {path.name} ({path.stat().st_size / 1e6:.1f} MB; lintian: no errors) "
          f"in {time.monotonic() - started:.1f} s")
    return path


class Steps:
    """Prints each step of the story with how long it took."""

    def __init__(self):
        self.last = time.monotonic()

    def done(self, what: str) -> None:
        now = time.monotonic()
        print(f"  {now - self.last:6.2f} s  {what}")
        self.last = now


def counts(box: SystemdBox) -> list[int]:
    """Example2's counts in the daemon's journal, in order."""
    return [int(n) for n in re.findall(r"Example2: received a message: (\d+)",
                                       box.journal("-u", "multimodule", "-o", "cat"))]


def wait_count_above(box: SystemdBox, above: int, what: str) -> int:
    return box.wait_for(lambda: max(counts(box) or [-1]) > above and max(counts(box)), 30,
                        what)


def active(box: SystemdBox, unit: str) -> str:
    return box.show(unit, "ActiveState")["ActiveState"]


def test_install_operate_upgrade_and_purge_on_a_booted_systemd(deb, tmp_path):
    steps = Steps()
    with SystemdBox(tmp_path / "box", binds_for(deb.parent)) as box:
        steps.done("container booted")
        # Machines built from container images carry a policy-rc.d that forbids starting
        # services from maintainer scripts; a booted Debian system has none.
        box.run("rm", "-f", "/usr/sbin/policy-rc.d")
        # Given the package installed with apt: enabled and started, as Debian does
        box.run("apt-get", "install", "-y", "-q", str(deb), timeout=300)
        steps.done("apt install")
        assert box.show("multimodule", "UnitFileState")["UnitFileState"] == "enabled"
        box.wait_for(lambda: active(box, "multimodule") == "active", 20, "the daemon active")
        assert "running (pid" in box.journal("-u", "multimodule", "-o", "cat")  # default config
        for path in ("/usr/bin/multimodule", "/usr/bin/mmctl", "/usr/bin/strans",
                     "/usr/share/man/man1/mmctl.1.gz", "/etc/multimodule/multimodule.toml",
                     "/usr/share/polkit-1/rules.d/50-multimodule.rules",
                     "/usr/share/multimodule/prometheus/multimodule.rules.yml",
                     "/usr/share/bash-completion/completions/mmctl",
                     "/usr/share/zsh/vendor-completions/_mmctl",
                     "/lib/systemd/system/multimodule-task@.service"):
            box.run("test", "-e", path)
        box.run("getent", "group", "multimodule")

        # When the config is pointed at the seed example and the service started
        box.run("systemctl", "stop", "multimodule")
        box.run("cp", "/usr/share/multimodule/examples/seed.toml",
                "/etc/multimodule/multimodule.toml")
        box.run("systemctl", "start", "multimodule")
        assert active(box, "multimodule") == "active"
        steps.done("systemctl start multimodule -> active")
        # Then Example2's lines are in the unit's journal
        first = wait_count_above(box, 0, "Example2's lines in journalctl -u multimodule")
        steps.done("Example2's lines in journalctl -u multimodule")

        # A member of the group multimodule uses mmctl without root
        box.run("useradd", "-m", "-G", "multimodule", "alice")
        status = box.run("runuser", "-u", "alice", "--", "mmctl", "status", check=False)
        assert status.returncode == 0 and "Example1" in status.stdout, status.stderr
        steps.done("mmctl status as a member of the group")

        # When Example1 moves into its own unit
        box.run("mmctl", "migrate", "Example1", "--external", "--wait", "60")
        assert active(box, UNIT) == "active"
        box.wait_for(lambda: "running (pid" in box.journal("-u", UNIT, "-o", "cat"), 15,
                     "the task unit's lines")
        steps.done("mmctl migrate Example1 --external -> unit active, its journal")
        before = wait_count_above(box, first, "counts from the task unit")
        task_pid = box.show(UNIT, "MainPID")["MainPID"]

        # When the daemon restarts, the task unit keeps running and the count goes on
        box.run("systemctl", "restart", "multimodule")
        assert box.show(UNIT, "MainPID")["MainPID"] == task_pid
        before = wait_count_above(box, before, "counts after the daemon's restart")
        steps.done("systemctl restart multimodule -> task unit kept its pid, count goes on")

        # When the package is upgraded (reinstalled): daemon restarted, task unit untouched
        daemon_pid = box.show("multimodule", "MainPID")["MainPID"]
        box.run("apt-get", "install", "-y", "-q", "--reinstall", str(deb), timeout=300)
        assert box.show("multimodule", "MainPID")["MainPID"] != daemon_pid
        assert box.show(UNIT, "MainPID")["MainPID"] == task_pid
        assert box.run("cat", "/etc/multimodule/multimodule.toml").stdout.startswith(
            "# The seed example")  # the operator's conffile is kept
        before = wait_count_above(box, before, "counts after the upgrade")
        steps.done("upgrade -> daemon restarted, task unit kept its pid, count goes on")

        # When Example1 moves back into the daemon: the unit goes, the count goes on
        box.run("mmctl", "migrate", "Example1", "--internal", "--wait", "60")
        assert active(box, UNIT) == "inactive"
        wait_count_above(box, before, "counts in the daemon again")
        steps.done("mmctl migrate Example1 --internal -> unit gone, count goes on")

        box.run("systemctl", "stop", "multimodule")
        assert active(box, "multimodule") == "inactive"
        steps.done("systemctl stop multimodule")
        # Through all of it, one copy of Example1 counted: each count printed once, in order
        seen = counts(box)
        assert seen == sorted(set(seen)), seen

        # When the package is purged: no unit, no process, no queue, no state left
        uid = box.run("id", "-u", "multimodule").stdout.strip()
        box.run("apt-get", "purge", "-y", "-q", "multimodule", timeout=300)
        steps.done("apt purge multimodule")
        units = box.run("systemctl", "list-unit-files", "multimodule*", "--no-legend",
                        check=False).stdout
        assert units.strip() == ""
        assert box.run("pgrep", "-u", uid, check=False).returncode == 1
        queues = box.run("cat", "/proc/sysvipc/msg").stdout.splitlines()[1:]
        assert [q for q in queues if q.split()[7] == uid] == []
        for path in ("/var/lib/multimodule", "/run/multimodule", "/etc/multimodule",
                     "/usr/lib/multimodule", "/usr/bin/mmctl"):
            assert box.run("test", "-e", path, check=False).returncode == 1, path
    print(f"  package size: {deb.stat().st_size / 1e6:.2f} MB")
