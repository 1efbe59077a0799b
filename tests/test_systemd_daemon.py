"""System tests: the daemon as a Type=notify service, and the task unit template, under a real
systemd (in a container).

The unit files are the ones in units/; a drop-in made here points ExecStart= at this checkout's
virtualenv (a test-only drop-in, the way an operator would override it) and runs it as root
with ProtectHome=no and PrivateTmp=no, since the checkout and the virtualenv's Python may live
in root's home or under /tmp.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from multimodule.config import parse_limits
from multimodule.supervise.systemd import SystemdBackend
from multimodule.supervise.units import dropin_path, render_dropin, unit_name
from systemd_box import SystemdBox, binds_for, box_available

#: Each test boots a systemd container: `-m "not slow"` leaves them out.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
TASKS = "/opt/mmtest/tasks"
TRANSIT = "/run/multimodule/transit"

SEED = (REPO / "examples" / "seed.toml").read_text()

BLOCKER = '''
import time
from multimodule import Task


class Blocker(Task):
    def message(self, message):
        time.sleep(3600)  # holds the event loop: the watchdog must notice
'''


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    why = box_available()
    if why:
        if os.environ.get("CI"):
            raise RuntimeError(f"the systemd system tests must run under CI: {why}")
        pytest.skip(why)
    binds = binds_for(REPO, Path(sys.prefix), Path(sys.base_prefix),
                      Path(os.path.realpath(sys.executable)).parent)
    with SystemdBox(tmp_path_factory.mktemp("box"), binds) as box:
        box.write("/etc/systemd/system/multimodule.service",
                  (REPO / "units" / "multimodule.service").read_text())
        box.write("/etc/systemd/system/multimodule.service.d/50-test.conf", f"""\
[Service]
ExecStart=
ExecStart={VENV_BIN}/python -m multimodule.cli.daemon -c /etc/multimodule/multimodule.toml \
-s ${{STATE_DIRECTORY}} -T ${{RUNTIME_DIRECTORY}}/transit --task-path {REPO}/tasks \
--task-path {TASKS}
Environment=PYTHONPATH={REPO} PYTHONDONTWRITEBYTECODE=1
User=root
Group=root
# Root without capabilities (CapabilityBoundingSet= is empty) may not hand the transit
# directory to the group multimodule; these tests share nothing with its members.
UnsetEnvironment=MULTIMODULE_TRANSIT_GROUP
ProtectHome=no
PrivateTmp=no
WatchdogSec=4
RestartSec=1
ReadWritePaths=/run/systemd/system
""")
        box.write("/etc/systemd/system/multimodule-task@.service",
                  (REPO / "units" / "multimodule-task@.service").read_text())
        box.write("/etc/systemd/system/multimodule-task@.service.d/40-test.conf", f"""\
