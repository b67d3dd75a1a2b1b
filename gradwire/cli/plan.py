"""`gradwire plan SPEC`: predicted step time and bytes of each compressor on a given cluster.

The spec is loaded as `gradwire train` loads it and its model is built to read the parameter shapes;
the cost model (:mod:`gradwire.compressors.costmodel`) turns shapes, compressor, workers and link into
bytes and seconds. Compute and compression times come from ``--compute-ms``, from ``--measure`` (a few
steps on this machine), or from the calibration file measured by ``benchmarks/costmodel.py`` (docs/plan.md).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from gradwire.cli.costmodel import Calibration, model_key, parse_bandwidth, parse_latency
from gradwire.cli.extras import command_needs
from gradwire.compressors.costmodel import (
    CompressTime,
    Link,
    UnmodelledCompressorError,
    config_label,
    ddp_bucket_indices,
    ddp_buckets,
    numel,
    predict_step,
    step_traffic,
)

#: the configurations every plan compares (besides the spec's own): registry name and parameters
DEFAULT_CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("none", {}),
    ("fp16", {}),
    ("bf16", {}),
    ("powersgd", {"rank": 2}),
    ("powersgd", {"rank": 4}),
    ("topk", {"ratio": 0.01, "feedback": "ef"}),
    ("randk", {"ratio": 0.01, "feedback": "ef"}),
    ("qsgd", {}),
    ("sign", {"feedback": "ef"}),
]


def _bad(option: str, message: str) -> typer.BadParameter:
    return typer.BadParameter(message, param_hint=f"'{option}'")


def parse_compressors(text: str) -> list[tuple[str, dict[str, Any]]]:
    """``"powersgd,topk:ratio=0.05:feedback=ef21"`` -> configurations. A bare name selects every default
    configuration of that compressor (or its registry defaults if none); ``name:key=value...`` one."""
    import yaml

    from gradwire.compressors.registry import available

    chosen: list[tuple[str, dict[str, Any]]] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            raise ValueError(f"empty compressor name in {text!r}")
        name, *assignments = item.split(":")
        if name not in available():
            raise ValueError(f"unknown compressor {name!r}; available: {', '.join(available())}")
        if not assignments:
            chosen += [c for c in DEFAULT_CONFIGS if c[0] == name] or [(name, {})]
            continue
        params: dict[str, Any] = {}
        for assignment in assignments:
            key, sep, value = assignment.partition("=")
            if not sep or not key:
                raise ValueError(f"{item!r}: write parameters as name:key=value:key=value")
            params[key.strip()] = yaml.safe_load(value)
        chosen.append((name, params))
    return chosen


# --- measurements on this machine (--measure, and benchmarks/costmodel.py's calibration) -------------


def measure_compute(
    model: Any, x: Any, y: Any, optimizer: Any = None, steps: int = 5
) -> tuple[float, list[float]]:
    """Median seconds of forward + backward (+ the optimizer step) on one process, after 2 warm-ups, and
    per DDP bucket the fraction of that time still to come in backward when the bucket is ready (what
    the hook's work on it can hide behind)."""
    from gradwire.worker.steps import loss_fn

    params = [p for p in model.parameters() if p.requires_grad]
    buckets = ddp_bucket_indices([tuple(p.shape) for p in params])
    ready: dict[int, float] = {}
    hooks = [p.register_post_accumulate_grad_hook(lambda _, i=i: ready.__setitem__(i, time.perf_counter()))
             for i, p in enumerate(params)]
    times, windows = [], []
    try:
        for i in range(steps + 2):
            ready.clear()
            started = time.perf_counter()
            model.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            backward_end = time.perf_counter()
            if optimizer is not None:
                optimizer.step()
            if i >= 2:
                times.append(time.perf_counter() - started)
                windows.append([backward_end - max(ready.get(j, backward_end) for j in b) for b in buckets])
    finally:
        for hook in hooks:
            hook.remove()
    compute = statistics.median(times)
    return compute, [statistics.median(w[b] for w in windows) / compute for b in range(len(buckets))]


def measure_compress(
    shapes: list[tuple[int, ...]], name: str, params: dict[str, Any], steps: int = 5, ranks: int = 8
) -> CompressTime:
    """Compression seconds per step of one configuration, measured in this process (one rank): the
    reducer's step over DDP's buckets of random gradients, and for all-gather compressors the extra
    cost of decoding each further rank's payloads (``decode_mean`` over ``ranks`` payloads vs one)."""
    import torch

    from gradwire.compressors import make_reducer
    from gradwire.compressors.compressor import ElementwiseCompressor

    reducer = make_reducer(name, **params)
    buckets = ddp_buckets(shapes)
    gen = torch.Generator().manual_seed(0)
    grads = [[torch.randn(s, generator=gen) for s in bucket] for bucket in buckets]
    flats = [torch.cat([g.reshape(-1) for g in bucket]) for bucket in grads]
    warm = max(reducer.config.start_iter, 1) + 2
    times = []
    for i in range(warm + steps):
        started, key = time.perf_counter(), 0
        for j, bucket in enumerate(grads):
            last = j == len(grads) - 1
            if reducer.passthrough:  # what the DDP hook runs for 'none': the bucket as it is
                reducer.reduce_flat_async(flats[j], advance=last).wait()
            else:
                reducer.reduce(bucket, keys=list(range(key, key + len(bucket))), advance=last)
            key += len(bucket)
        if i >= warm:
            times.append(time.perf_counter() - started)
    per_rank = 0.0
    compressor = reducer.compressor
    if isinstance(compressor, ElementwiseCompressor) and compressor.collective == "all_gather":
        chosen = [g.reshape(-1) for bucket in grads for g in bucket
                  if compressor.should_compress(g, reducer.config.min_compression_rate)]
        payloads = [compressor.encode(g, 0, 0) for g in chosen]

        def decode(copies: int) -> float:
            started = time.perf_counter()
            for g, p in zip(chosen, payloads):
                compressor.decode_mean(p.unsqueeze(0).expand(copies, -1).contiguous(), g, 0, 0)
            return time.perf_counter() - started

        one = statistics.median(decode(1) for _ in range(3))
        many = statistics.median(decode(ranks) for _ in range(3))
        per_rank = max(0.0, (many - one) / (ranks - 1))
    return CompressTime(statistics.median(times), per_rank)


# --- the command ---------------------------------------------------------------------------------


def _load(spec_path: Path, workers: int | None) -> tuple[Any, Any, list[tuple[int, ...]], Any]:
    """Spec, data, parameter shapes and model (exits 2 on spec, data or model problems)."""
    from gradwire.spec import JobSpec, SpecError

    try:
        spec = JobSpec.from_file(spec_path)
        if workers is not None:
            spec = spec.with_overrides([f"workers.count={workers}"])
    except (SpecError, OSError) as err:
        typer.echo(f"{spec_path}: {err}", err=True)
        raise typer.Exit(2) from None

    with command_needs("gradwire plan", "train", ("torch", "numpy", "google.protobuf")):
        import torch

        from gradwire.worker.models import build_model
        from gradwire.worker.runtime import load_data

    try:
        data = load_data(spec)
        torch.manual_seed(spec.seed)
        model = build_model(spec.model.name, data.num_features, data.num_classes,
                            allow_import_paths=True, **spec.model.params)
    except (KeyError, ValueError, TypeError, ImportError, PermissionError) as err:
        typer.echo(f"{spec_path}: cannot build the spec's data or model: {err}", err=True)
        raise typer.Exit(2) from None
    shapes = [tuple(p.shape) for p in model.parameters() if p.requires_grad]
    return spec, data, shapes, model


def plan(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="job spec (.yaml, .yml or .json)")],
    bandwidth: Annotated[
        str, typer.Option(help="link bandwidth per host: 100Mbit, 1Gbit, 10gbit, 1.5Gbit/s")
    ],
    workers: Annotated[
        int | None, typer.Option(help="data-parallel workers (default: the spec's workers.count)")
    ] = None,
    latency: Annotated[
        str | None, typer.Option(help="α, one message's latency, e.g. 20us (default: this machine's)")
    ] = None,
    topology: Annotated[
        str, typer.Option(help="switch: a full-duplex link per host; shared: one link for all")
    ] = "switch",
    compressors: Annotated[
        str | None,
        typer.Option(help="compare only these: names (powersgd,topk) or name:key=value (powersgd:rank=8)"),
    ] = None,
    compute_ms: Annotated[
        float | None, typer.Option(help="forward+backward+optimizer ms per step on one worker")
    ] = None,
    measure: Annotated[
        bool, typer.Option("--measure", help="measure compute and compression here (a few steps)")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    calibration: Annotated[
        Path | None, typer.Option(help="calibration file (default: gradwire/cli/calibration.json)")
    ] = None,
) -> None:
    """Predict the step time and bytes sent of each compressor for SPEC on a cluster."""
    try:
        bytes_per_s = parse_bandwidth(bandwidth)
    except ValueError as err:
        raise _bad("--bandwidth", str(err)) from None
    try:
        alpha = None if latency is None else parse_latency(latency)
    except ValueError as err:
        raise _bad("--latency", str(err)) from None
    if workers is not None and workers < 1:
        raise _bad("--workers", f"workers={workers}: need at least 1 worker")
    if topology not in ("switch", "shared"):
        raise _bad("--topology", f"topology {topology!r} is not one of: switch, shared")
    if compute_ms is not None and not compute_ms >= 0:
        raise _bad("--compute-ms", f"compute time {compute_ms!r} ms must be >= 0")
    try:
        chosen = parse_compressors(compressors) if compressors else None
    except ValueError as err:
        raise _bad("--compressors", str(err)) from None
    if calibration is not None and not calibration.is_file():
        raise _bad("--calibration", f"no calibration file at {calibration}")

    from pydantic import ValidationError

    from gradwire.compressors.registry import parse_config

    configs = []
    for name, params in chosen or DEFAULT_CONFIGS:
        try:
            configs.append(parse_config(name, params))
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
            raise _bad("--compressors", f"{name} {params}: {problems}") from None

    spec, data, shapes, model = _load(spec_path, workers)
    n = spec.workers.count
    own = spec.compressor_config()
    onebit = spec.optimizer.name == "onebit_adam"
    if onebit:  # the optimizer compresses each step itself (compression is none): price its compressor
        params = {**spec.optimizer.onebit_compressor_params(), "feedback": "ef"}
        own = parse_config(spec.optimizer.onebit_compressor(), params)
    choosing = own.registry_name() == "auto"  # chosen at run time: compare its candidates instead
    if choosing:
        # under Adam auto leaves some candidates out whatever their guard says
        candidates = [c for c in own.candidates if own.optimizer_allows(c)]  # type: ignore[attr-defined]
        first = [parse_config(*own.candidate_params(c)) for c in candidates]  # type: ignore[attr-defined]
        if chosen is None:  # its candidates first, then the other defaults
            labels = {config_label(c) for c in first}
            configs = first + [c for c in configs if config_label(c) not in labels]
    elif chosen is None or own.registry_name() in {c.registry_name() for c in configs}:
        configs = [own, *[c for c in configs if config_label(c) != config_label(own)]]  # own replaces
    cal = Calibration.load(calibration)
    key = model_key(spec.model.name, spec.model.params, spec.data.dataset, spec.data.params,
                    spec.data.batch_size)
    link = Link(bytes_per_s * cal.efficiency, cal.latency_s if alpha is None else alpha, topology)
    notes: list[str] = []
    if onebit:
        dtype = spec.optimizer.onebit_warmup_dtype()
        notes.append(f"optimizer onebit_adam: plain all-reduce ({dtype}) for its first freeze_step steps, "
                     f"then each step's update through {config_label(own)} with error feedback "
                     "(the spec's row)")
    if choosing:
        notes.append(f"compression: auto measures the link and the step at run time and runs the fastest of "
                     f"{', '.join(candidates)} whose quality guard holds (docs/compressors.md)")
        penalised = [c for c in candidates if own.steps_factor(c) != 1.0]  # type: ignore[attr-defined]
        if penalised:
            factor = own.steps_factor(penalised[0])  # type: ignore[attr-defined]
            notes.append(f"under {spec.optimizer.name} auto prices {', '.join(penalised)} at {factor:g}× the "
                         "step time below, for the extra steps they need to the same accuracy")

    if compute_ms is not None:
        compute_s: float | None = compute_ms / 1e3
    elif measure:
        from gradwire.worker.runtime import make_optimizer

        batch = spec.data.batch_size
        # onebit_adam's compute is Adam's (its compression is priced as the spec's row, not measured here)
        stand_in = spec.optimizer.model_copy(update={"name": "adam"}) if onebit else spec.optimizer
        compute_s, fractions = measure_compute(model, data.x_train[:batch], data.y_train[:batch],
                                               make_optimizer(stand_in, model.parameters()))
        windows: list[float] | None = [f * compute_s for f in fractions]
    else:
        compute_s = cal.compute_s(key)
    if compute_ms is not None or not measure:
        windows = cal.windows(key, compute_s) if compute_s is not None else None
    if compute_s is None:
        notes.append("compute time unknown for this model: pass --compute-ms or --measure (counted as 0)")
    elif windows is None:
        notes.append("when backward hands each bucket over is not known (--measure measures it): no "
                     "overlap of communication with backward assumed")
    if spec.stragglers is not None:
        notes.append(f"stragglers.code={spec.stragglers.code}: modelled as a plain DDP step (no code)")

    elements, uncalibrated = sum(numel(s) for s in shapes), []
    buckets = ddp_buckets(shapes)
    rows = []
    for config in [parse_config("none"), *configs]:
        label = config_label(config)
        try:
            traffic = step_traffic(buckets, config)
        except UnmodelledCompressorError as err:
            notes.append(str(err))
            continue
        if measure:
            params = config.model_dump(exclude_defaults=True)
            compress = measure_compress(shapes, config.registry_name(), params)
        else:
            compress = cal.compress_time(key, config, elements)
            if compress is None:
                uncalibrated.append(label)
                compress = CompressTime(0.0)
        got = predict_step(traffic, n, link, compute_s or 0.0, compress.seconds(n), windows)
        rows.append({
            "compressor": label, "spec": config == own, "step_ms": got.step_s * 1e3,
            "compute_ms": got.compute_s * 1e3, "compress_ms": got.compress_s * 1e3,
            "comm_ms": got.comm_s * 1e3, "exposed_ms": got.exposed_s * 1e3,
            "bytes_per_step": got.payload_bytes, "wire_bytes_per_step": got.wire_bytes,
            "config": config.model_dump(mode="json"),
        })  # fmt: skip
    if uncalibrated:
        notes.append(f"no compression time calibrated for {', '.join(dict.fromkeys(uncalibrated))} "
                     "(counted as 0; --measure measures it)")
    baseline, rows = rows[0], rows[1:]
    for row in rows:
        row["speedup_vs_none"] = baseline["step_ms"] / row["step_ms"] if row["step_ms"] > 0 else None
    best = min(rows, key=lambda r: r["step_ms"]) if rows else None
    for row in rows:
        row["best"] = row is best
    if choosing:  # the spec's row: what auto would run on this link if the quality guard holds for it
        priced = []  # auto compares step × steps_factor (under Adam PowerSGD pays for its extra steps)
        for label, config in zip(candidates, first):
            row = next((r for r in rows if r["config"] == config.model_dump(mode="json")), None)
            if row is not None:
                priced.append((row["step_ms"] * own.steps_factor(label), row))  # type: ignore[attr-defined]
        if priced:
            min(priced, key=lambda found: found[0])[1]["spec"] = True
    inputs = {
        "spec": str(spec_path), "workers": n, "bandwidth_bytes_per_s": bytes_per_s,
        "goodput_fraction": cal.efficiency, "latency_s": link.latency, "topology": topology,
        "parameters": elements, "buckets": len(buckets), "calibration": cal.source,
    }  # fmt: skip
    if as_json:
        typer.echo(json.dumps({"inputs": inputs, "rows": rows, "notes": notes}, indent=1))
        return
    _print(spec.name, inputs, rows, notes, bandwidth)


