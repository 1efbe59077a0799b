"""Unit names and the limits drop-in of external tasks (pure functions, no systemd)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from multimodule.config import TaskLimits, parse_limits
from multimodule.errors import ConfigError
from multimodule.supervise.units import (
    dropin_path,
    escape_instance,
    render_dropin,
    resource_properties,
    unit_name,
)


@pytest.mark.parametrize("name", ["Example1", "my_task", "Tâche", "a.b", ".x", "a-b", "ü_9"])
def test_escape_matches_systemd_escape(name):
    # Given systemd's own tool as the reference
    if shutil.which("systemd-escape") is None:
        if os.environ.get("CI"):
            raise RuntimeError("systemd-escape (package systemd) is needed under CI")
        pytest.skip("systemd-escape not installed")
    expected = subprocess.run(["systemd-escape", "--", name], capture_output=True,
                              text=True, check=True).stdout.strip()
    # Then ours escapes the same way
    assert escape_instance(name) == expected


def test_unit_name_and_dropin_path():
    assert unit_name("Example1") == "multimodule-task@Example1.service"
    assert str(dropin_path("Example1")) == \
        "/run/systemd/system/multimodule-task@Example1.service.d/50-limits.conf"


def test_render_every_setting():
    limits = parse_limits("T", {"memory_max": "512M", "cpu_quota": 0.5, "tasks_max": 64,
                                "nice": 5, "environment": {"B": "two words", "A": 'q"%'}})
    text = render_dropin("T", limits)
    lines = text.splitlines()
    assert lines[1] == "[Service]"
    assert lines[2:] == ["MemoryMax=512M", "CPUQuota=50%", "TasksMax=64", "Nice=5",
                         'Environment="A=q\\"%%"', 'Environment="B=two words"']


def test_render_bytes_and_percent_quota():
    text = render_dropin("T", parse_limits("T", {"memory_max": 1048576, "cpu_quota": "150%"}))
    assert "MemoryMax=1048576\n" in text and "CPUQuota=150%\n" in text


def test_no_limits_renders_an_empty_service_section():
    assert render_dropin("T", TaskLimits()).splitlines()[1:] == ["[Service]"]


@pytest.mark.parametrize("table, field", [
    ({"memory_max": "lots"}, "T.limits.memory_max"),
    ({"memory_max": -5}, "T.limits.memory_max"),
    ({"cpu_quota": 0}, "T.limits.cpu_quota"),
    ({"cpu_quota": "fast"}, "T.limits.cpu_quota"),
    ({"tasks_max": 0}, "T.limits.tasks_max"),
    ({"nice": 40}, "T.limits.nice"),
    ({"environment": {"1X": "v"}}, "T.limits.environment"),
    ({"memroy_max": "1G"}, "T.limits.memroy_max"),
])
def test_bad_limits_are_refused_naming_the_field(table, field):
    with pytest.raises(ConfigError) as info:
        parse_limits("T", table, "f.toml")
    assert str(info.value).startswith(f"f.toml: {field}:"), str(info.value)


def test_resource_properties_for_set_property():
    limits = parse_limits("T", {"memory_max": "1G", "cpu_quota": 0.5, "tasks_max": 9,
                                "nice": 3, "environment": {"A": "b"}})
    # Only what `systemctl set-property` can set; nice and environment are the process's
    assert resource_properties(limits) == ["MemoryMax=1G", "CPUQuota=50%", "TasksMax=9"]