[Service]
ExecStart=
ExecStart={VENV_BIN}/python -m multimodule.cli.daemon -m %i \
-c /etc/multimodule/multimodule.toml -s ${{STATE_DIRECTORY}} -T ${{RUNTIME_DIRECTORY}}/transit \
--task-path {REPO}/tasks --task-path {TASKS}
Environment=PYTHONPATH={REPO} PYTHONDONTWRITEBYTECODE=1
User=root
Group=root
# Root without capabilities (CapabilityBoundingSet= is empty) may not hand the transit
# directory to the group multimodule; these tests share nothing with its members.
UnsetEnvironment=MULTIMODULE_TRANSIT_GROUP
ProtectHome=no
PrivateTmp=no
""")
        box.write(f"{TASKS}/Blocker.py", BLOCKER)
        # What the package installs for the system user: the sysusers entry, the polkit rule.
        box.write("/usr/lib/sysusers.d/multimodule.conf",
                  (REPO / "packaging" / "multimodule.sysusers").read_text())
        box.run("systemd-sysusers")
        box.write("/usr/share/polkit-1/rules.d/50-multimodule.rules",
                  (REPO / "packaging" / "multimodule.polkit.rules").read_text())
        box.write("/etc/multimodule/multimodule.toml", SEED)
        box.run("systemctl", "daemon-reload")
        yield box


def mmctl(box: SystemdBox, *args: str, check: bool = True):
    return box.run(f"{VENV_BIN}/mmctl", "-T", TRANSIT, *args, check=check)


def start_fresh(box: SystemdBox, config: str = SEED) -> None:
    box.run("systemctl", "stop", "multimodule", check=False)
    box.run("systemctl", "reset-failed", "multimodule", check=False)
    box.write("/etc/multimodule/multimodule.toml", config)
    started = box.run("systemctl", "start", "multimodule", check=False)  # waits for READY=1
    assert started.returncode == 0, started.stderr + box.journal("-u", "multimodule", "-n", "40")


def test_daemon_reaches_active_through_notify_with_status(box):
    # Given the unit installed / When it is started
    start_fresh(box)
    # Then `systemctl start` returned after READY=1: the service is active and says how it is
    props = box.show("multimodule", "ActiveState", "SubState", "StatusText", "Type")
    assert props["ActiveState"] == "active" and props["SubState"] == "running", props
    assert props["Type"] == "notify"
    assert "tasks internal" in props["StatusText"], props
    # and the seed example runs: Example2's lines are in the unit's journal
    box.wait_for(lambda: "Example2: received a message: 1 (howdy)" in box.journal(
        "-u", "multimodule"), 15, "Example2's lines in journalctl -u multimodule")


def test_reload_applies_config_and_stays_active(box):
    start_fresh(box)
    # When the config changes and the service is reloaded (ExecReload sends SIGHUP)
    box.write("/etc/multimodule/multimodule.toml", SEED.replace('"howdy"', '"reloaded"'))
    box.run("systemctl", "reload", "multimodule")
    # Then it stays active and the new config takes effect
    box.wait_for(lambda: "(reloaded)" in box.journal("-u", "multimodule"), 15,
                 "the reloaded outstr in the journal")
    assert box.show("multimodule", "ActiveState")["ActiveState"] == "active"
    out = mmctl(box, "config", "Example1").stdout
    assert '"reloaded"' in out, out


def test_watchdog_restarts_a_daemon_whose_loop_is_blocked(box):
    # Given a running daemon with WatchdogSec=4 and a task whose handler blocks the loop
    start_fresh(box, SEED + "\n[Blocker]\n")
    before = int(box.show("multimodule", "NRestarts")["NRestarts"])
    main_pid = box.show("multimodule", "MainPID")["MainPID"]
    # When the task gets a message
    mmctl(box, "send", "Blocker", "{}")
    # Then systemd sees no WATCHDOG=1, kills the daemon and starts it again
    box.wait_for(lambda: int(box.show("multimodule", "NRestarts")["NRestarts"]) > before,
                 30, "a restart after the watchdog timeout")
    assert "Watchdog timeout" in box.journal("-u", "multimodule")
    box.wait_for(lambda: box.show("multimodule", "ActiveState")["ActiveState"] == "active",
                 30, "the restarted daemon to be active")
    assert box.show("multimodule", "MainPID")["MainPID"] != main_pid


def test_stop_is_orderly_and_saves_state(box):
    start_fresh(box)
    box.wait_for(lambda: "received a message: 2" in box.journal("-u", "multimodule"), 15,
                 "a few counts")
    # When the service is stopped
    box.run("systemctl", "stop", "multimodule")
    # Then it went through an orderly exit (status 0) and Example1's count is saved
    props = box.show("multimodule", "ActiveState", "ExecMainStatus", "Result")
    assert props["ActiveState"] == "inactive" and props["Result"] == "success", props
    saved = box.run("cat", "/var/lib/multimodule/Example1.state.json").stdout
    assert '"ct"' in saved
    assert "stopping: delivering messages in memory" in box.journal("-u", "multimodule")


def test_task_unit_runs_one_task_with_its_limits_dropin(box):
    # Given the template unit and the drop-in the daemon renders from a task's limits
    box.run("systemctl", "stop", "multimodule", check=False)
    limits = parse_limits("Example1", {"memory_max": "256M", "tasks_max": 32})
    box.write(str(dropin_path("Example1")), render_dropin("Example1", limits))
    box.run("systemctl", "daemon-reload")
    # When the instance is started
    box.run("systemctl", "start", unit_name("Example1"))
    try:
        # Then it is active through notify, with the limits in force
        props = box.show(unit_name("Example1"), "ActiveState", "MemoryMax", "TasksMax")
        assert props["ActiveState"] == "active", props
        assert props["MemoryMax"] == str(256 * 1024 * 1024) and props["TasksMax"] == "32"
        # and its lines land in the journal under that unit
        box.wait_for(lambda: "running (pid" in box.journal("-u", unit_name("Example1")), 15,
                     "the task's lines in journalctl -u multimodule-task@Example1")
    finally:
        box.run("systemctl", "stop", unit_name("Example1"), check=False)


def test_systemd_backend_starts_adopts_and_stops_task_units(box, tmp_path):
    # Given the backend, driving the container's systemd and writing its drop-ins there
    wrapper = tmp_path / "systemctl-in-box"
    wrapper.write_text(f'#!/bin/sh\nexec nsenter -t {box.pid1} -a systemctl "$@"\n')
    wrapper.chmod(0o755)
    backend = SystemdBackend(dropin_root=Path(f"/proc/{box.pid1}/root/run/systemd/system"),
                             systemctl=str(wrapper))
    box.run("systemctl", "stop", "multimodule", unit_name("Example1"), check=False)
    dropin = render_dropin("Example1", parse_limits("Example1", {"memory_max": "300M"}))
    try:
        # When it starts the task with limits
        first = backend.start("Example1", dropin)
        # Then the unit runs with them
        assert first.running and first.main_pid
        assert box.show(unit_name("Example1"), "MemoryMax")["MemoryMax"] == str(300 << 20)
        # When it is asked again (a new daemon adopting) / Then the same process stays
        assert backend.start("Example1", dropin).main_pid == first.main_pid
        # When the task's process is killed / Then systemd restarts it
        box.run("kill", "-9", str(first.main_pid))
        again = box.wait_for(
            lambda: (s := backend.status("Example1")).restarts >= 1 and s.running
            and s.main_pid != first.main_pid and s, 20, "systemd to restart the task")
        assert again.main_pid != first.main_pid
    finally:
        # When it is stopped / Then the unit is inactive
        backend.stop("Example1")
    assert backend.status("Example1").state.value in ("inactive", "failed")


def last_count(box: SystemdBox) -> int:
    """The last count Example2 printed in the daemon's journal (-1 if none yet)."""
    import re

    counts = re.findall(r"Example2: received a message: (\d+)", box.journal("-u", "multimodule"))
    return int(counts[-1]) if counts else -1


