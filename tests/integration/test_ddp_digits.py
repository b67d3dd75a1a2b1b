"""End-to-end DDP runs with gradwire comm hooks on real gloo ranks.

* accuracy: 4 ranks train the same MLP on scikit-learn's ``load_digits`` with each
  compressor and land within 2 points of the uncompressed run's test accuracy, while
  Top-k without error feedback falls clearly behind;
* bucketing: a model that DDP splits into several buckets trains without deadlock,
  ranks stay identical and error-feedback state stays keyed per parameter across
  DDP's bucket rebuild;
* exactness: the ``none`` hook gives the parameters of DDP's built-in all-reduce.

Every test runs all of its configurations inside one ``run_ranks`` spawn.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gradwire.compressors import make_hook
from tests.ranks import run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def _flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


# --- 1. accuracy on load_digits ------------------------------------------------------------

#: SGD with momentum and a cosine schedule, the same for every configuration. Tuned so
#: that ``none`` ends well above 90 % while 1 % Top-k without error feedback is still
#: clearly behind after 220 steps (numbers in test_compressed_accuracy_matches_uncompressed).
HPARAMS = {
    "seed": 0,
    "epochs": 20,
    "batch": 32,  # per rank: 359 training images per rank, 11 steps per epoch
    "lr": 0.05,
    "momentum": 0.9,
}

#: (label, compressor, params)
CONFIGS: list[tuple[str, str, dict]] = [
    ("none", "none", {}),
    ("powersgd r=2", "powersgd", {"rank": 2}),
    ("powersgd r=4", "powersgd", {"rank": 4}),
    ("topk 1% ef", "topk", {"ratio": 0.01, "feedback": "ef"}),
    ("topk 1% ef21", "topk", {"ratio": 0.01, "feedback": "ef21"}),
    ("topk 1% econtrol", "topk", {"ratio": 0.01, "feedback": "econtrol"}),
    ("qsgd", "qsgd", {}),
    ("fp16", "fp16", {}),
    ("topk 1% no feedback", "topk", {"ratio": 0.01, "feedback": "none"}),
    # the MLP's tensors are below select="auto"'s size floor, so the runs above select with
    # torch.topk; these force the sampled threshold, which must train identically
    ("topk 1% ef thr", "topk", {"ratio": 0.01, "feedback": "ef", "select": "threshold"}),
    ("topk 1% ef21 thr", "topk", {"ratio": 0.01, "feedback": "ef21", "select": "threshold"}),
]
BASELINE = "none"
NO_FEEDBACK = "topk 1% no feedback"
#: threshold-selected run -> the torch.topk-selected run it must equal, parameter for parameter
SAME_AS = {"topk 1% ef thr": "topk 1% ef", "topk 1% ef21 thr": "topk 1% ef21"}

#: compressed runs must reach the baseline's test accuracy minus this many points
WITHIN_POINTS = 2.0
#: Top-k without feedback must stay at least this many points below the baseline; over
#: 20 seeds of this setup the gap was 3.9 to 12.8 points (7.5 for seed 0, the test's)
NO_FEEDBACK_GAP_POINTS = 3.0
#: ... and end with at least this many times the baseline's training loss (an
#: optimisation gap, less noisy than accuracy on 360 test images: 10x to 24x over 9 seeds)
NO_FEEDBACK_LOSS_FACTOR = 5.0


def digits_data(seed: int = 0) -> dict[str, torch.Tensor]:
    """Standardised ``load_digits`` with a fixed stratified 1437/360 split."""
    datasets = pytest.importorskip("sklearn.datasets")
    model_selection = pytest.importorskip("sklearn.model_selection")
    preprocessing = pytest.importorskip("sklearn.preprocessing")
    x, y = datasets.load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = model_selection.train_test_split(
        x, y, test_size=360, stratify=y, random_state=seed
    )
    scaler = preprocessing.StandardScaler().fit(x_train)
    return {
        "x_train": torch.tensor(scaler.transform(x_train), dtype=torch.float32),
        "y_train": torch.tensor(y_train, dtype=torch.long),
        "x_test": torch.tensor(scaler.transform(x_test), dtype=torch.float32),
        "y_test": torch.tensor(y_test, dtype=torch.long),
    }


def digits_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def _shard(n: int, rank: int, world: int, seed: int) -> torch.Tensor:
    """This rank's iid shard: one fixed permutation of the training set, dealt round-robin."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[rank::world]


