"""Cost-model benchmark: fit α–β on shaped links, check predicted step times, predict at scale.

(a) Fit: in netlab (rate × topology × n = 2, 4) each rank times back-to-back gloo all-reduces and
    all-gathers; B per link and α per n are fitted to ``gradwire.cli.costmodel``'s ring formulas with the
    lab's tbf token bucket (its burst is known).
(b) Compute: linkrun's ``compute-only`` step in each lab (first and last run, pooled); compression: the
    reducer's step timed on all n ranks at once in that lab; one-process values for (d) and the
    calibration file. (c) Validation: ``benchmarks/linkrun.py``'s step times vs compute + the part of
    compression + α–β communication that backward does not hide (PASS within 15 %); model bytes vs
    linkrun's ledger. (d) Predictions for n = 8 … 1024 at 1/10/100 Gbit/s: which compressor wins where.

    python benchmarks/costmodel.py [--quick] [--out docs/benchmarks.md] \
        [--calibration gradwire/cli/calibration.json] [--json results.json] [--replay results.json]

Needs root (not ``--replay``: it refits and revalidates a ``--json`` file's labs). ``--quick`` (< 5 min):
digits CNN, 100 Mbit/s, switch. Full (< 20 min idle): 100 Mbit/s and 1 Gbit/s, both topologies, the LM
on the switch; ``--calibration``: every example spec.
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.costmodel_report import BEGIN, END, TARGET, machine, render  # noqa: E402
from benchmarks.netlab import Lab, parse_rate  # noqa: E402
from benchmarks.sections import write_section  # noqa: E402
from gradwire.cli.costmodel import (  # noqa: E402
    CompressTime,
    Link,
    collective_terms,
    config_label,
    ddp_buckets,
    model_key,
    numel,
    predict_step,
    step_traffic,
)
from gradwire.compressors.registry import parse_config  # noqa: E402

METHODS = {"none": ("none", {}), "fp16": ("fp16", {}), "powersgd:2": ("powersgd", {"rank": 2}),
           "topk:ef": ("topk", {"ratio": 0.01, "feedback": "ef"})}
SCALE_N, SCALE_RATES = (8, 32, 128, 1024), ("1gbit", "10gbit", "100gbit")
STORE_PORTS = 21000  # in the lab's fresh namespaces nothing else listens there
PROBE_SECONDS = 0.15  # largest probe collective: about this long at the nominal rate
TIMES = ("compute", "comm", "exposed", "step")
ONE_BUCKET = {"first_bucket_bytes": 1 << 30, "bucket_bytes": 1 << 30}  # linkrun.ONE_BUCKET_MB


# --- inside the lab: one process per rank ------------------------------------------------------


def rank_main(plan_path: Path) -> None:
    """Probe collectives, then run linkrun once per job of the plan (one model, its methods taking turns
    a few steps at a time, so that the compute-only floor and every method see the same load). Each
    job runs in a forked child (imports paid once) that ends with ``os._exit``: tearing down a finished
    run's DDP and process group in a process that goes on to start another one hangs in gloo's
    destructors."""
    import torch

    from benchmarks import linkrun

    plan = json.loads(plan_path.read_text())
    torch.set_num_threads(1)
    for model in {job["model"] for job in plan["jobs"]}:  # datasets cached in the parent
        name, params = linkrun.WORKLOADS[model]["dataset"]
        linkrun.get_dataset(name, seed=0, **params)
    _forked(lambda: _probe(plan, plan_path.parent))
    if plan.get("compress"):
        _forked(lambda: _compress(plan, plan_path.parent))
    for i, job in enumerate(plan["jobs"]):
        # a fresh store per job, on a port below the ephemeral range (gloo's own sockets take those)
        os.environ["MASTER_PORT"] = str(STORE_PORTS + i)
        argv = ["--model", job["model"], "--methods", ",".join(job["methods"]), "--steps", str(job["steps"]),
                "--warmup", str(job["warmup"]), "--turn", str(job["turn"]),
                "--out", str(plan_path.parent / f"job{i}.json")]
        _forked(lambda argv=argv: linkrun.main(argv))


def _forked(job: Any) -> None:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            job()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"a forked job failed with status {os.waitstatus_to_exitcode(status)}")


def _compress(plan: dict, folder: Path) -> None:
    """Compression times measured on all n ranks at once (no communication): what each step's
    compression costs while the other ranks compress on the same cores."""
    from gradwire.cli.plan import measure_compress

    out: dict[str, dict] = {}
    for model in plan["compress"]:
        shapes = workload(model)["shapes"]
        for method in METHODS:
            got = measure_compress(shapes, *METHODS[method], steps=plan["compress_steps"])
            out[f"{model} {method}"] = {"base_s": got.base_s, "per_rank_s": got.per_rank_s}
    (folder / f"compress{os.environ['RANK']}.json").write_text(json.dumps(out))


def _probe(plan: dict, folder: Path) -> None:
    """Median seconds of back-to-back all-reduces and all-gathers of each size (rank 0 writes them)."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=dt.timedelta(seconds=300))
    world, rows = dist.get_world_size(), []
    for kind, sizes in plan["probe"].items():
        for nbytes in sizes:
            x = torch.ones(nbytes // 4)
            out = torch.empty(world * x.numel())
            op = (lambda x=x: dist.all_reduce(x)) if kind == "all_reduce" else (
                lambda x=x, out=out: dist.all_gather_into_tensor(out, x))
            op()
            dist.barrier()
            times = []
            for _ in range(plan["reps"]):
                started = time.perf_counter()
                op()
                times.append(time.perf_counter() - started)
            low = statistics.quantiles(times, n=4)[0]  # undisturbed by other work on the cores
            rows.append({"kind": kind, "nbytes": nbytes, "seconds": statistics.median(times), "low": low})
    dist.destroy_process_group()
    if os.environ["RANK"] == "0":
        (folder / "probe.json").write_text(json.dumps(rows))


def probe_sizes(rate: str | None, n: int, topology: str) -> dict[str, list[int]]:
    """Message sizes up to about PROBE_SECONDS at the nominal rate (8 MiB unshaped)."""

    bits = parse_rate(rate)
    out = {}
    for kind in ("all_reduce", "all_gather"):
        _, per_byte = collective_terms(kind, 1.0, n, topology)
        top = 8 << 20 if bits is None else min(8 << 20, int(PROBE_SECONDS * bits / 8 / per_byte))
        out[kind] = sorted({max(1024, int(top / 4**i)) // 4 * 4 for i in range(5)})
    return out


def run_lab(rate: str | None, topology: str, n: int, jobs: list[dict], tmp: Path, reps: int = 9) -> dict:
    """Probes, compression times and the jobs' linkrun runs in one lab (``runs``: one record per method)."""
    folder = tmp / f"{rate}-{topology}-{n}"
    folder.mkdir()
    models = sorted({job["model"] for job in jobs})
    plan = {"probe": probe_sizes(rate, n, topology), "reps": reps, "jobs": jobs, "compress": models,
            "compress_steps": 5}
    (folder / "plan.json").write_text(json.dumps(plan))
    started = time.perf_counter()
    with Lab(workers=n, rate=rate, topology=topology) as lab:
        burst = 0 if lab.shape is None else lab.shape.burst_bytes
        lab.run_ranks([sys.executable, str(Path(__file__).resolve()), "--rank", str(folder / "plan.json")],
                      timeout=900)
    results = [run for i in range(len(jobs))
               for run in json.loads((folder / f"job{i}.json").read_text())["runs"]]  # fmt: skip
    ranks = [json.loads((folder / f"compress{r}.json").read_text()) for r in range(n)] if jobs else [{}]
    compress = {k: {f: max(c[k][f] for c in ranks) for f in ("base_s", "per_rank_s")} for k in ranks[0]}
    print(f"  {rate or 'unshaped'} {topology} n={n}: {time.perf_counter() - started:.0f} s", flush=True)
    return {"rate": rate, "topology": topology, "n": n, "burst": burst,
            "probe": json.loads((folder / "probe.json").read_text()), "runs": results, "compress": compress}


# --- fitting -----------------------------------------------------------------------------------


def fit_link(labs: list[dict], field: str = "seconds") -> dict[str, Any]:
    """B (bytes/s, one per link) and α per n that best explain the probes of these labs (one rate and
    topology). α is fitted per n because here n ranks share 2 cores: a message waits longer for its
    receiver to be scheduled at n = 4 than at n = 2."""
    import numpy as np
    from scipy.optimize import least_squares

    ns = sorted({lab["n"] for lab in labs})
    points = [(lab["n"], lab["topology"], lab["burst"], row) for lab in labs for row in lab["probe"]]

    def predicted(theta) -> np.ndarray:
        bandwidth, alphas = math.exp(theta[0]), dict(zip(ns, np.exp(theta[1:])))
        out = []
        for n, topology, burst, row in points:
            steps, volume = collective_terms(row["kind"], row["nbytes"], n, topology)
            latency = steps * alphas[n]
            out.append(latency + max(0.0, volume - min(burst, bandwidth * latency)) / bandwidth)
        return np.array(out)

    measured = np.array([row[field] for *_, row in points])
    # log residuals (relative errors), with a robust loss: a few probes delayed by other work on the
    # cores must not pull the fit
    fit = least_squares(lambda th: np.log(predicted(th) / measured),
                        x0=[math.log(1e8)] + [math.log(1e-4)] * len(ns), loss="soft_l1", f_scale=0.2)
    errors = predicted(fit.x) / measured - 1
    return {"alpha_s": {n: float(math.exp(a)) for n, a in zip(ns, fit.x[1:])},
            "bandwidth": math.exp(fit.x[0]), "rms_error": float(np.sqrt(np.mean(errors**2))),
            "points": len(points)}


# --- the workloads and their one-process measurements -------------------------------------------


def workload(name: str) -> dict[str, Any]:
    """linkrun's workload: shapes, data and model (built as linkrun builds it)."""
    import torch

    from benchmarks import linkrun
    from gradwire.worker.datasets import get_dataset
    from gradwire.worker.models import build_model

    work = linkrun.WORKLOADS[name]
    data = get_dataset(work["dataset"][0], seed=0, **work["dataset"][1])
    torch.manual_seed(0)
    factory, params = work["model"]  # a registry name, or a module class of linkrun's
    build = (lambda *a, **k: build_model(factory, *a, **k)) if isinstance(factory, str) else factory
    model = build(data.num_features, data.num_classes, **params)
    opt_name, lr = work["optimizer"]
    opt = (torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9) if opt_name == "sgd"
           else torch.optim.Adam(model.parameters(), lr=lr))  # fmt: skip
    key = model_key(getattr(factory, "__name__", factory), params, work["dataset"][0], work["dataset"][1], 32)
    return {"name": name, "key": key, "data": data, "model": model, "optimizer": opt,
            "shapes": [tuple(p.shape) for p in model.parameters()]}


def calibrate(shapes: list, model: Any, x: Any, y: Any, opt: Any, configs: list[tuple[str, dict]],
              steps: int) -> dict[str, Any]:
    """Uncontended compute and per-configuration compression times of one model (one process)."""
    import torch

    from gradwire.cli.plan import measure_compress, measure_compute

    torch.set_num_threads(1)
    entry: dict[str, Any] = {"elements": sum(map(numel, shapes)), "tensors": len(shapes), "compress": {}}
    if model is not None:
        compute, windows = measure_compute(model, x, y, opt, steps)
        entry.update(compute_ms=compute * 1e3, windows=windows)
    for name, params in configs:
        got = measure_compress(shapes, name, params, steps)
        label = config_label(parse_config(name, params))
        entry["compress"][label] = {"compress_ms": got.base_s * 1e3, "per_rank_ms": got.per_rank_s * 1e3}
    return entry


def example_models(configs: list[tuple[str, dict]], steps: int) -> dict[str, dict]:
    """Calibration entries of every example spec's model (its own compressor included)."""
    from gradwire.spec import JobSpec
    from gradwire.worker.models import build_model
    from gradwire.worker.runtime import load_data, make_optimizer

    out: dict[str, dict] = {}
    for path in sorted(glob.glob(str(ROOT / "examples/specs/*.yaml"))):
        spec = JobSpec.from_file(path)
        key = model_key(spec.model.name, spec.model.params, spec.data.dataset, spec.data.params,
                        spec.data.batch_size)
        own = (spec.compression.name, spec.compression.params())
        if key in out:  # the same model in another spec: add its compressor if new
            if config_label(spec.compressor_config()) not in out[key]["compress"]:
                extra = calibrate(out[key]["shapes"], None, None, None, None, [own], steps)
                out[key]["compress"].update(extra["compress"])
            continue
        data = load_data(spec)
        model = build_model(spec.model.name, data.num_features, data.num_classes, **spec.model.params)
        b = spec.data.batch_size
        shapes = [tuple(p.shape) for p in model.parameters()]
        entry = calibrate(shapes, model, data.x_train[:b], data.y_train[:b],
                          make_optimizer(spec.optimizer, model.parameters()), [*configs, own], steps)
        out[key] = {"spec": spec.name, "shapes": shapes, **entry}
    return out


def fit_rates(models: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Per compressor name: compress_ms ≈ call_ms + ns_per_element·d over the calibrated models."""
    import numpy as np

    rates: dict[str, dict[str, float]] = {}
    by_name: dict[str, list[tuple[float, float, float]]] = {}
    for entry in models.values():
        for label, got in entry["compress"].items():
            by_name.setdefault(label.split()[0], []).append(
                (entry["elements"], got["compress_ms"], got["per_rank_ms"]))
    for name, rows in by_name.items():
        d, ms, per_rank = (np.array(col, dtype=float) for col in zip(*rows))
        slope, call = np.polyfit(d, ms, 1) if len(set(d)) > 1 else (0.0, float(ms.mean()))
        rates[name] = {"call_ms": max(0.0, float(call)), "ns_per_element": max(0.0, float(slope)) * 1e6,
                       "per_rank_ns_per_element": float(np.median(per_rank / d)) * 1e6}
    return rates


# --- validation and predictions ------------------------------------------------------------------


def _predict_run(lab: dict, run: dict, works: dict[str, dict], link: Any) -> tuple[Any, float]:
    """(prediction, compression seconds) of one linkrun run in its lab: compute is the lab's own
    ``compute-only`` steps of that model (taken in turn with the methods), compression what the n ranks
    measured at once; the one bucket is handed over when backward ends and, with no spare core,
    compression cannot hide behind it."""
    n = lab["n"]
    floor = [t for r in lab["runs"] if r["method"] == "compute-only" and r["model"] == run["model"]
             for t in r["step_seconds"]]  # fmt: skip
    c = lab["compress"][f"{run['model']} {run['method']}"]
    compress = CompressTime(c["base_s"], c["per_rank_s"]).seconds(n)
    traffic = step_traffic(ddp_buckets(works[run["model"]]["shapes"], **ONE_BUCKET),
                           parse_config(*METHODS[run["method"]]))
    got = predict_step(traffic, n, link, statistics.median(floor), compress, None, spare_cores=False)
    return got, compress


def fit_step_alpha(labs: list[dict], fits: dict, works: dict[str, dict]) -> dict[int, float]:
    """α per n as training steps see it, from these labs' linkrun runs: per run, (measured step −
    compute − compression − transfer time, with the lab's B and burst) / messages per step; the median
    over all runs with that n. With n ranks on 2 cores a message often waits for its receiver to be
    scheduled, which back-to-back probes (all ranks idle but for the collective) do not show."""
    estimates: dict[int, list[float]] = {}
    for lab in labs:
        fit = fits[(lab["rate"], lab["topology"])]
        zero, unit = (Link(fit["bandwidth"], a, lab["topology"], lab["burst"]) for a in (0.0, 1.0))
        for run in lab["runs"]:
            if run["method"] not in METHODS:
                continue
            base, _ = _predict_run(lab, run, works, zero)
            per, _ = _predict_run(lab, run, works, unit)
            excess = statistics.median(run["step_seconds"]) - base.step_s
            estimates.setdefault(lab["n"], []).append(excess / per.latency_s)
    return {n: max(0.0, statistics.median(e)) for n, e in estimates.items()}


def validate_held_out(labs: list[dict], fits: dict, works: dict[str, dict]) -> tuple[list[dict], dict]:
    """Every shaped lab's runs predicted with α fitted on every *other* lab's runs of the same n
    (leave one lab out: a lab's own step times never enter its prediction). Returns the rows and the
    α each lab got, by (rate, topology, n)."""
    rows, used = [], {}
    for lab in labs:
        if lab["rate"] is None or not lab["runs"]:
            continue
        others = [o for o in labs if o is not lab and o["runs"]]
        alpha = fit_step_alpha(others, fits, works).get(lab["n"])
        used[(lab["rate"], lab["topology"], lab["n"])] = alpha
        rows += validate([lab], fits, works, None if alpha is None else {lab["n"]: alpha})
    return rows, used


def validate(labs: list[dict], fits: dict, works: dict[str, dict],
             step_alpha: dict[int, float] | None = None) -> list[dict]:
    """Predicted vs measured step of every run in these labs: B and the tbf burst from the lab's
    probes, α from ``step_alpha`` (per n, fitted on training steps) where given, else the lab's probes."""
    rows = []
    for lab in labs:
        n, fit = lab["n"], fits[(lab["rate"], lab["topology"])]
        alpha = (step_alpha or {}).get(n, fit["alpha_s"][n])
        link = Link(fit["bandwidth"], alpha, lab["topology"], lab["burst"])
        for run in lab["runs"]:
            if run["method"] not in METHODS:
                continue
            got, compress = _predict_run(lab, run, works, link)
            measured = statistics.median(run["step_seconds"])
            error = got.step_s / measured - 1
            rows.append({"model": run["model"], "n": n, "rate": lab["rate"], "topology": lab["topology"],
                         "method": run["method"], "measured_ms": measured * 1e3, "error": error,
                         "pass": abs(error) <= TARGET, "model_bytes": got.payload_bytes,
                         "ledger_bytes": run["bytes_per_step"], "compress_ms": compress * 1e3,
                         **{f"{k}_ms": getattr(got, f"{k}_s") * 1e3 for k in TIMES}})
    return rows


def predictions(work: dict, entry: dict, alpha: float, efficiency: float) -> list[dict]:
    from gradwire.cli.plan import DEFAULT_CONFIGS

    rows = []
    buckets = ddp_buckets(work["shapes"])
    for rate in SCALE_RATES:
        link = Link(parse_rate(rate) / 8 * efficiency, alpha)
        for n in SCALE_N:
            row: dict[str, Any] = {"rate": rate, "n": n, "ms": {}}
            for name, params in DEFAULT_CONFIGS:
                label = config_label(parse_config(name, params))
                c = entry["compress"][label]
                compress = CompressTime(c["compress_ms"] / 1e3, c["per_rank_ms"] / 1e3).seconds(n)
                traffic = step_traffic(buckets, parse_config(name, params))
                compute = entry["compute_ms"] / 1e3
                windows = [f * compute for f in entry["windows"]]
                got = predict_step(traffic, n, link, compute, compress, windows)
                row["ms"][label] = got.step_s * 1e3
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits CNN, switch topology, fewer steps")
    parser.add_argument("--out", type=Path, default=None, help="write the section into this markdown file")
    parser.add_argument("--calibration", type=Path, default=None, help="write the calibration file here")
    parser.add_argument("--json", type=Path, default=None, help="write every measurement here")
    parser.add_argument("--replay", type=Path, default=None, help="reuse the labs of an earlier --json")
    parser.add_argument("--rank", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank is not None:
        return rank_main(args.rank)
    if args.replay is not None and not args.replay.is_file():
        parser.error(f"--replay {args.replay}: no such file")
    try:
        saved = json.loads(args.replay.read_text()) if args.replay else {"labs": [], "measured": None}
    except ValueError as err:
        parser.error(f"--replay {args.replay}: not JSON ({err})")
    if not isinstance(saved, dict) or not {"labs", "measured"} <= saved.keys():
        parser.error(f"--replay {args.replay}: not a --json file of this benchmark (no labs or 'measured')")
    from gradwire.cli.plan import DEFAULT_CONFIGS

    started, load_before = time.perf_counter(), os.getloadavg()[0]
    rates = ["100mbit"] if args.quick else ["100mbit", "1gbit"]
    topologies = ["switch"] if args.quick else ["switch", "shared"]
    steps, warmup = (4, 2) if args.quick else (16, 2)  # PowerSGD: 2 plain steps (linkrun --psgd-start)
    labs, args.measured = saved["labs"], saved["measured"]
    # compute-only and every method of a model in one job, taking turns 2 steps at a time
    methods = ["compute-only", *METHODS]
    with tempfile.TemporaryDirectory(prefix="costmodel-") as tmp:
        for n in () if args.replay else (2, 4):
            # unshaped: probes (α, B) and the digits CNN's runs (α as training steps see it)
            jobs = [{"model": "digits_cnn", "methods": methods, "steps": steps, "warmup": warmup, "turn": 2}]
            labs.append(run_lab(None, "switch", n, jobs, Path(tmp), reps=25))
            for rate in rates:
                for topology in topologies:
                    # the LM on the switch only (time)
                    models = ["digits_cnn"] + (["tiny_lm"] if topology == "switch" and not args.quick else [])
                    jobs = [{"model": m, "methods": methods, "steps": steps, "warmup": warmup, "turn": 2}
                            for m in models]
                    labs.append(run_lab(rate, topology, n, jobs, Path(tmp)))
    settings = sorted({(lab["rate"], lab["topology"]) for lab in labs}, key=lambda s: (s[0] or "", s[1]))
    fits = {s: fit_link([lab for lab in labs if (lab["rate"], lab["topology"]) == s]) for s in settings}
    works = {m: workload(m) for m in ["digits_cnn", "tiny_lm"]}

    shaped = [f["bandwidth"] * 8 / parse_rate(r) for (r, _), f in fits.items() if r is not None]
    # α for plan: two ranks, unshaped, each probe's lower quartile (what the machine does when not disturbed)
    alpha = fit_link([lab for lab in labs if lab["rate"] is None and lab["n"] == 2], "low")["alpha_s"][2]
    cal = {"latency_s": alpha, "efficiency": statistics.median(shaped)}
    cal_models = {}
    for name, w in works.items():
        x, y = w["data"].x_train[:32], w["data"].y_train[:32]
        entry = calibrate(w["shapes"], w["model"], x, y, w["optimizer"], DEFAULT_CONFIGS, 10)
        cal_models[w["key"]] = {"spec": f"linkrun {name}", "shapes": w["shapes"], **entry}
    rows, held_out = validate_held_out(labs, fits, works)
    shaped = [lab for lab in labs if lab["runs"] and lab["rate"] is not None]
    unshaped_alpha = fit_step_alpha([lab for lab in labs if lab["runs"] and lab["rate"] is None], fits, works)
    step_alpha = {"held_out": held_out, "unshaped": unshaped_alpha,
                  "unshaped_passed": sum(r["pass"] for r in validate(shaped, fits, works, unshaped_alpha))}
    scale = {f"{name} ({sum(map(numel, w['shapes'])):,} parameters)":
             predictions(w, cal_models[w["key"]], cal["latency_s"], cal["efficiency"])
             for name, w in works.items()}
    if args.calibration is not None:
        cal_models.update(example_models(DEFAULT_CONFIGS, 5))
        for entry in cal_models.values():
            entry.pop("shapes", None)
        cal.update(models=cal_models, rates=fit_rates(cal_models), source=f"benchmarks/costmodel.py, "
                   f"{dt.date.today().isoformat()}, {machine()}")
        args.calibration.write_text(json.dumps(cal, indent=1, sort_keys=True) + "\n")
        print(f"wrote {args.calibration}")
    if not args.replay:
        args.measured = {"finished": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                         "seconds": time.perf_counter() - started, "loads": [load_before, os.getloadavg()[0]]}
    section = render(args, fits, rows, scale, cal, args.measured["seconds"], args.measured["loads"],
                     step_alpha)
    print(section)
    if args.json is not None:
        args.json.write_text(json.dumps({"labs": labs, "validation": rows, "measured": args.measured,
                                         "step_alpha_s": {"unshaped": unshaped_alpha,
                                                          "held_out": {"/".join(map(str, k)): v
                                                                       for k, v in held_out.items()}},
                                         "fits": {f"{r}/{t}": f for (r, t), f in fits.items()}}, indent=1))
    if args.out is not None:
        write_section(args.out, section, BEGIN, END)
        print(f"wrote {args.out}")
    print(f"validation: {sum(r['pass'] for r in rows)} of {len(rows)} within {TARGET:.0%}")


if __name__ == "__main__":
    main()