def test_external_task_as_unit_survives_daemon_restart_and_crash(box):
    # Given the seed example with Example1 external, with a memory limit
    config = SEED.replace('[Example1]\n', '[Example1]\nis_external = true\n'
                          'limits = { memory_max = "200M" }\n')
    box.run("systemctl", "stop", unit_name("Example1"), check=False)
    start_fresh(box, config)
    unit = unit_name("Example1")
    try:
        # Then the daemon started multimodule-task@Example1 with the limit, and its counts
        # reach Example2 in the daemon
        box.wait_for(lambda: box.show(unit, "ActiveState")["ActiveState"] == "active", 20,
                     "the task unit to be active")
        assert box.show(unit, "MemoryMax")["MemoryMax"] == str(200 << 20)
        box.wait_for(lambda: "running (pid" in box.journal("-u", unit), 15,
                     "the task's lines in journalctl -u multimodule-task@Example1")
        box.wait_for(lambda: last_count(box) >= 1, 20, "counts from the external task")
        pid = box.show(unit, "MainPID")["MainPID"]
        # When the daemon restarts
        box.run("systemctl", "restart", "multimodule")
        # Then the task unit kept its process, and the count goes on
        assert box.show(unit, "MainPID")["MainPID"] == pid
        before = last_count(box)
        box.wait_for(lambda: last_count(box) > before + 1, 20, "counts after the restart")
        # When the task's process is killed
        box.run("kill", "-9", pid)
        # Then systemd restarts it, and the count continues from the saved state
        box.wait_for(lambda: box.show(unit, "NRestarts")["NRestarts"] != "0"
                     and box.show(unit, "ActiveState")["ActiveState"] == "active", 20,
                     "systemd to restart the task")
        before = last_count(box)
        box.wait_for(lambda: last_count(box) > before + 1, 20, "counts after the crash")
        assert last_count(box) > 3  # not back to 0
    finally:
        box.run("systemctl", "stop", "multimodule", unit, check=False)


