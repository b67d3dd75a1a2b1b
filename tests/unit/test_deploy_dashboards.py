"""The Grafana dashboards and provisioning under deploy/grafana, checked without Grafana.

Structure: valid JSON, the five dashboards with stable and unique uids, every panel with a title, a
unit and a description, the ``$datasource`` variable as every panel's and query's datasource, the
``$job_id`` filter. Provisioning: the datasource and the dashboard provider, whose path is where
compose mounts the dashboards folder.

Metric names: every name in every panel's PromQL (and in the recording and alert rules) is a series
the coordinator really exposes on ``/metrics`` (rendered from a real app after a step report, a
transition and a few requests) or a recording rule of deploy/prometheus/rules/recording.yml. A
name the server does not export yet but has been asked for is listed in :data:`PENDING_METRICS`;
the cases using it are strict xfails, so they turn into failures the day it is exported and the
entry must go. tests/e2e/test_prometheus.py evaluates the same expressions in a real Prometheus.

The job label: gradwire names a job in ``job_id``, never in ``job``, which Prometheus sets to the
scrape job on every series it scrapes (a Prometheus Operator ServiceMonitor sets it to the Service's
name). No series of the real ``/metrics`` may carry ``job``, and no dashboard query, legend,
variable, recording rule, alert expression, alert label or annotation may use it, except to select
Prometheus's own series of the scrape job (``up{job="gradwire-coordinator"}``).
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
JOB_LABEL = "job_id"  # server/metrics.py JOB_LABEL
JOB_QUERY = "label_values(gradwire_train_steps_total, job_id)"

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
    expr: str, *, job_id: str = ".+", rate_interval: str = "1m", range_: str = "5m", interval: str = "15s"
) -> str:
    """Grafana's variables replaced the way Grafana would (``$job_id`` is a regex: ``job_id=~"$job_id"``)."""
    for name, value in (("__rate_interval", rate_interval), ("__range", range_), ("__interval", interval)):
        expr = expr.replace("${" + name + "}", value).replace("$" + name, value)
    return expr.replace("${job_id}", job_id).replace("$job_id", job_id)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords and label names left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals (label values, $job_id)
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


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"(?<![\w:])([A-Za-z_:][A-Za-z0-9_:]*)?\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
#: functions whose arguments in these slices are label names (as string literals)
_LABEL_ARGS: dict[str, tuple[slice, ...]] = {
    "label_replace": (slice(1, 2), slice(3, 4)),  # (v, dst, replacement, src, regex)
    "label_join": (slice(1, 2), slice(3, None)),  # (v, dst, separator, src...)
    "count_values": (slice(0, 1),),  # (label, v)
    "sort_by_label": (slice(1, None),),  # (v, labels...)
    "sort_by_label_desc": (slice(1, None),),
}


def _call_args(masked: str, open_paren: int) -> list[slice]:
    """Where the top-level, comma-separated arguments of the call whose ``(`` is at ``open_paren``
    are (``masked``: the expression with its string literals' contents blanked out)."""
    args, depth, start = [], 0, open_paren + 1
    for i in range(open_paren, len(masked)):
        char = masked[i]
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
            if depth == 0:
                return [*args, slice(start, i)]
        elif char == "," and depth == 1:
            args.append(slice(start, i))
            start = i + 1
    raise ValueError(f"unbalanced parentheses in {masked!r}")


