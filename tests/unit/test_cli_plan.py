"""`gradwire plan`: one row per compressor on every example spec, and clear errors for nonsense."""

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gradwire.cli import app
from gradwire.cli.plan import DEFAULT_CONFIGS

SPECS = sorted(Path(__file__).resolve().parents[2].joinpath("examples/specs").glob("*.yaml"))


def plan(*args: str):
    return CliRunner().invoke(app, ["plan", *args])


def flat(output: str) -> str:
    """The output without rich's error box and line breaks (messages wrap at the box's width)."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", output).split())


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.stem)
def test_plan_predicts_a_row_per_compressor_on_every_example_spec(spec):
    result = plan(str(spec), "--bandwidth", "10Gbit", "--workers", "64", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    rows = report["rows"]
    labels = [r["compressor"] for r in rows]
    assert len(rows) >= len(DEFAULT_CONFIGS) and len(set(labels)) == len(labels)
    assert sum(r["spec"] for r in rows) == 1 and sum(r["best"] for r in rows) == 1
    none = next(r for r in rows if r["compressor"] == "none")
    assert none["bytes_per_step"] == 4 * report["inputs"]["parameters"]  # fp32, one all-reduce
    for row in rows:
        assert row["comm_ms"] > 0 and row["step_ms"] == pytest.approx(row["compute_ms"] + row["exposed_ms"])
        assert row["exposed_ms"] <= row["compress_ms"] + row["comm_ms"] + 1e-9
    # the example models are calibrated: no "unknown compute time" note
    assert not [n for n in report["notes"] if "compute time unknown" in n]


def test_plan_prints_a_table_with_the_best_marked():
    result = plan(str(SPECS[0]), "--bandwidth", "1Gbit", "--workers", "8", "--latency", "20us",
                  "--topology", "shared", "--compressors", "powersgd,topk:ratio=0.05")
    assert result.exit_code == 0, result.output
    assert "powersgd r=2" in result.output and "powersgd r=4" in result.output
    assert "topk 5% ef" in result.output and "best" in result.output


def test_slower_links_and_more_workers_cost_more():
    spec = str(next(s for s in SPECS if s.stem == "tiny-lm-powersgd"))

    def step_ms(*args: str) -> float:
        result = plan(spec, "--json", "--compressors", "none", "--compute-ms", "10", *args)
        assert result.exit_code == 0, result.output
        return json.loads(result.output)["rows"][0]["step_ms"]

    assert step_ms("--bandwidth", "100Mbit") > step_ms("--bandwidth", "10Gbit")
    many = step_ms("--bandwidth", "1Gbit", "--workers", "64")
    assert many > step_ms("--bandwidth", "1Gbit", "--workers", "2")
    shared = step_ms("--bandwidth", "1Gbit", "--workers", "8", "--topology", "shared")
    assert shared > step_ms("--bandwidth", "1Gbit", "--workers", "8")


@pytest.mark.parametrize(
    ("args", "option", "says"),
    [
        (["--bandwidth", "-1Gbit"], "--bandwidth", "negative"),
        (["--bandwidth=-1Gbit"], "--bandwidth", "negative"),
        (["--bandwidth", "0Gbit"], "--bandwidth", "positive"),
        (["--bandwidth", "10"], "--bandwidth", "unit"),
        (["--bandwidth", "fast"], "--bandwidth", "not understood"),
        (["--bandwidth", "1Gbit", "--workers", "0"], "--workers", "at least 1"),
        (["--bandwidth", "1Gbit", "--workers", "-3"], "--workers", "at least 1"),
        (["--bandwidth", "1Gbit", "--latency", "-5us"], "--latency", "negative"),
        (["--bandwidth", "1Gbit", "--topology", "ring"], "--topology", "switch, shared"),
        (["--bandwidth", "1Gbit", "--compressors", "zip"], "--compressors", "unknown compressor 'zip'"),
        (["--bandwidth", "1Gbit", "--compressors", "topk:ratio=2"], "--compressors", "ratio"),
        (["--bandwidth", "1Gbit", "--compute-ms", "-1"], "--compute-ms", ">= 0"),
    ],
)
def test_nonsense_is_refused_naming_the_option_and_value(args, option, says):
    result = plan(str(SPECS[0]), *args)
    assert result.exit_code == 2
    assert option in flat(result.output) and says in flat(result.output)


def test_a_bad_spec_gets_the_spec_loaders_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: Bad_Name\nmodel: {name: mlp}\ndata: {dataset: digits, batch_size: 0}\n"
                   "optimizer: {lr: 0.1}\nsteps: 10\n")
    result = plan(str(bad), "--bandwidth", "1Gbit")
    assert result.exit_code == 2
    assert "data.batch_size" in flat(result.output) and "DNS label" in flat(result.output)
    missing = plan(str(tmp_path / "nope.yaml"), "--bandwidth", "1Gbit")
    assert missing.exit_code == 2 and "nope.yaml" in missing.output


def test_an_unknown_model_is_a_clear_error(tmp_path):
    spec = tmp_path / "m.yaml"
    spec.write_text("name: m\nmodel: {name: resnet9000}\ndata: {dataset: digits, batch_size: 8}\n"
                    "optimizer: {lr: 0.1}\nsteps: 10\n")
    result = plan(str(spec), "--bandwidth", "1Gbit")
    assert result.exit_code == 2 and "resnet9000" in flat(result.output)


def test_measure_times_the_specs_model_here():
    spec = str(next(s for s in SPECS if s.stem == "digits-baseline"))
    result = plan(spec, "--bandwidth", "100Mbit", "--workers", "4", "--measure", "--json",
                  "--compressors", "none,topk", "--calibration", "/dev/null/none.json")
    assert result.exit_code == 2 and "--calibration" in flat(result.output)  # a missing file is refused
    result = plan(spec, "--bandwidth", "100Mbit", "--workers", "4", "--measure", "--json",
                  "--compressors", "none,topk")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["rows"]
    assert [r["compressor"] for r in rows] == ["none", "topk 1% ef"]
    assert all(r["compute_ms"] > 0 and r["compress_ms"] > 0 for r in rows)


def test_plan_of_a_onebit_adam_spec_prices_the_optimizer_s_compressor():
    # compression is none in such a spec: the optimizer sends each step through the 2-bit sign with EF
    spec = str(next(s for s in SPECS if s.stem == "tiny-lm-onebit-adam"))
    result = plan(spec, "--bandwidth", "100Mbit", "--measure", "--json")
    assert result.exit_code == 0, result.output
    found = json.loads(result.output)
    rows = {r["compressor"]: r for r in found["rows"]}
    own = next(r for r in found["rows"] if r.get("spec"))
    assert own["compressor"] == "sign 2-bit ef", own
    assert own["bytes_per_step"] * 10 < rows["none"]["bytes_per_step"]
    assert any("optimizer onebit_adam: plain all-reduce (bfloat16)" in note for note in found["notes"])