def test_mmctl_migrate_moves_a_task_into_its_unit_and_back(box):
    unit = unit_name("Example1")
    box.run("systemctl", "stop", unit, check=False)
    start_fresh(box)
    try:
        box.wait_for(lambda: last_count(box) >= 1, 20, "counts from the internal task")
        # When Example1 is migrated out
        mmctl(box, "migrate", "Example1", "--external", "--wait", "30")
        # Then its unit runs, logs under its own name, and the count goes on
        box.wait_for(lambda: box.show(unit, "ActiveState")["ActiveState"] == "active", 20,
                     "the task unit to be active")
        box.wait_for(lambda: "running (pid" in box.journal("-u", unit), 15,
                     "the task's lines in journalctl -u multimodule-task@Example1")
        before = last_count(box)
        box.wait_for(lambda: last_count(box) > before + 1, 20, "counts from the unit")
        # When it is migrated back in
        mmctl(box, "migrate", "Example1", "--internal", "--wait", "30")
        # Then the unit is gone and the daemon counts on from the saved state
        assert box.show(unit, "ActiveState")["ActiveState"] in ("inactive", "failed")
        before = last_count(box)
        box.wait_for(lambda: last_count(box) > before + 1, 20, "counts in the daemon again")
    finally:
        box.run("systemctl", "stop", "multimodule", unit, check=False)


def test_mmctl_restart_of_a_task_unit_and_logs_from_the_journal(box):
    # Given the seed example with Example1 in its own unit
    unit = unit_name("Example1")
    box.run("systemctl", "stop", unit, check=False)
    start_fresh(box, SEED.replace("[Example1]\n", "[Example1]\nis_external = true\n"))
    try:
        box.wait_for(lambda: box.show(unit, "ActiveState")["ActiveState"] == "active", 20,
                     "the task unit to be active")
        box.wait_for(lambda: last_count(box) >= 2, 20, "counts from the external task")
        pid = box.show(unit, "MainPID")["MainPID"]
        # When it is restarted with mmctl
        mmctl(box, "restart", "Example1", "--wait", "30")
        # Then its unit runs a new process, and the count goes on from the saved state
        box.wait_for(lambda: box.show(unit, "MainPID")["MainPID"] not in ("0", pid)
                     and box.show(unit, "ActiveState")["ActiveState"] == "active", 20,
                     "a new process in the task unit")
        before = last_count(box)
        box.wait_for(lambda: last_count(box) > before + 1, 20, "counts after the restart")
        # and mmctl logs reads the journal: the daemon's records, Example2's lines and the
        # task unit's, each with its task's name, in time order
        out = mmctl(box, "logs", "-s", "/var/lib/multimodule").stdout.splitlines()
        assert any(" Example2: received a message: " in line for line in out), out[-20:]
        assert any(" Example1: running (pid " in line for line in out), out[-40:]
        assert any(" MultiModule: running (pid " in line for line in out), out[-40:]
        assert [line[:23] for line in out] == sorted(line[:23] for line in out)
        # and only a task's own with its name, the last N with -n
        mine = mmctl(box, "logs", "-s", "/var/lib/multimodule", "Example1").stdout
        assert mine and all(" Example1: " in line for line in mine.splitlines()), mine
        last = mmctl(box, "logs", "-s", "/var/lib/multimodule", "-n", "3", "Example2").stdout
        assert len(last.splitlines()) == 3 and "Example2: received a message" in last, last
    finally:
        box.run("systemctl", "stop", "multimodule", unit, check=False)