def labels_used(expr: str) -> list[tuple[str, str]]:
    """``(label, where)`` for every label name a PromQL expression uses.

    ``where`` is ``"{metric}"`` for a matcher of a selector of ``metric`` (``"{}"`` without a
    name), the clause (``"by"``, ``"on"``, ``"group_left"``, ...) for a label list, or the
    function (``"label_replace"``, ``"count_values"``, ...) for a label named as a string argument.
    """
    # string literals blanked out, same length: no braces, parentheses or commas hide in them now
    text = _STRING.sub(lambda m: m.group()[0] + " " * (len(m.group()) - 2) + m.group()[-1], expr)
    used = []
    for function, parts in _LABEL_ARGS.items():
        for match in re.finditer(rf"(?<![\w:]){function}\s*\(", text):
            args = [expr[where].strip() for where in _call_args(text, match.end() - 1)]
            picked = [arg for part in parts for arg in args[part]]
            used += [(arg[1:-1], function) for arg in picked if _STRING.fullmatch(arg)]
    for match in _LABEL_LIST.finditer(text):
        used += [(label.strip(), match.group(1)) for label in match.group(2).split(",") if label.strip()]
    for match in _SELECTOR.finditer(text):
        used += [(label, "{" + (match.group(1) or "") + "}") for label in _MATCHER.findall(match.group(2))]
    return used


def bare_job_uses(expr: str) -> list[str]:
    """Where ``expr`` uses the label ``job`` other than to select Prometheus's own scrape series."""
    allowed = {"{" + name + "}" for name in PROMETHEUS_SERIES}
    return [where for label, where in labels_used(expr) if label == "job" and where not in allowed]


@dataclass(frozen=True)
class Exposition:
    samples: frozenset[str]  # sample names (with _total, _bucket, _sum, _count)
    per_job: frozenset[str]  # sample names whose series carry a `job_id` label
    with_job: frozenset[str]  # sample names whose series carry a `job` label (must be none)


@pytest.fixture(scope="module")
def exposition(tmp_path_factory: pytest.TempPathFactory) -> Exposition:
    """What a real coordinator app serves on /metrics after a report, a transition and some requests."""
    from fastapi.testclient import TestClient
    from prometheus_client.parser import text_string_to_metric_families

    from gradwire.protos import telemetry_pb2 as pb
    from gradwire.server.app import create_app
    from gradwire.server.metrics import CoordinatorMetrics
    from gradwire.server.settings import Settings
    from gradwire.server.states import JobState

    db = tmp_path_factory.mktemp("exposition") / "coordinator.db"
    metrics = CoordinatorMetrics()
    metrics.observe_report(
        pb.StepReport(job_id="job-1", rank=0, compressor="powersgd", loss=1.5, accuracy=0.5,
                      bytes_sent=100, bytes_uncompressed=1000, stragglers=[1], compute_s=0.1,
                      compress_s=0.01, communicate_s=0.02, wait_s=0.03)
    )  # fmt: skip
    metrics.compressor_active("job-1", "powersgd")
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
    samples, per_job, with_job = set(), set(), set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.add(sample.name)
            if JOB_LABEL in sample.labels:
                per_job.add(sample.name)
            if "job" in sample.labels:
                with_job.add(sample.name)
    return Exposition(frozenset(samples), frozenset(per_job), frozenset(with_job))


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
        assert "job" not in variables, f"{stem}: the job variable is $job_id, named after its label"
        job = variables["job_id"]
        assert job["type"] == "query", stem
        query = job["query"]["query"] if isinstance(job["query"], dict) else job["query"]
        assert query == JOB_QUERY, stem
        assert job["includeAll"] is True and job["multi"] is True, stem
        assert job["allValue"] == ".+", f"{stem}: All must match every job, not a list of the loaded ones"
        assert job["datasource"] == DATASOURCE, stem


def test_per_job_series_are_filtered_by_the_job_variable(exposition: Exposition) -> None:
    """Wherever a panel selects a series that has a job_id label, it selects job_id=~"$job_id"."""
    per_job = exposition.per_job | {r for r in recording_rules() if r.split(":")[0].startswith("job_id")}
    for query in dashboard_queries():
        for name in metric_names(query.expr) & per_job:
            for matchers in selectors(query.expr, name):
                assert 'job_id=~"$job_id"' in matchers, f"{query.source}: {name}{matchers} ignores $job_id"


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
        'sum by (job_id, phase) (rate(a_total{job_id=~"$job_id",phase="x"}[$__rate_interval])) / ignoring '
        "(phase) group_left sum by (job_id) (rate(b_sum[5m])) or histogram_quantile(0.95, c_bucket) > 1e3 "
        "unless d offset 10m and on (le) job_id:e:rate5m"
    )
    assert metric_names(expr) == {"a_total", "b_sum", "c_bucket", "d", "job_id:e:rate5m"}
    assert selectors(expr, "a_total") == ['{job_id=~"$job_id",phase="x"}']


