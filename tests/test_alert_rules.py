"""The shipped Prometheus alerting rules (packaging/prometheus/multimodule.rules.yml).

``promtool`` (Debian's package ``prometheus``, installed by scripts/setup as root) checks the
rules and runs their unit tests (multimodule.rules.test.yml: for each alert, series that
fire it, series that do not, and the edge of its ``for:``); without promtool these tests are
skipped, except under CI, where they fail. And every metric the rules' expressions select
(all but Prometheus's own ``up``), with its label matchers, must be in a real scrape of a
running daemon, so the rules cannot drift from what the daemon exports.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from helpers import receive_until, route, router_section

REPO = Path(__file__).resolve().parent.parent
RULES_DIR = REPO / "packaging" / "prometheus"
RULES = RULES_DIR / "multimodule.rules.yml"
RULE_TESTS = RULES_DIR / "multimodule.rules.test.yml"

#: The alerts the rules must define (issue 14's list).
ALERTS = {"MultimoduleTaskFailsafe", "MultimoduleQueueFillHigh", "MultimoduleQueueFillCritical",
          "MultimoduleHandlerFailures", "MultimoduleTaskRestarting", "MultimoduleDown",
          "MultimoduleMetricsMissing", "MultimoduleMetricsAbsent"}

#: Metrics Prometheus makes itself, not the daemon.
PROMETHEUS_OWN = {"up"}


def promtool() -> str:
    """The ``promtool`` binary; skips without it, except under CI (set-up installs it)."""
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing (scripts/setup installs the package prometheus "
                        "as root)")
        pytest.skip("promtool is not installed (scripts/setup installs the package "
                    "prometheus as root)")
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess:
    """``promtool ARGS`` run in the rules' directory (bounded: 60 s)."""
    return subprocess.run([promtool(), *args], cwd=RULES_DIR, capture_output=True, text=True,
                          timeout=60)


# -- reading the rules without a YAML library ------------------------------------------------

def alert_names(text: str) -> list[str]:
    """The ``alert:`` names of a rules file, in order."""
    return re.findall(r"^\s*-\s*alert:\s*(\S+)\s*$", text, re.M)


def expressions(text: str) -> list[str]:
    """The ``expr:`` of each rule: on its line, or a block (``|``, ``>``) indented below it."""
    lines = text.splitlines()
    found = []
    for number, line in enumerate(lines):
        match = re.match(r"^(\s*)expr:\s*(.*?)\s*$", line)
        if not match:
            continue
        indent, value = len(match.group(1)), match.group(2)
        if value and value[0] not in "|>":
            found.append(value.strip("'\"") if value[0] in "'\"" else value)
            continue
        block = []
        for following in lines[number + 1:]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            block.append(following.strip())
        found.append(" ".join(block))
    return found


#: Words of PromQL that look like metric names but are not.
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
            "group_left", "group_right", "inf", "nan"}