def test_units_pass_systemd_analyze_verify_and_are_hardened(box):
    # Given the units as shipped, with an executable where the package puts the command
    box.write("/usr/local/lib/mmtest/multimodule", "#!/bin/sh\nexit 0\n", 0o755)
    box.run("sh", "-c", "test -e /usr/bin/multimodule || "
                        "ln -s /usr/local/lib/mmtest/multimodule /usr/bin/multimodule")
    # When systemd checks them / Then it finds nothing wrong
    result = box.run("systemd-analyze", "verify", "/etc/systemd/system/multimodule.service",
                     "/etc/systemd/system/multimodule-task@.service", check=False)
    assert result.returncode == 0, result.stderr
    # and their exposure is low (the figure quoted in the README)
    for unit in ("multimodule.service", "multimodule-task@x.service"):
        out = box.run("systemd-analyze", "security", unit, check=False).stdout
        level = float(out.rsplit("Overall exposure level for", 1)[1].split(":")[1].split()[0])
        assert level <= 2.0, out[-400:]


def test_unprivileged_daemon_starts_task_units_through_polkit(box):
    # Given the daemon and its task units as the system user multimodule (as packaged), with
    # a clean slate (queues and state made by root in other tests would not be theirs)
    unit = unit_name("Example1")
    box.run("systemctl", "stop", "multimodule", unit, check=False)
    box.run("sh", "-c", "ipcrm --all=msg; rm -rf /run/multimodule /var/lib/multimodule "
                        "/run/systemd/system/multimodule-task@Example1.service.d")
    box.run("chmod", "711", "/root")  # the test's Python may live under /root
    as_user = "[Service]\nUser=multimodule\nGroup=multimodule\n"
    box.write("/etc/systemd/system/multimodule.service.d/60-as-user.conf", as_user)
    box.write("/etc/systemd/system/multimodule-task@.service.d/60-as-user.conf", as_user)
    box.run("systemctl", "daemon-reload")
    config = SEED.replace('[Example1]\n', '[Example1]\nis_external = true\n'
                          'limits = { memory_max = "150M", nice = 5 }\n')
    try:
        # When it starts with Example1 external and limited
        start_fresh(box, config)
        # Then it could start the task unit (polkit), whose limits reached systemd without
        # writing unit files (set-property), and the task runs as that user with its nice
        box.wait_for(lambda: box.show(unit, "ActiveState")["ActiveState"] == "active", 20,
                     "the task unit to be active")
        assert box.show(unit, "MemoryMax")["MemoryMax"] == str(150 << 20)
        pid = box.show(unit, "MainPID")["MainPID"]
        user, nice = box.run("ps", "-o", "user:32=,ni=", "-p", pid).stdout.split()
        assert (user, nice) == ("multimodule", "5")
        assert box.show("multimodule", "User")["User"] == "multimodule"
        box.wait_for(lambda: last_count(box) >= 1, 20, "counts from the external task")
        # and a unit that is not its own stays out of its reach
        denied = box.run("runuser", "-u", "multimodule", "--", "systemctl", "stop",
                         "systemd-journald.service", check=False)
        assert denied.returncode != 0
    finally:
        box.run("systemctl", "stop", "multimodule", unit, check=False)
        box.run("rm", "-f", "/etc/systemd/system/multimodule.service.d/60-as-user.conf",
                "/etc/systemd/system/multimodule-task@.service.d/60-as-user.conf")
        box.run("systemctl", "daemon-reload")
        box.run("sh", "-c", "ipcrm --all=msg; rm -rf /run/multimodule /var/lib/multimodule")


LEAKER = '''
from multimodule import Task


class Leaker(Task):
    is_stateful = True

    def set_config(self, config):
        self.hoard = []
        self.named_recur("leak", 0.05, self.leak)

    def leak(self):
        if self.config.get("leak", True):
            self.hoard.append(b"x" * 2_000_000)
'''

FAULTY = '''
from multimodule import Task


class Faulty(Task):
    def message(self, message):
        raise ValueError("cannot handle " + str(message.get("n")))
'''