def test_exposition_has_the_contract_families(exposition: Exposition) -> None:
    expected = {
        "gradwire_grad_bytes_uncompressed_total", "gradwire_grad_bytes_sent_total",
        "gradwire_step_seconds_bucket", "gradwire_step_seconds_sum", "gradwire_step_seconds_count",
        "gradwire_train_steps_total",
        "gradwire_train_loss", "gradwire_eval_accuracy", "gradwire_stragglers_total",
        "gradwire_straggler_wait_seconds_total", "gradwire_jobs", "gradwire_job_transitions_total",
        "gradwire_worker_restarts_total", "gradwire_compressor_active",
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


# ---------------------------------------------------------------- the job label: job_id, never job

_VARIABLE_JOB = re.compile(r"\$job\b|\$\{job[}:]|\[\[job[\]:]")  # Grafana's three variable syntaxes
_LEGEND_JOB = re.compile(r"\{\{\s*job\s*\}\}")
_ANNOTATION_JOB = re.compile(r"\$labels\.job\b|\.Labels\.job\b|index \$labels \"job\"")
_SERIES = re.compile(r"^\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*\{(.*)\}\s*$")
_LABEL_PAIR = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"')
SCRAPE_JOB = "gradwire-coordinator"  # deploy/prometheus/prometheus.yml's job_name for the coordinator


def test_labels_used_finds_every_kind_of_label_use() -> None:
    """The checker below would see each of these ways of grouping or selecting by ``job``."""
    bad = [
        "sum by (job) (rate(x_total[5m]))",
        "sum by (compressor, job) (x)",
        'x_total{phase="wait", job=~"$job"}',
        '{job="j1"}',
        "a / on (job) group_left b",
        "a / ignoring (phase) group_left (job) b",
        "sum without (job) (x)",
        'label_replace(x, "job", "$1", "job_id", "(.*)")',
        'label_replace(x, "id", "$1", "job", "(.*),{")',
        'label_join(x, "both", ",", "compressor", "job")',
        'count_values("job", x)',
        "up{job='gradwire-coordinator'} and x{job!=''}",
    ]
    for expr in bad:
        assert bare_job_uses(expr), f"{expr!r}: a use of job not seen"
    good = [
        'sum by (job_id, compressor) (rate(x_total{job_id=~"$job_id"}[5m]))',
        'up{job="gradwire-coordinator"} == 0',  # Prometheus's own series of the scrape job
        'x{route="/v1/jobs/{job}", job_id="a"} / on (job_id) y',  # a {job} inside a label value
        'label_replace(x, "job_id", "$1", "id", "job=(.*)")',
        "job_id:gradwire_x:rate5m > 0.25",
    ]
    for expr in good:
        assert not bare_job_uses(expr), f"{expr!r}: {bare_job_uses(expr)}"
    assert ("job_id", "{x}") in labels_used('x{route="/v1/jobs/{job}", job_id="a"}')


def test_no_coordinator_series_carries_a_job_label(exposition: Exposition) -> None:
    """The real /metrics of an app that saw a report, transitions and requests: per-job series are
    labelled job_id, and none has a label `job`, which Prometheus would rename or overwrite."""
    assert not exposition.with_job, f"series with a `job` label: {sorted(exposition.with_job)}"
    assert {
        "gradwire_grad_bytes_uncompressed_total", "gradwire_grad_bytes_sent_total",
        "gradwire_step_seconds_bucket", "gradwire_step_seconds_sum", "gradwire_step_seconds_count",
        "gradwire_train_steps_total", "gradwire_train_loss", "gradwire_eval_accuracy",
        "gradwire_stragglers_total", "gradwire_straggler_wait_seconds_total",
        "gradwire_worker_restarts_total",
    } <= exposition.per_job  # fmt: skip


def test_dashboards_never_use_a_bare_job_label() -> None:
    """Queries, legends and variables of every dashboard name the gradwire job by job_id."""
    for stem, board in load_dashboards().items():
        text = json.dumps(board)
        assert not _VARIABLE_JOB.search(text), f"{stem}: uses a $job variable: {_VARIABLE_JOB.findall(text)}"
        for panel in iter_panels(board["panels"]):
            for target in panel.get("targets", []):
                where = f"{stem}/{panel['title']}/{target.get('refId')}"
                assert not bare_job_uses(target.get("expr", "")), f"{where}: uses `job` in {target['expr']!r}"
                legend = target.get("legendFormat", "")
                assert not _LEGEND_JOB.search(legend), f"{where}: legend {legend!r} shows {{{{job}}}}"
        for variable in board["templating"]["list"]:
            if variable.get("type") != "query":
                continue
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            for text in (query, variable.get("definition", "")):
                where = f"{stem}: variable {variable['name']}: {text!r}"
                values = re.fullmatch(r"\s*label_values\((?:(.*),)?\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*", text)
                assert values, f"{where} is not label_values(...)"
                assert values.group(2) != "job", f"{where} lists the `job` label"
                assert not bare_job_uses(values.group(1) or ""), f"{where} selects by `job`"


def test_rules_never_use_a_bare_job_label() -> None:
    """Recording rules group and name by job_id; alerts select, label and describe by job_id."""
    for name, expr in recording_rules().items():
        assert not bare_job_uses(expr), f"recording rule {name}: uses `job` in {expr!r}"
        level = name.split(":")[0]  # the labels kept, joined by "_"
        assert not re.match(r"job(?!_id(?:_|$))", level), f"recording rule {name}: its level names `job`"
    for group in rule_groups("alerts.yml"):
        for rule in group["rules"]:
            where = f"alert {rule['alert']}"
            assert not bare_job_uses(rule["expr"]), f"{where}: uses `job` in {rule['expr']!r}"
            assert "job" not in rule.get("labels", {}), f"{where}: sets a `job` label"
            for key, text in rule.get("annotations", {}).items():
                assert not _ANNOTATION_JOB.search(text), f"{where}: annotation {key} shows the `job` label"


def _series_labels(series: str) -> tuple[str, dict[str, str]]:
    match = _SERIES.match(series)
    assert match, f"not a series: {series!r}"
    return match.group(1), dict(_LABEL_PAIR.findall(match.group(2)))


def test_promtool_tests_label_jobs_by_job_id(exposition: Exposition) -> None:
    """deploy/prometheus/rules/tests.yml feeds per-job series as the coordinator exports them and
    Prometheus stores them: the gradwire job in job_id, `job` only ever the scrape job."""
    tests = yaml.safe_load((RULES / "tests.yml").read_text())["tests"]
    fed = 0
    for test in tests:
        for item in test.get("input_series", []):
            name, labels = _series_labels(item["series"])
            assert labels.get("job", SCRAPE_JOB) == SCRAPE_JOB, f"{item['series']}: job is no scrape job"
            if name in exposition.per_job:
                fed += 1
                assert JOB_LABEL in labels, f"{item['series']}: a per-job series without job_id"
        for case in test.get("promql_expr_test", []):
            assert not bare_job_uses(case["expr"]), case["expr"]
            for sample in case.get("exp_samples", []):
                _, labels = _series_labels(sample["labels"])
                assert labels.get("job", SCRAPE_JOB) == SCRAPE_JOB, sample["labels"]
        for case in test.get("alert_rule_test", []):
            for alert in case.get("exp_alerts") or []:
                job = alert.get("exp_labels", {}).get("job", SCRAPE_JOB)
                assert job == SCRAPE_JOB, f"{case['alertname']}: expects job={job!r}"
                for text in alert.get("exp_annotations", {}).values():
                    assert "{{" not in text, f"{case['alertname']}: an unexpanded template in {text!r}"
    assert fed, "tests.yml feeds no per-job series"