def selectors(expr: str) -> list[tuple[str, dict[str, str]]]:
    """The metric selectors of PromQL ``expr``: ``(name, {label: value})`` (equality
    matchers only; raises ValueError on other matchers, which these tests cannot check)."""
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # ranges and subqueries
    found = []
    for match in re.finditer(r"(?<![\w:.\"])([A-Za-z_:][\w:]*)\s*(\{[^}]*\})?", expr):
        name, braces = match.group(1), match.group(2)
        rest = expr[match.end():].lstrip()
        if name.lower() in KEYWORDS or (braces is None and rest.startswith("(")):
            continue  # a keyword or a function
        labels = {}
        for matcher in re.finditer(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', braces or ""):
            if matcher.group(2) != "=":
                raise ValueError(f"matcher {matcher.group(0)} in {expr!r}")
            labels[matcher.group(1)] = matcher.group(3)
        found.append((name, labels))
    return found


def test_the_reading_of_expressions():
    assert selectors('up{job="multimodule"} == 1 unless on (job, instance) '
                     'multimodule_task_running{kind="daemon"}') == [
        ("up", {"job": "multimodule"}), ("multimodule_task_running", {"kind": "daemon"})]
    assert selectors("increase(multimodule_task_restarts[15m]) > 0") == [
        ("multimodule_task_restarts", {})]
    assert selectors('absent(up{job="multimodule"})') == [("up", {"job": "multimodule"})]
    text = "      - alert: A\n        expr: |\n          sum by (task) (x)\n          > 0\n" \
           "        for: 5m\n      - alert: B\n        expr: y == 1\n"
    assert alert_names(text) == ["A", "B"]
    assert expressions(text) == ["sum by (task) (x) > 0", "y == 1"]
    assert [name for e in expressions(text) for name, _ in selectors(e)] == ["x", "y"]


# -- promtool ------------------------------------------------------------------------------------

def test_the_rules_pass_promtool_check():
    result = run_promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    text = RULES.read_text()
    assert set(alert_names(text)) == ALERTS
    assert f"SUCCESS: {len(alert_names(text))} rules found" in result.stdout


def test_each_alert_has_severity_summary_and_description_naming_its_subject():
    text = RULES.read_text()
    rules = re.split(r"^\s*-\s*alert:", text, flags=re.M)[1:]
    assert len(rules) == len(ALERTS)
    for rule in rules:
        name = rule.split()[0]
        assert re.search(r"^\s*severity:\s*(warning|critical)\s*$", rule, re.M), name
        summary = re.search(r"^\s*summary:\s*(.+)$", rule, re.M)
        description = re.search(r"^\s*description:\s*(.+)$", rule, re.M)
        assert summary and description, name
        # A task's alert names the task; a scrape target's, its instance (none when the
        # target is absent: then the job)
        [expr] = expressions(rule)
        if expr.startswith("absent("):
            subject = "multimodule"
        elif "up" in [metric for metric, _ in selectors(expr)]:
            subject = "{{ $labels.instance }}"
        else:
            subject = "{{ $labels.task }}"
        assert subject in summary.group(1) and subject in description.group(1), name


def test_the_rules_unit_tests_pass_and_cover_every_alert():
    tests = RULE_TESTS.read_text()
    for name in ALERTS:
        # Each alert is tested firing and not firing
        evaluations = re.findall(rf"alertname:\s*{name}\s*\n\s*exp_alerts:(.*)", tests)
        assert "" in [e.strip() for e in evaluations], f"{name}: no test that fires it"
        assert "[]" in [e.strip() for e in evaluations], f"{name}: no test where it is quiet"
    result = run_promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_package_installs_the_rules_where_the_readme_loads_them(tmp_path):
    # The Debian package installs the rules file...
    install = (REPO / "debian" / "multimodule.install").read_text().splitlines()
    [directory] = [line.split()[1] for line in install
                   if line.split()[:1] == ["packaging/prometheus/multimodule.rules.yml"]]
    installed = f"/{directory}/{RULES.name}"
    # ...where the README's Prometheus configuration loads it from
    readme = (REPO / "README.md").read_text()
    [config] = [block for block in re.findall(r"```yaml\n(.*?)```", readme, re.S)
                if "rule_files:" in block]
    assert re.search(rf"^rule_files:\n  - {re.escape(installed)}$", config, re.M), config
    assert re.search(r"^  - job_name: multimodule\b", config, re.M), config
    # and that configuration, with the rules from here, is valid
    (tmp_path / "prometheus.yml").write_text(config.replace(installed, str(RULES)))
    result = run_promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


# -- the rules against a real daemon's scrape ---------------------------------------------------

COUNTER = """
    from multimodule import Task

    class Counter(Task):
        def message(self, message):
            self.emit({"n": message["n"]})
"""

TICKER = """
    from multimodule import Task

    class Ticker(Task):
        is_stateful = True

        def set_config(self, config):
            self.named_recur("tick", 0.05, lambda: self.emit({"tick": True}))
"""


def free_port() -> int:
    """A TCP port free on the loopback address now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(port: int) -> dict[str, list[dict[str, str]]]:
    """Metric name -> the label sets of its samples, from the daemon's endpoint."""
    from prometheus_client.parser import text_string_to_metric_families

    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    samples: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(dict(sample.labels))
    return samples


def test_every_metric_the_rules_select_is_in_a_real_scrape(mm, transit):
    wanted = [(name, labels) for expr in expressions(RULES.read_text())
              for name, labels in selectors(expr) if name not in PROMETHEUS_OWN]
    assert {name for name, _ in wanted} >= {"multimodule_task_failsafe",
                                            "multimodule_task_queue_fill_ratio",
                                            "multimodule_task_restarts"}
    # Given a daemon serving metrics, with an internal task and an external one (restarts
    # are counted for external tasks only)
    mm.task("Counter", COUNTER)
    mm.task("Ticker", TICKER)
    mm.config("[Counter]\n[Ticker]\nis_external = true\n"
              + router_section(route("Ticker", "ticks")))
    port = free_port()
    daemon = mm.start("--monitor-interval", "0.1", "--monitor-window", "1",
                      "--metrics-listen", f"127.0.0.1:{port}")
    daemon.expect("stdout", "serving metrics on")

    def missing(samples):
        # (Prometheus adds the labels job and instance itself, at scrape time)
        return [(name, labels) for name, labels in wanted
                if not any({(key, value) for key, value in labels.items()
                            if key not in ("job", "instance")} <= sample.items()
                           for sample in samples.get(name, []))]

    # When it has sampled the external task's process (each tick is time passing)
    absent = missing(scrape(port))
    deadline = time.monotonic() + 20
    while absent and time.monotonic() < deadline:
        receive_until(transit, "ticks", lambda m: True)
        absent = missing(scrape(port))
    # Then every selector of the rules matches samples the daemon exports
    assert not absent, f"not in the daemon's scrape: {absent}"
