"""End-to-end DDP runs with gradwire comm hooks on real gloo ranks.

* accuracy: 4 ranks train the same MLP on scikit-learn's ``load_digits`` with each
  compressor and reach (within 2 points) the accuracy of the uncompressed run, while
  Top-k without error feedback falls clearly behind;
* bucketing: a model that DDP splits into several buckets trains without deadlock,
  ranks stay identical and error-feedback state is keyed per parameter;
* exactness: the ``none`` hook gives the parameters of DDP's built-in all-reduce.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gradwire.compressors import make_hook
from tests.ranks import run_ranks

WORLD = 4

def unannotated(hook: Callable) -> Callable:
    """``hook`` behind a plain signature, which DDP's ``register_comm_hook`` accepts.

    gradwire's ``reducer_hook`` is declared in a module with ``from __future__ import
    annotations``, so its annotations are strings (``'dist.GradBucket'``) and DDP's
    ``_check_comm_hook`` rejects it (see ``test_gradwire_hook_registers_as_is``).
    """

    def gradwire_hook(state, bucket):
        return hook(state, bucket)

    return gradwire_hook


# --- criterion 1: accuracy on load_digits --------------------------------------------------

SEED = 0
EPOCHS = 20
BATCH = 32  # per rank
LR = 0.05
MOMENTUM = 0.9

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
]


def digits_data(seed: int = SEED) -> dict[str, torch.Tensor]:
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
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
    )


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
    model.register_comm_hook(state, unannotated(hook))
    opt = torch.optim.SGD(model.parameters(), lr=hp["lr"], momentum=hp["momentum"])
    loss_fn = nn.CrossEntropyLoss()

    shard = _shard(len(data["y_train"]), rank, world, seed)
    x, y = data["x_train"][shard], data["y_train"][shard]
    # the same number of batches on every rank, or DDP's collectives would not match up
    n_batches = len(y) // batch
    total = hp["epochs"] * n_batches
    if hp["schedule"] == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    else:
        sched = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
    shuffle = torch.Generator().manual_seed(seed * 1000 + rank)
    started = time.perf_counter()
    for _ in range(hp["epochs"]):
        order = torch.randperm(len(y), generator=shuffle)
        model.train()
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
    accuracy = 100.0 * (pred == data["y_test"]).float().mean().item()
    stats = state.stats()
    checksum = torch.cat([p.detach().reshape(-1) for p in model.module.parameters()]).sum().item()
    return {
        "accuracy": accuracy,
        "bytes_sent": stats["bytes_sent"],
        "bytes_uncompressed": stats["bytes_uncompressed"],
        "steps": stats["steps"],
        "seconds": seconds,
        "checksum": checksum,
    }


HPARAMS = {
    "seed": SEED, "epochs": EPOCHS, "batch": BATCH, "lr": LR, "momentum": MOMENTUM,
    "schedule": "cosine",
}


def train_digits(
    rank: int,
    world: int,
    data: dict[str, torch.Tensor],
    configs: list[tuple[str, str, dict]],
    hp: dict = HPARAMS,
) -> dict[str, dict]:
    """Every configuration in turn, each from the same initial weights (one spawn for all)."""
    results = {}
    for label, name, params in configs:
        results[label] = _train_one(rank, world, data, name, params, hp)
        dist.barrier()
    return results