def _train_one(
    rank: int, world: int, data: dict[str, torch.Tensor], name: str, params: dict, hp: dict
) -> dict:
    seed, batch = hp["seed"], hp["batch"]
    torch.manual_seed(seed)  # identical initial weights on every rank
    model = DDP(digits_mlp())
    state, hook = make_hook(name, **params)
    model.register_comm_hook(state, hook)
    opt = torch.optim.SGD(model.parameters(), lr=hp["lr"], momentum=hp["momentum"])
    loss_fn = nn.CrossEntropyLoss()

    shard = _shard(len(data["y_train"]), rank, world, seed)
    x, y = data["x_train"][shard], data["y_train"][shard]
    # the same number of batches on every rank, or DDP's collectives would not pair up
    n_batches = len(y) // batch
    total_steps = hp["epochs"] * n_batches
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total_steps)
    shuffle = torch.Generator().manual_seed(seed * 1000 + rank)
    started = time.perf_counter()
    model.train()
    for _ in range(hp["epochs"]):
        order = torch.randperm(len(y), generator=shuffle)
        for b in range(n_batches):
            idx = order[b * batch : (b + 1) * batch]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
    seconds = time.perf_counter() - started

    model.eval()
    with torch.no_grad():
        pred = model.module(data["x_test"]).argmax(dim=1)
        train_loss = loss_fn(model.module(data["x_train"]), data["y_train"]).item()
    stats = state.stats()
    selections = getattr(state.reducer.compressor, "selections", {})
    return {
        "threshold_selections": selections.get("threshold", 0),
        "accuracy": 100.0 * (pred == data["y_test"]).float().mean().item(),
        "train_loss": train_loss,
        "bytes_sent": stats["bytes_sent"],
        "bytes_uncompressed": stats["bytes_uncompressed"],
        "steps": stats["steps"],
        "expected_steps": total_steps,
        "seconds": seconds,
        "params": _flat_params(model.module),
    }


def train_digits(
    rank: int,
    world: int,
    data: dict[str, torch.Tensor],
    configs: list[tuple[str, str, dict]],
    hp: dict,
) -> dict[str, dict]:
    """Every configuration in turn, each from the same initial weights (one spawn for all)."""
    results = {}
    for label, name, params in configs:
        results[label] = _train_one(rank, world, data, name, params, hp)
        dist.barrier()
    return results


def _print_table(results: dict[str, dict]) -> None:
    base = results[BASELINE]["accuracy"]
    print()
    print(
        f"{'config':<22} {'test acc %':>10} {'vs none':>8} {'train loss':>10} "
        f"{'sent/uncompressed':>18} {'train s':>8}"
    )
    for label, r in results.items():
        ratio = r["bytes_sent"] / r["bytes_uncompressed"]
        print(
            f"{label:<22} {r['accuracy']:>10.2f} {r['accuracy'] - base:>+8.2f} "
            f"{r['train_loss']:>10.4f} {ratio:>18.4f} {r['seconds']:>8.1f}"
        )


