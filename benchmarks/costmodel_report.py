"""The ``costmodel`` section of docs/benchmarks.md: fit, validation and prediction tables of
``benchmarks/costmodel.py``."""

from __future__ import annotations

import datetime as dt
import math
import os

from benchmarks.netlab import parse_rate

BEGIN, END = "<!-- costmodel:begin -->", "<!-- costmodel:end -->"
TARGET = 0.15  # the validation's target: predictions within 15 % of the measured step


def machine() -> str:
    import platform

    import torch

    return f"{os.cpu_count()} CPU cores, {platform.platform()}, torch {torch.__version__}"


def render(args, fits: dict, rows: list[dict], scale: dict[str, list[dict]], cal: dict, seconds: float,
           loads: tuple[float, float], step_alpha: dict | None = None) -> str:
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python benchmarks/costmodel.py" + (" --quick" if args.quick else "")
    passed = sum(r["pass"] for r in rows)
    when = f"Produced by `{cmd}` on {now} in {seconds / 60:.1f} min"
    if args.replay:  # the labs ran earlier: say when, and that fit and validation were recomputed now
        when = (f"Measured by `{cmd} --json F` on {args.measured['finished']} in "
                f"{args.measured['seconds'] / 60:.1f} min; fit, validation and predictions recomputed by "
                f"`{cmd} --replay F` on {now}")
    out = [BEGIN, "## Cost model: α–β fit, validation on shaped links, predictions at scale", "",
           f"{when}. Machine: {machine()}; 1-minute load average {loads[0]:.1f} before, {loads[1]:.1f} "
           "after the measurements. Model and derivations: `gradwire/cli/costmodel.py`, docs/plan.md.", "",
           "**Fit** (back-to-back gloo collectives in netlab; one B per link, α per n; tbf burst "
           "modelled):", "",
           "| link | topology | α µs, n = 2 | α µs, n = 4 | fitted B Mbit/s | goodput | rms error | points |",
           "|:---|:---|---:|---:|---:|---:|---:|---:|"]

    for (rate, topology), f in fits.items():
        nominal = parse_rate(rate)
        goodput = "-" if nominal is None else f"{f['bandwidth'] * 8 / nominal:.0%}"
        alphas = " | ".join(f"{f['alpha_s'].get(n, math.nan) * 1e6:.0f}" for n in (2, 4))
        out.append(f"| {rate or 'unshaped'} | {topology} | {alphas} | "
                   f"{f['bandwidth'] * 8 / 1e6:,.0f} | {goodput} | {f['rms_error']:.0%} | {f['points']} |")
    if step_alpha and step_alpha["held_out"]:
        held = step_alpha["held_out"]
        per_n = "; ".join(
            f"n = {n}: {min(v for (_, _, m), v in held.items() if m == n) * 1e6:,.0f}–"
            f"{max(v for (_, _, m), v in held.items() if m == n) * 1e6:,.0f} µs"
            for n in sorted({m for _, _, m in held}))
        unshaped = ", ".join(f"n = {n}: {a * 1e6:,.0f} µs" for n, a in sorted(step_alpha["unshaped"].items()))
        out += ["", "**α in training steps.** Back-to-back probes see a message's cost while the ranks do "
                "nothing else; in a training step, with n ranks on 2 cores, a message also waits for its "
                "receiver to be scheduled. So per run, (measured step − compute − compression − transfer) "
                "/ messages per step estimates α, and each lab is predicted with the median estimate of "
                "the runs of every *other* lab with the same n (leave one lab out: a lab's own step times "
                f"never enter its prediction): {per_n} across the labs. With α from the unshaped lab's "
                f"runs alone ({unshaped or 'none'}), {step_alpha['unshaped_passed']} of {len(rows)} "
                "would pass."]
    held_out = bool(step_alpha and step_alpha["held_out"])
    alpha_from = "held-out α in training steps (above)" if held_out else "the lab's probe α"
    out += ["", f"**Validation**: linkrun median step time vs prediction, target within {TARGET:.0%}: "
            f"{passed} of {len(rows)} PASS. Compute = linkrun's `compute-only` steps in the same lab, taken "
            "in turn with the methods (2 steps each per turn, one process per rank: drift falls on all "
            "alike); compression = the reducer's step over the model's DDP buckets timed on all n ranks at "
            "once in that lab (no communication; gather decoding of n payloads included); comm = the α–β "
            "model of the bytes derived for the method (one bucket, as linkrun runs hooks), with the lab's "
            f"fitted B and tbf burst and {alpha_from}; exposed = compression + communication (one bucket "
            "is ready only when backward ends; no spare core); predicted = compute + exposed; bytes = the "
            "model's payload per step vs linkrun's ledger. Times in ms, medians over the timed steps.", "",
            "| model | n | link | topology | method | compute | compress | comm | exposed | predicted ms "
            "| measured ms | error | result | bytes model / ledger |",
            "|:---|---:|:---|:---|:---|---:|---:|---:|---:|---:|---:|---:|:---|---:|"]
    for r in rows:
        same = "=" if r["model_bytes"] == round(r["ledger_bytes"]) else f"≠ {r['ledger_bytes']:,.0f}"
        out.append(f"| {r['model']} | {r['n']} | {r['rate']} | {r['topology']} | {r['method']} | "
                   f"{r['compute_ms']:.0f} | {r['compress_ms']:.0f} | {r['comm_ms']:.0f} | "
                   f"{r['exposed_ms']:.0f} | {r['step_ms']:.0f} | {r['measured_ms']:.0f} | "
                   f"{r['error']:+.0%} | {'PASS' if r['pass'] else 'FAIL'} | {r['model_bytes']:,} {same} |")
    out += ["", "**Predictions** (switch topology, "
            f"α = {cal['latency_s'] * 1e6:.0f} µs from the unshaped n = 2 probes' lower quartiles, "
            f"goodput {cal['efficiency']:.0%} of the nominal rate, compute and compression measured on one "
            "process here, gather decoding growing with n). Step ms per compressor; **bold** = best:", ""]
    for name, table in scale.items():
        labels = list(table[0]["ms"])
        out += [f"*{name}*", "", "| link | n | " + " | ".join(labels) + " | best vs none |",
                "|:---|---:|" + "---:|" * len(labels) + "---:|"]
        for row in table:
            best = min(row["ms"], key=row["ms"].get)
            cells = [f"**{v:,.0f}**" if k == best else f"{v:,.0f}" for k, v in row["ms"].items()]
            speed = row["ms"]["none"] / row["ms"][best]
            out.append(f"| {row['rate']} | {row['n']} | " + " | ".join(cells) + f" | {best}, {speed:.1f}× |")
        out.append("")
    out.append(END)
    return "\n".join(out) + "\n"
