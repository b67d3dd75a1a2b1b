"""gradwire demo: DDP on two local gloo ranks, one line to attach a compressor.

Trains a small MLP on scikit-learn's digits (offline) with several compressors
and prints test accuracy next to the bytes each one put on the wire.

    python examples/demo.py [--epochs 12] [--world 2]
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.nn.parallel import DistributedDataParallel as DDP

from gradwire.compressors import make_hook

CONFIGS = [
    ("none", {}),
    ("fp16", {}),
    ("powersgd", {"rank": 2}),
    ("topk", {"ratio": 0.01, "feedback": "ef"}),
    ("topk", {"ratio": 0.01, "feedback": "econtrol", "eta": 0.1}),
    ("sign", {"feedback": "ef"}),
]


def digits() -> tuple[torch.Tensor, ...]:
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-6
    as_x = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    return as_x(x_tr), torch.tensor(y_tr), as_x(x_te), torch.tensor(y_te)


def train(rank: int, world: int, name: str, params: dict, epochs: int) -> tuple[float, dict]:
    x_tr, y_tr, x_te, y_te = digits()
    shard = slice(rank, None, world)
    x_tr, y_tr = x_tr[shard], y_tr[shard]
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 128), torch.nn.ReLU(),
        torch.nn.Linear(128, 10),
    )
    ddp = DDP(model)
    state, hook = make_hook(name, **params)  # the one line that attaches a compressor
    ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(rank)
    for _ in range(epochs):
        for idx in torch.randperm(len(x_tr), generator=gen).split(32):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(ddp(x_tr[idx]), y_tr[idx]).backward()
            opt.step()
    with torch.no_grad():
        accuracy = (model(x_te).argmax(1) == y_te).float().mean().item()
    return accuracy, state.stats()


def worker(rank: int, world: int, port: int, epochs: int, out: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = [train(rank, world, name, params, epochs) for name, params in CONFIGS]
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--world", type=int, default=2)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.pt")
        mp.spawn(worker, args=(args.world, port, args.epochs, out), nprocs=args.world)
        results = torch.load(out, weights_only=False)
    show(results, args)


def show(results: list[tuple[float, dict]], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"digits MLP, {args.world} gloo ranks, {args.epochs} epochs (rank 0's ledger)")
    for column in ("compressor", "test accuracy", "MB sent", "MB plain all-reduce", "ratio"):
        table.add_column(column, justify="left" if column == "compressor" else "right")
    for (name, params), (acc, stats) in zip(CONFIGS, results):
        label = name + "".join(f" {k}={v}" for k, v in params.items())
        sent, plain = stats["bytes_sent"], stats["bytes_uncompressed"]
        table.add_row(label, f"{100 * acc:.1f} %", f"{sent / 1e6:.2f}", f"{plain / 1e6:.2f}",
                      f"{plain / sent:.1f}×")
    Console().print(table)


if __name__ == "__main__":
    main()
