"""The Grafana dashboards and provisioning under deploy/grafana, checked without Grafana.

Structure: valid JSON, the five dashboards with stable and unique uids, every panel with a title, a
unit and a description, the ``$datasource`` variable as every panel's and query's datasource, the
``$job`` filter. Provisioning: the datasource and the dashboard provider, whose path is where
compose mounts the dashboards folder.

Metric names: every name in every panel's PromQL (and in the recording and alert rules) is a series
the coordinator really exposes on ``/metrics`` (rendered from a real app after a step report, a
transition and a few requests) or a recording rule of deploy/prometheus/rules/recording.yml. A
name the server does not export yet but has been asked for is listed in :data:`PENDING_METRICS`;
the cases using it are strict xfails, so they turn into failures the day it is exported and the
entry must go. tests/e2e/test_prometheus.py evaluates the same expressions in a real Prometheus.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARDS = GRAFANA / "dashboards"
PROVISIONING = GRAFANA / "provisioning"
RULES = ROOT / "deploy" / "prometheus" / "rules"

#: file stem -> uid; uids are part of the dashboards' URLs and must not change
UIDS = {
    "communication-savings": "gradwire-savings",
    "step-time": "gradwire-step-time",
    "training": "gradwire-training",
    "stragglers": "gradwire-stragglers",
    "service": "gradwire-service",
}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
JOB_QUERY = "label_values(gradwire_train_steps_total, job)"

#: Series Prometheus makes itself for every scrape target.
PROMETHEUS_SERIES = frozenset({"up"})

#: Metrics the dashboards and alerts use that the coordinator does not export yet, and what must
#: change for it to (asked of the server owners; see the report of this change).
PENDING_METRICS: dict[str, str] = {}  # every metric the dashboards use is exported now

_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or",
     "unless", "inf", "nan", "atan2"}
)  # fmt: skip


# ---------------------------------------------------------------- helpers shared with the e2e test


def load_dashboards() -> dict[str, dict[str, Any]]:
    """file stem -> parsed dashboard JSON."""
    return {path.stem: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in (collapsed) rows."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


@dataclass(frozen=True)
class Query:
    """One PromQL expression and where it comes from."""

    source: str  # "<dashboard>/<panel title>/<refId>" or "rule:<name>"
    expr: str

    @property
    def pending(self) -> list[str]:
        """The :data:`PENDING_METRICS` it uses."""
        return sorted(metric_names(self.expr) & PENDING_METRICS.keys())


def dashboard_queries() -> list[Query]:
    queries = []
    for stem, board in load_dashboards().items():
        for panel in iter_panels(board["panels"]):
            for target in panel.get("targets", []):
                if target.get("expr"):
                    queries.append(Query(f"{stem}/{panel['title']}/{target['refId']}", target["expr"]))
    return queries


def rule_groups(name: str) -> list[dict[str, Any]]:
    return yaml.safe_load((RULES / name).read_text())["groups"]


def recording_rules() -> dict[str, str]:
    """record name -> expr, in file order."""
    return {r["record"]: r["expr"] for g in rule_groups("recording.yml") for r in g["rules"]}


def alert_rules() -> dict[str, str]:
    return {r["alert"]: r["expr"] for g in rule_groups("alerts.yml") for r in g["rules"]}


def substitute(
    expr: str, *, job: str = ".+", rate_interval: str = "1m", range_: str = "5m", interval: str = "15s"
) -> str:
    """Grafana's variables replaced the way Grafana would (``$job`` is a regex: ``job=~"$job"``)."""
    for name, value in (("__rate_interval", rate_interval), ("__range", range_), ("__interval", interval)):
        expr = expr.replace("${" + name + "}", value).replace("$" + name, value)
    return expr.replace("${job}", job).replace("$job", job)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords and label names left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals (label values, $job)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries ($__rate_interval)
    text = _GROUPING.sub(" ", text)  # by (...), on (...), group_left (...)
    text = re.sub(r"\boffset\s+-?[0-9smhdwy]+", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", text):
        token = match.group()
        if token.lower() in _KEYWORDS or text[match.end() :].lstrip().startswith("("):
            continue  # a keyword, or a function / aggregation being called
        names.add(token)
    return names


def selectors(expr: str, name: str) -> list[str]:
    """The label matchers (``{...}`` or ``""``) of every place ``expr`` selects metric ``name``."""
    pattern = rf"(?<![\w:]){re.escape(name)}(?![\w:])\s*(\{{[^}}]*\}})?"
    return [m.group(1) or "" for m in re.finditer(pattern, expr)]


@dataclass(frozen=True)
class Exposition:
    samples: frozenset[str]  # sample names (with _total, _bucket, _sum, _count)
    per_job: frozenset[str]  # sample names whose series carry a `job` label


@pytest.fixture(scope="module")
def exposition(tmp_path_factory: pytest.TempPathFactory) -> Exposition:
    """What a real coordinator app serves on /metrics after a report, a transition and some requests."""
    from fastapi.testclient import TestClient
    from prometheus_client.parser import text_string_to_metric_families

    from gradwire.server.app import create_app
    from gradwire.server.metrics import CoordinatorMetrics
    from gradwire.server.settings import Settings
    from gradwire.server.states import JobState

    db = tmp_path_factory.mktemp("exposition") / "coordinator.db"
    metrics = CoordinatorMetrics()
    metrics.observe_report(
        {"job_id": "job-1", "rank": 0, "compressor": "powersgd", "loss": 1.5, "accuracy": 0.5,
         "bytes_sent": 100, "bytes_uncompressed": 1000, "stragglers": [1], "compute_s": 0.1,
         "compress_s": 0.01, "communicate_s": 0.02, "wait_s": 0.03}
    )  # fmt: skip
    metrics.observe_transition(JobState.QUEUED, JobState.STARTING, job="job-1")
    metrics.observe_transition(JobState.RUNNING, JobState.RESTARTING, job="job-1")
    with pytest.MonkeyPatch.context() as env:
        env.delenv("GRADWIRE_TOKENS", raising=False)
        env.delenv("RAY_ADDRESS", raising=False)
        app = create_app(Settings(database_url=f"sqlite:///{db}"), metrics=metrics)
        with TestClient(app, raise_server_exceptions=False) as client:
            client.get("/healthz")
            client.get("/v1/jobs/no-such-job")  # an error response, for request metrics
            text = client.get("/metrics").text
    samples, per_job = set(), set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.add(sample.name)
            if "job" in sample.labels:
                per_job.add(sample.name)
    return Exposition(frozenset(samples), frozenset(per_job))


def case_param(query: Query) -> Any:
    marks = []
    if query.pending:
        reason = "the coordinator does not export " + ", ".join(query.pending) + " yet"
        marks.append(pytest.mark.xfail(strict=True, reason=reason))
    return pytest.param(query, id=query.source, marks=marks)


# ---------------------------------------------------------------- structure


def test_the_five_dashboards_exist_with_their_stable_uids() -> None:
    boards = load_dashboards()
    assert set(boards) == set(UIDS)
    for stem, board in boards.items():
        assert board["uid"] == UIDS[stem], stem
        assert board.get("id") is None, f"{stem}: a provisioned dashboard carries no database id"
        assert board["title"].startswith("gradwire / "), stem


def test_uids_and_titles_are_unique() -> None:
    boards = list(load_dashboards().values())
    assert len({b["uid"] for b in boards}) == len(boards)
    assert len({b["title"] for b in boards}) == len(boards)  # titles must be unique in a folder


def test_every_panel_has_title_unit_description_and_queries() -> None:
    for stem, board in load_dashboards().items():
        ids = [p["id"] for p in iter_panels(board["panels"])]
        assert len(ids) == len(set(ids)), f"{stem}: panel ids repeat"
        for panel in iter_panels(board["panels"]):
            where = f"{stem}/{panel.get('title')!r}"
            assert panel.get("title", "").strip(), f"{where}: no title"
            assert panel.get("description", "").strip(), f"{where}: no description"
            assert panel.get("fieldConfig", {}).get("defaults", {}).get("unit"), f"{where}: no unit"
            assert panel.get("targets"), f"{where}: no query"
            assert all(t.get("expr", "").strip() for t in panel["targets"]), f"{where}: an empty query"
            refs = [t["refId"] for t in panel["targets"]]
            assert len(refs) == len(set(refs)), f"{where}: refIds repeat"
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, f"{where}: wider than the dashboard"


def _datasources(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield f"{path}.{key}", value
            yield from _datasources(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _datasources(value, f"{path}[{i}]")


def test_the_datasource_is_the_variable_everywhere() -> None:
    for stem, board in load_dashboards().items():
        annotations = board.get("annotations", {}).get("list", [])
        builtin = [a for a in annotations if a.get("builtIn")]
        found = list(_datasources({k: v for k, v in board.items() if k != "annotations"}))
        assert found, stem
        for path, value in found:
            assert value == DATASOURCE, f"{stem}{path}: {value!r} is not the $datasource variable"
        assert len(builtin) == len(annotations), f"{stem}: only Grafana's built-in annotations"
        for panel in iter_panels(board["panels"]):
            assert panel["datasource"] == DATASOURCE
            assert all(t["datasource"] == DATASOURCE for t in panel["targets"])


def test_datasource_and_job_variables() -> None:
    for stem, board in load_dashboards().items():
        variables = {v["name"]: v for v in board["templating"]["list"]}
        ds = variables["datasource"]
        assert (ds["type"], ds["query"]) == ("datasource", "prometheus"), stem
        job = variables["job"]
        assert job["type"] == "query", stem
        query = job["query"]["query"] if isinstance(job["query"], dict) else job["query"]
        assert query == JOB_QUERY, stem
        assert job["includeAll"] is True and job["multi"] is True, stem
        assert job["allValue"] == ".+", f"{stem}: All must match every job, not a list of the loaded ones"
        assert job["datasource"] == DATASOURCE, stem


def test_per_job_series_are_filtered_by_the_job_variable(exposition: Exposition) -> None:
    """Wherever a panel selects a series that has a job label, it selects job=~"$job"."""
    per_job = exposition.per_job | {r for r in recording_rules() if r.split(":")[0].startswith("job")}
    for query in dashboard_queries():
        for name in metric_names(query.expr) & per_job:
            for matchers in selectors(query.expr, name):
                assert 'job=~"$job"' in matchers, f"{query.source}: {name}{matchers} ignores $job"


# ---------------------------------------------------------------- provisioning


def test_datasource_provisioning() -> None:
    config = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    assert config["apiVersion"] == 1
    [source] = config["datasources"]
    assert source["type"] == "prometheus" and source["access"] == "proxy"
    assert source["url"] == "http://prometheus:9090"  # the compose service
    assert source["isDefault"] is True and source["uid"]


def test_dashboard_provider_points_at_the_dashboards_folder() -> None:
    config = yaml.safe_load((PROVISIONING / "dashboards" / "gradwire.yml").read_text())
    assert config["apiVersion"] == 1
    [provider] = config["providers"]
    assert provider["type"] == "file"
    path = provider["options"]["path"]
    assert path.rstrip("/").endswith("/dashboards"), path
    assert {p.name for p in DASHBOARDS.glob("*.json")} == {f"{stem}.json" for stem in UIDS}


def test_compose_mounts_the_dashboards_where_the_provider_reads_them() -> None:
    compose_file = ROOT / "docker-compose.yml"
    if not compose_file.exists():
        pytest.skip("no docker-compose.yml yet")
    grafana = (yaml.safe_load(compose_file.read_text()).get("services") or {}).get("grafana")
    if grafana is None:
        pytest.skip("docker-compose.yml has no grafana service yet")
    path = yaml.safe_load((PROVISIONING / "dashboards" / "gradwire.yml").read_text())["providers"][0]
    path = path["options"]["path"].rstrip("/")
    mounts = {}
    for volume in grafana.get("volumes", []):
        if isinstance(volume, dict):
            source, target = volume.get("source", ""), volume.get("target", "")
        else:
            source, target = ([*volume.split(":"), ""])[:2]
        mounts[target.rstrip("/")] = (
            (compose_file.parent / source).resolve() if source.startswith(".") else None
        )
    assert mounts.get(path) == DASHBOARDS.resolve(), f"compose mounts no deploy/grafana/dashboards at {path}"


# ---------------------------------------------------------------- metric names


def test_metric_name_extraction() -> None:
    expr = (
        'sum by (job, phase) (rate(a_total{job=~"$job",phase="x"}[$__rate_interval])) / ignoring (phase) '
        "group_left sum by (job) (rate(b_sum[5m])) or histogram_quantile(0.95, c_bucket) > 1e3 "
        "unless d offset 10m and on (le) job:e:rate5m"
    )
    assert metric_names(expr) == {"a_total", "b_sum", "c_bucket", "d", "job:e:rate5m"}
    assert selectors(expr, "a_total") == ['{job=~"$job",phase="x"}']


def test_exposition_has_the_contract_families(exposition: Exposition) -> None:
    expected = {
        "gradwire_grad_bytes_uncompressed_total", "gradwire_grad_bytes_sent_total",
        "gradwire_step_seconds_bucket", "gradwire_step_seconds_sum", "gradwire_step_seconds_count",
        "gradwire_train_steps_total",
        "gradwire_train_loss", "gradwire_eval_accuracy", "gradwire_stragglers_total",
        "gradwire_straggler_wait_seconds_total", "gradwire_jobs", "gradwire_job_transitions_total",
        "gradwire_worker_restarts_total",
    }  # fmt: skip
    assert expected <= exposition.samples


def test_the_job_variable_reads_an_exported_per_job_series(exposition: Exposition) -> None:
    assert "gradwire_train_steps_total" in exposition.per_job


@pytest.mark.parametrize("query", [case_param(q) for q in dashboard_queries()])
def test_dashboard_queries_use_exported_metrics(query: Query, exposition: Exposition) -> None:
    known = exposition.samples | recording_rules().keys() | PROMETHEUS_SERIES
    names = metric_names(query.expr)
    assert names, f"{query.source}: no metric in {query.expr!r}"
    assert names <= known, f"{query.source}: {sorted(names - known)} not exported by the coordinator"


def test_recording_rules_use_exported_metrics_or_earlier_rules(exposition: Exposition) -> None:
    defined: set[str] = set()
    for name, expr in recording_rules().items():
        unknown = metric_names(expr) - exposition.samples - defined
        assert not unknown, f"recording rule {name}: {sorted(unknown)} not exported"
        defined.add(name)


@pytest.mark.parametrize(
    "alert",
    [case_param(Query(f"alert:{name}", expr)) for name, expr in alert_rules().items()],
)
def test_alert_rules_use_exported_metrics(alert: Query, exposition: Exposition) -> None:
    known = exposition.samples | recording_rules().keys() | PROMETHEUS_SERIES
    unknown = metric_names(alert.expr) - known
    assert not unknown, f"{alert.source}: {sorted(unknown)} not exported by the coordinator"


def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    """promtool parses each query (Grafana's variables substituted) as a recording rule."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus); CI installs it")
    rules = [{"record": f"panel_{i}", "expr": substitute(q.expr)} for i, q in enumerate(dashboard_queries())]
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    done = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