def _print(name: str, inputs: dict[str, Any], rows: list[dict[str, Any]], notes: list[str], bw: str) -> None:
    title = (f"{name}: {inputs['workers']} workers, {bw} ({inputs['topology']}, goodput "
             f"{inputs['goodput_fraction']:.0%}), α = {inputs['latency_s'] * 1e6:.0f} µs, "
             f"{inputs['parameters']:,} parameters in {inputs['buckets']} DDP bucket(s)")
    table = Table(title=title, title_justify="left")
    columns = ("compressor", "step ms", "comm ms", "compress ms", "exposed ms", "sent/step", "wire/step",
               "vs none", "")
    for column in columns:
        table.add_column(column, justify="left" if column in ("compressor", "") else "right")
    for row in rows:
        speedup = row["speedup_vs_none"]
        table.add_row(
            row["compressor"] + (" (spec)" if row["spec"] else ""), f"{row['step_ms']:.2f}",
            f"{row['comm_ms']:.2f}", f"{row['compress_ms']:.2f}", f"{row['exposed_ms']:.2f}",
            _size(row["bytes_per_step"]), _size(row["wire_bytes_per_step"]),
            "-" if speedup is None else f"{speedup:.2f}×", "best" if row["best"] else "",
        )  # fmt: skip
    console = Console()
    if not console.is_terminal:  # piped: wide enough for the table instead of rich's 80 columns
        console = Console(width=130)
    console.print(table)
    console.print("exposed: compression + communication not hidden behind backward (step = compute + "
                  "exposed); sent/step: the payload each worker hands to its collectives per step (the "
                  "ledger's bytes_sent); wire/step: what a ring sends for them")
    for note in notes:
        console.print(f"note: {note}")


def _size(nbytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes:.0f} B"


def register(app: typer.Typer) -> None:
    app.command("plan")(plan)
