"""The Prometheus files in deploy/prometheus: alerting rules, their unit tests and the config.

promtool (Debian/Ubuntu: `apt-get install prometheus`) checks the rules and the config and runs
alerts_test.yml, the rules' unit tests. Without promtool those tests are skipped, unless
REQUIRE_PROMETHEUS=1 (CI), where they fail. The structural checks (every alert has a severity,
a summary, a runbook link and unit tests that see it fire and stay quiet) need only PyYAML.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from support import unavailable

# promtool, a tool of its own, for every rule test.
pytestmark = pytest.mark.processes

ROOT = Path(__file__).resolve().parent.parent
PROM_DIR = ROOT / "deploy" / "prometheus"
ALERTS = PROM_DIR / "alerts.yml"
ALERTS_TEST = PROM_DIR / "alerts_test.yml"
CONFIG = PROM_DIR / "prometheus.yml"
OPERATIONS_GUIDE = ROOT / "docs" / "operations.md"
SEVERITIES = {"page", "ticket"}


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        unavailable("promtool is not on the PATH (apt-get install prometheus)", "REQUIRE_PROMETHEUS")
    return path


def run_promtool(promtool: str, *args: str) -> None:
    cmd = [promtool, *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, (
        f"`{' '.join(cmd)}` exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    )


def alert_rules() -> list[dict]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def unit_tests() -> list[dict]:
    """Every alert_rule_test entry of alerts_test.yml, over all its test groups."""
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    return [case for group in tests for case in group.get("alert_rule_test") or []]


def test_promtool_accepts_the_alert_rules(promtool):
    """`promtool check rules` finds alerts.yml valid: syntax, PromQL, templates."""
    run_promtool(promtool, "check", "rules", str(ALERTS))


def test_alert_rules_pass_their_unit_tests(promtool):
    """`promtool test rules` runs alerts_test.yml: each alert fires and stays quiet when it should."""
    run_promtool(promtool, "test", "rules", str(ALERTS_TEST))


def test_promtool_accepts_the_prometheus_config_and_its_rule_files(promtool):
    """`promtool check config` finds prometheus.yml valid, alerts.yml included."""
    run_promtool(promtool, "check", "config", str(CONFIG))


def test_the_config_scrapes_the_jobs_the_alerts_name_and_loads_the_rules():
    """prometheus.yml loads alerts.yml and has the jobs the rules match on, one target list each:
    both services, and the edge's HAProxy exporter on the port its config binds."""
    config = yaml.safe_load(CONFIG.read_text())
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"clinic-appointments", "clinic-billing", "clinic-edge"}
    assert [len(jobs[name]["static_configs"]) for name in sorted(jobs)] == [1, 1, 1]
    edge_port = re.search(r'CLINIC_EDGE_METRICS_BIND-:(\d+)', (ROOT / "deploy" / "haproxy" / "haproxy.cfg").read_text())[1]
    assert jobs["clinic-edge"]["static_configs"][0]["targets"] == [f"edge:{edge_port}"]
    expressions = " ".join(rule["expr"] for rule in alert_rules())
    assert all(name in expressions for name in jobs)


def test_every_alert_has_a_severity_a_one_line_summary_and_its_runbook_link():
    """Each alert is labelled page or ticket, has a summary and description, and links its runbook section."""
    rules = alert_rules()
    assert rules, "alerts.yml holds no alert"
    problems = []
    for rule in rules:
        name = rule["alert"]
        severity = (rule.get("labels") or {}).get("severity")
        annotations = rule.get("annotations") or {}
        if severity not in SEVERITIES:
            problems.append(f"{name}: severity {severity!r}, not one of {sorted(SEVERITIES)}")
        summary = annotations.get("summary", "")
        if not summary.strip() or "\n" in summary.strip():
            problems.append(f"{name}: summary must be one non-empty line, got {summary!r}")
        if not annotations.get("description", "").strip():
            problems.append(f"{name}: no description")
        expected_url = f"docs/operations.md#{name.lower()}"
        if annotations.get("runbook_url") != expected_url:
            problems.append(f"{name}: runbook_url {annotations.get('runbook_url')!r}, expected {expected_url!r}")
    assert not problems, "\n".join(problems)


def test_alert_names_are_unique():
    """No two rules share an alert name (their runbook anchors would collide)."""
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names)), names


def test_every_alert_has_a_unit_test_where_it_fires_and_one_where_it_stays_quiet():
    """alerts_test.yml covers every alert both ways, so an alert without tests fails the suite."""
    cases = unit_tests()
    missing = []
    for name in (rule["alert"] for rule in alert_rules()):
        mine = [case for case in cases if case.get("alertname") == name]
        if not any(case.get("exp_alerts") for case in mine):
            missing.append(f"{name}: no case where it fires")
        if not any(not case.get("exp_alerts") for case in mine):
            missing.append(f"{name}: no case where it stays quiet")
    assert not missing, "\n".join(missing)


def test_every_runbook_link_has_its_section_in_the_operations_guide():
    """docs/operations.md has a `### <AlertName>` heading for each alert, the runbook_url's anchor."""
    headings = set(re.findall(r"^###\s+(\S+)\s*$", OPERATIONS_GUIDE.read_text(), flags=re.MULTILINE))
    missing = [rule["alert"] for rule in alert_rules() if rule["alert"] not in headings]
    assert not missing, f"no `### <name>` section in docs/operations.md for: {missing}"
