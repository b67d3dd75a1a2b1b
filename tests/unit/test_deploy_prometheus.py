"""deploy/prometheus: promtool's checks and unit tests, and what the config must scrape.

``promtool check config`` (run from another directory, so the rule files must resolve next to the
config), ``promtool check rules`` and ``promtool test rules`` need Debian's ``prometheus`` package;
without it those tests skip (CI installs it). The structural tests need nothing.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
CONFIG = PROMETHEUS / "prometheus.yml"
RULES = PROMETHEUS / "rules"
RULE_FILES = ("recording.yml", "alerts.yml")
RAY_SD_FILE = "/tmp/ray/prom_metrics_service_discovery.json"  # written by the Ray head
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian: apt-get install prometheus); CI installs it"
)


def _promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _scrape_configs() -> dict[str, dict[str, Any]]:
    return {job["job_name"]: job for job in _load(CONFIG)["scrape_configs"]}


# ---------------------------------------------------------------- promtool


@needs_promtool
def test_promtool_check_config_resolves_the_rule_files(tmp_path: Path) -> None:
    done = _promtool("check", "config", str(CONFIG), cwd=tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert f"SUCCESS: {len(RULE_FILES)} rule files found" in out, out
    for name in RULE_FILES:
        assert f"Checking {RULES / name}" in out, f"{name} was not checked:\n{out}"


@needs_promtool
def test_promtool_check_rules() -> None:
    done = _promtool("check", "rules", *(str(RULES / name) for name in RULE_FILES))
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_promtool_test_rules(tmp_path: Path) -> None:
    done = _promtool("test", "rules", str(RULES / "tests.yml"), cwd=tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "SUCCESS" in out, out


# ---------------------------------------------------------------- prometheus.yml


def test_global_intervals() -> None:
    config = _load(CONFIG)
    assert config["global"]["scrape_interval"] == "15s"
    assert config["global"]["evaluation_interval"] == "15s"


def test_rule_files_are_listed_relative_to_the_config_and_exist() -> None:
    listed = _load(CONFIG)["rule_files"]
    assert listed == [f"rules/{name}" for name in RULE_FILES]  # not a glob: tests.yml is no rule file
    for name in listed:
        assert (CONFIG.parent / name).is_file(), name


def test_the_coordinator_is_scraped_statically_with_prometheus_defaults() -> None:
    job = _scrape_configs()["gradwire-coordinator"]
    assert [t for group in job["static_configs"] for t in group["targets"]] == ["coordinator:8000"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    # gradwire's series name their job in job_id and leave `job` to Prometheus (the scrape job), so
    # the defaults work, as they must under a Prometheus Operator ServiceMonitor (honorLabels off)
    assert not job.get("honor_labels", False)
    assert not job.get("metric_relabel_configs") and not job.get("relabel_configs")


def test_ray_nodes_come_from_rays_service_discovery_file() -> None:
    job = _scrape_configs()["ray"]
    assert [f for sd in job["file_sd_configs"] for f in sd["files"]] == [RAY_SD_FILE]
    assert "static_configs" not in job


def test_rays_own_template_scrapes_the_same_file() -> None:
    """The file name is Ray's: its generated prometheus.yml reads the same path."""
    templates = pytest.importorskip("ray.dashboard.modules.metrics.templates")
    assert "prom_metrics_service_discovery_file_path" in templates.PROMETHEUS_YML_TEMPLATE
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    assert Path(RAY_SD_FILE).name == PROMETHEUS_SERVICE_DISCOVERY_FILE


# ---------------------------------------------------------------- rules


def _rules(name: str) -> list[dict[str, Any]]:
    return [rule for group in _load(RULES / name)["groups"] for rule in group["rules"]]


def test_recording_rule_names_follow_level_metric_operations() -> None:
    for rule in _rules("recording.yml"):
        name = rule["record"]
        match = re.fullmatch(r"([a-z_]+):(gradwire_[a-z0-9_]+):([a-z0-9_]+)", name)
        assert match, f"{name}: not level:metric:operations"
        level, _, operations = match.groups()
        assert re.search(r"rate5m$", operations), f"{name}: the operation names its 5m window"
        # the level names exactly the labels the expression keeps, in order, joined by "_"
        groupings = re.findall(r"by \(([^)]*)\)", rule["expr"])
        kept = {"_".join(re.split(r"\s*,\s*", grouping.strip())) for grouping in groupings}
        if kept:
            assert kept == {level}, f"{name}: aggregates by {kept}, not {level}"
        # recorded from rules only (no `by`): the level of those rules
        for used in re.findall(r"\b([a-z_]+):gradwire_", rule["expr"]):
            assert used == level, f"{name}: computed from a {used}: rule"


def test_alerts_have_a_severity_and_explain_themselves() -> None:
    for rule in _rules("alerts.yml"):
        assert rule["alert"].startswith("Gradwire"), rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"].strip() and rule["annotations"]["description"].strip()


def test_the_issue_asks_for_these_alerts() -> None:
    alerts = {rule["alert"] for rule in _rules("alerts.yml")}
    wanted = {"GradwireJobFailed", "GradwireWorkerRestarts", "GradwireStragglerWaitHigh"}
    assert wanted | {"GradwireTelemetryDropped"} <= alerts


def test_every_rule_has_promtool_unit_tests() -> None:
    """Each recording rule is an expr of a promql_expr_test; each alert is tested firing and quiet."""
    tests = _load(RULES / "tests.yml")
    assert tests["rule_files"] == list(RULE_FILES)
    exprs = {case["expr"].strip() for t in tests["tests"] for case in t.get("promql_expr_test", [])}
    for rule in _rules("recording.yml"):
        assert rule["record"] in exprs, f"recording rule {rule['record']} has no promql_expr_test"
    cases: dict[str, list[list[Any]]] = {}
    for t in tests["tests"]:
        for case in t.get("alert_rule_test", []):
            cases.setdefault(case["alertname"], []).append(case.get("exp_alerts") or [])
    for rule in _rules("alerts.yml"):
        seen = cases.get(rule["alert"], [])
        assert any(seen), f"{rule['alert']}: no test where it fires"
        assert any(not alerts for alerts in seen), f"{rule['alert']}: no test where it stays quiet"