def test_compressed_accuracy_matches_uncompressed():
    """Criterion 1. Seen with these settings, seed 0 (identical on torch 2.13 here and on
    torch 2.11 on another x86 machine); ``vs none`` over seeds 0-19 as min / mean / max:

    config               test acc  vs none  20 seeds: min / mean / max  sent/uncompressed
    none                    96.67            baseline 95.8 .. 98.1                 1.0000
    powersgd r=2            96.39    -0.28      -0.6 / -0.1 / +0.6                 0.0649
    powersgd r=4            96.39    -0.28      -0.6 / -0.1 / +0.3                 0.1181
    topk 1% ef              95.83    -0.83      -1.4 / -0.6 / +0.6                 0.0316
    topk 1% ef21            95.28    -1.39      -3.6 / -1.9 / +0.3                 0.0360
    topk 1% econtrol        97.22    +0.56      -1.4 / -0.4 / +0.8                 0.0360
    qsgd                    96.67     0.00      -0.3 /  0.0 / +0.3                 0.2608
    fp16                    96.67     0.00       0.0 /  0.0 /  0.0                 0.5059
    topk 1% no feedback     89.17    -7.50     -12.8 / -7.1 / -3.9                 0.0316

    ``topk 1% ef thr`` and ``topk 1% ef21 thr`` (``select="threshold"``) must end with exactly
    the parameters of ``topk 1% ef`` and ``topk 1% ef21`` (torch.topk selection).

    EF21 is the marginal one: it is within 2 points for seed 0 but trails by 1.9 points on
    average and by more than 2 on 8 of the 20 seeds, ending with about twice the baseline's
    training loss (plain EF21 with small-batch stochastic gradients lags, see Fatkhullin et
    al. 2023). More epochs, a lower learning rate, weight decay or larger batches did not
    reliably close that gap on the seeds tried. The other compressors are within 1.4 points on every seed.
    """
    data = digits_data(HPARAMS["seed"])
    per_rank = run_ranks(train_digits, 4, data, CONFIGS, HPARAMS, timeout=600)
    results = per_rank[0]
    _print_table(results)

    for label, _, _ in CONFIGS:
        for r, other in enumerate(per_rank[1:], start=1):
            torch.testing.assert_close(
                other[label]["params"],
                results[label]["params"],
                rtol=0,
                atol=0,
                msg=lambda m, label=label, r=r: f"{label}: rank {r} differs from rank 0\n{m}",
            )
            assert other[label]["accuracy"] == results[label]["accuracy"]
        assert results[label]["steps"] == results[label]["expected_steps"], label

    base = results[BASELINE]
    assert base["accuracy"] > 90.0, f"uncompressed run reached only {base['accuracy']:.2f} %"
    assert base["bytes_sent"] == pytest.approx(base["bytes_uncompressed"], rel=1e-3)

    failures = [
        f"{label}: {results[label]['accuracy']:.2f} % vs {base['accuracy']:.2f} % uncompressed"
        for label, _, _ in CONFIGS
        if label not in (BASELINE, NO_FEEDBACK)
        and results[label]["accuracy"] < base["accuracy"] - WITHIN_POINTS
    ]
    assert not failures, f"more than {WITHIN_POINTS} points below the uncompressed run: {failures}"

    for label, exact in SAME_AS.items():  # the sampled threshold keeps torch.topk's sets
        assert results[label]["threshold_selections"] > 0, label
        assert results[exact]["threshold_selections"] == 0, exact
        assert torch.equal(results[label]["params"], results[exact]["params"]), label
        assert results[label]["bytes_sent"] == results[exact]["bytes_sent"], label

    for label, _, _ in CONFIGS:
        if label != BASELINE:  # every compressor puts fewer bytes on the wire than fp32
            assert results[label]["bytes_sent"] < base["bytes_sent"], label

    worse = results[NO_FEEDBACK]
    assert worse["accuracy"] <= base["accuracy"] - NO_FEEDBACK_GAP_POINTS, (
        f"Top-k 1 % without error feedback reached {worse['accuracy']:.2f} %, "
        f"not {NO_FEEDBACK_GAP_POINTS} points below {base['accuracy']:.2f} %"
    )
    assert worse["train_loss"] >= NO_FEEDBACK_LOSS_FACTOR * base["train_loss"], (
        worse["train_loss"],
        base["train_loss"],
    )


# --- 2. several DDP buckets --------------------------------------------------------------