def journal_json(box: SystemdBox, *matches: str) -> list[dict]:
    """Journal entries matching ``FIELD=value`` terms, as dicts."""
    import json

    out = box.journal("-o", "json", *matches)
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_monitor_under_systemd_journal_fields_cgroup_figures_and_unit_failsafe(box):
    import json

    box.write(f"{TASKS}/Leaker.py", LEAKER)
    box.write(f"{TASKS}/Faulty.py", FAULTY)
    # The monitor samples every 0.2 s over 1 s here (a test drop-in over the one above)
    box.write("/etc/systemd/system/multimodule.service.d/60-monitor.conf", f"""\
[Service]
ExecStart=
ExecStart={VENV_BIN}/python -m multimodule.cli.daemon -c /etc/multimodule/multimodule.toml \
-s ${{STATE_DIRECTORY}} -T ${{RUNTIME_DIRECTORY}}/transit --task-path {REPO}/tasks \
--task-path {TASKS} --monitor-interval 0.2 --monitor-window 1
""")
    box.run("systemctl", "daemon-reload")
    config = ("[Faulty]\n[Leaker]\nis_external = true\nleak = false\n"
              "[Leaker.monitor.memory_bytes]\nwarn = 150e6\nsevere = 200e6\nfailsafe = 250e6\n")
    unit = unit_name("Leaker")
    try:
        # Given the daemon under systemd (every channel to the journal by default)
        start_fresh(box, config)
        box.wait_for(lambda: box.show(unit, "ActiveState")["ActiveState"] == "active", 20,
                     "the Leaker unit active")
        # When a task's handler raises
        mmctl(box, "send", "Faulty", '{"n": 7}')
        # Then the error is in the journal with the structured fields
        entries = box.wait_for(lambda: journal_json(box, "MULTIMODULE_TASK=Faulty",
                                                    "MULTIMODULE_CHANNEL=error"), 15,
                               "Faulty's error in the journal")
        entry = entries[-1]
        assert "cannot handle 7" in entry["MESSAGE"] and entry["PRIORITY"] == "3"
        assert entry["FAILURE"] == "task_message_failure" and "Traceback" in entry["TRACEBACK"]
        # And the alert of its failure too, at alert priority
        alert = box.wait_for(lambda: journal_json(box, "MULTIMODULE_TASK=Faulty",
                                                  "MULTIMODULE_CHANNEL=alert"), 15,
                             "Faulty's alert in the journal")[-1]
        assert alert["METRIC"] == "message_failures" and alert["LEVEL"] == "warn"
        assert alert["PRIORITY"] == "1"
        # And the external task's figures come from its unit's cgroup
        def leaker_row():
            rows = json.loads(mmctl(box, "status", "--json").stdout)["rows"]
            row = next((r for r in rows if r["name"] == "Leaker"), None)
            return row if row and row["memory_bytes"] else None

        row = box.wait_for(leaker_row, 20, "figures of the Leaker unit")
        assert row["where"] == unit and row["kind"] == "external", row
        assert row["pid"] == int(box.show(unit, "MainPID")["MainPID"])
        assert row["open_fds"] > 3 and row["threads"] >= 1
        # When it starts leaking (its config changed: its process follows the file)
        box.write("/etc/multimodule/multimodule.toml", config.replace("leak = false\n", ""))
        box.run("systemctl", "restart", unit)
        # Then warn, severe, failsafe alerts in order in the journal, and the unit is stopped
        def levels():
            got = [e["LEVEL"] for e in journal_json(box, "MULTIMODULE_TASK=Leaker",
                                                    "MULTIMODULE_CHANNEL=alert")
                   if e.get("METRIC") == "memory_bytes" and "REASON" not in e]
            return got if "failsafe" in got else None

        assert box.wait_for(levels, 30, "Leaker's memory alerts") == ["warn", "severe",
                                                                      "failsafe"]
        box.wait_for(lambda: box.show(unit, "ActiveState")["ActiveState"] == "inactive", 30,
                     "the Leaker unit stopped by failsafe")
        # And it stays stopped when the daemon restarts, until unfailsafe
        box.run("systemctl", "restart", "multimodule")
        assert "stays stopped" in box.journal("-u", "multimodule", "-n", "20")
        assert box.show(unit, "ActiveState")["ActiveState"] == "inactive"
        box.write("/etc/multimodule/multimodule.toml", config)
        mmctl(box, "unfailsafe", "Leaker")
        assert box.show(unit, "ActiveState")["ActiveState"] == "active"
    finally:
        box.run("systemctl", "stop", "multimodule", unit, check=False)
        box.run("rm", "-f", "/etc/systemd/system/multimodule.service.d/60-monitor.conf",
                "/var/lib/multimodule/failsafe.json")
        box.run("systemctl", "daemon-reload")