#: small enough that the MLP below (1.1 MB of fp32 gradients) needs several buckets
BUCKET_CAP_MB = 0.25
BUCKET_STEPS = 5
BUCKET_CONFIGS: list[tuple[str, str, dict]] = [
    ("powersgd", "powersgd", {"rank": 2}),
    ("topk ef21", "topk", {"ratio": 0.01, "feedback": "ef21"}),
    # QSGD's default feedback is none, which keeps no state; with EF the bucket test
    # also covers its per-parameter residuals
    ("qsgd ef", "qsgd", {"feedback": "ef"}),
]
#: configurations whose per-parameter math does not depend on how DDP buckets the
#: gradients (QSGD's random draws follow the bucket order, so it is left out)
ONE_BUCKET_REFERENCE = ("powersgd", "topk ef21")


def wide_mlp() -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(64, 256), nn.ReLU()]
    for _ in range(4):
        layers += [nn.Linear(256, 256), nn.ReLU()]
    layers.append(nn.Linear(256, 10))
    return nn.Sequential(*layers)


class _Recorder:
    """``state`` of the wrapping hook: gradwire's state plus what DDP handed over."""

    def __init__(self, inner):
        self.inner = inner
        self.steps: list[list[tuple[int, int, bool]]] = []  # per step: (index, params, last)


def _recording_hook(hook):
    def recording_hook(rec, bucket):
        rec.steps[-1].append((bucket.index(), len(bucket.parameters()), bucket.is_last()))
        return hook(rec.inner, bucket)

    return recording_hook


def _feedback_snapshot(state) -> dict[int, dict[str, tuple[int, ...]]]:
    """Feedback state as key -> buffer name -> shape."""
    return {
        key: {name: tuple(t.shape) for name, t in buffers.items()}
        for key, buffers in state.reducer.feedback.state.items()
    }


def _bucketed_run(rank: int, name: str, params: dict, bucket_cap_mb: float) -> dict:
    torch.manual_seed(0)
    model = DDP(wide_mlp(), bucket_cap_mb=bucket_cap_mb)
    state, hook = make_hook(name, **params)
    rec = _Recorder(state)
    model.register_comm_hook(rec, _recording_hook(hook))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    data = torch.Generator().manual_seed(1000 + rank)  # each rank its own batches
    snapshots = []
    for _ in range(BUCKET_STEPS):
        rec.steps.append([])
        x = torch.randn(16, 64, generator=data)
        y = torch.randint(0, 10, (16,), generator=data)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        snapshots.append(_feedback_snapshot(state))
    module = model.module
    return {
        "buckets": rec.steps,
        "snapshots": snapshots,
        # the key gradwire gave each parameter, and the parameter's shape
        "param_keys": [state.key_for(p) for p in module.parameters()],
        "param_shapes": [tuple(p.shape) for p in module.parameters()],
        "steps": state.stats()["steps"],
        "params": _flat_params(module),
    }


def train_bucketed(rank: int, world: int, configs: list[tuple[str, str, dict]]) -> dict:
    results = {}
    for label, name, params in configs:
        results[label] = _bucketed_run(rank, name, params, BUCKET_CAP_MB)
        dist.barrier()
        if label in ONE_BUCKET_REFERENCE:
            results[label]["one bucket"] = _bucketed_run(rank, name, params, 100.0)
            dist.barrier()
    return results


def test_multi_bucket_ddp_keeps_ranks_identical_and_state_per_parameter():
    """Criterion 2: several buckets on gloo, no deadlock (run_ranks times out), identical
    ranks, and feedback state keyed by parameter before and after DDP's bucket rebuild."""
    per_rank = run_ranks(train_bucketed, 4, BUCKET_CONFIGS, timeout=300)
    for label, _, _params in BUCKET_CONFIGS:
        ours = per_rank[0][label]
        n_params = len(ours["param_shapes"])

        for r, other in enumerate(per_rank[1:], start=1):
            torch.testing.assert_close(
                other[label]["params"],
                ours["params"],
                rtol=0,
                atol=0,
                msg=lambda m, label=label, r=r: f"{label}: rank {r} differs from rank 0\n{m}",
            )
        assert ours["steps"] == BUCKET_STEPS, f"{label}: the reducer counted {ours['steps']} steps"

        for step, calls in enumerate(ours["buckets"], start=1):
            # every parameter in exactly one bucket, one last bucket per step
            assert sum(n for _, n, _ in calls) == n_params, (label, step, calls)
            assert [last for _, _, last in calls].count(True) == 1, (label, step, calls)
            assert len({index for index, _, _ in calls}) == len(calls), (label, step, calls)
        # torch 2.13 puts everything in one bucket for step 1 and rebuilds the buckets
        # from the gradient order afterwards; from then on there must be several
        after_rebuild = ours["buckets"][-1]
        assert len(after_rebuild) > 1, f"{label}: DDP used one bucket: {after_rebuild}"
        assert all(calls == after_rebuild for calls in ours["buckets"][1:]), ours["buckets"]

        # state is keyed by parameter: the same keys at every step, one per parameter
        # that carries feedback, each buffer the shape of its parameter
        shape_of = dict(zip(ours["param_keys"], ours["param_shapes"]))
        assert sorted(shape_of) == list(range(n_params))
        matrices = {k for k, shape in shape_of.items() if len(shape) >= 2}
        first, *later = ours["snapshots"]
        for step, snap in enumerate(later, start=2):
            assert snap == first, f"{label}: feedback state keys changed at step {step}"
        # only the compressed matrices carry state (biases always go plain)
        assert set(first) == matrices, (label, sorted(first), sorted(matrices))
        for key, buffers in first.items():
            assert buffers, (label, key)
            for name, shape in buffers.items():
                assert shape == shape_of[key], (label, key, name, shape, shape_of[key])

        if label in ONE_BUCKET_REFERENCE:
            # the bucketing changes only the summation order (seen: < 1e-8 apart); state
            # keyed by bucket slot instead of parameter gave 7e-5 for PowerSGD and a shape
            # error for EF21
            single = ours["one bucket"]
            assert all(len(calls) == 1 for calls in single["buckets"]), single["buckets"]
            torch.testing.assert_close(
                ours["params"],
                single["params"],
                rtol=0,
                atol=1e-6,
                msg=lambda m, label=label: f"{label}: several buckets vs one bucket\n{m}",
            )


# --- 3. the none hook is DDP's all-reduce ------------------------------------------------

EXACT_STEPS = 3


def train_with_and_without_hook(rank: int, world: int) -> dict[str, torch.Tensor]:
    results = {}
    for label in ("plain ddp", "gradwire none"):
        torch.manual_seed(0)
        model = DDP(digits_mlp())
        if label == "gradwire none":
            state, hook = make_hook("none")
            model.register_comm_hook(state, hook)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        data = torch.Generator().manual_seed(2000 + rank)
        for _ in range(EXACT_STEPS):
            x = torch.randn(32, 64, generator=data)
            y = torch.randint(0, 10, (32,), generator=data)
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        results[label] = _flat_params(model.module)
        dist.barrier()
    torch.manual_seed(0)
    results["initial"] = _flat_params(digits_mlp())
    return results


def test_none_hook_matches_plain_ddp():
    """Criterion 3: registering gradwire's ``none`` hook changes nothing."""
    per_rank = run_ranks(train_with_and_without_hook, 2, timeout=120)
    for rank, got in enumerate(per_rank):
        assert not torch.equal(got["plain ddp"], got["initial"])  # the steps did something
        torch.testing.assert_close(
            got["gradwire none"],
            got["plain ddp"],
            msg=lambda m, rank=rank: f"rank {rank}: none hook differs from plain DDP\n{m}",
        )
    torch.testing.assert_close(per_rank[1]["gradwire none"], per_rank[0]["gradwire none"])
