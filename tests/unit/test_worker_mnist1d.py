"""The optional ``mnist1d`` dataset: built with the mnist1d package's generator, offline."""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gradwire.spec import JobSpec
from gradwire.worker.datasets import Dataset, available_datasets, get_dataset
from gradwire.worker.models import build_model
from gradwire.worker.registry import InvalidParamsError

SPEC = Path(__file__).parents[2] / "examples" / "specs" / "mnist1d-mlp-topk.yaml"


@pytest.fixture(scope="module")
def mnist1d() -> Dataset:
    pytest.importorskip("mnist1d", reason="the optional mnist1d package is not installed")
    return get_dataset("mnist1d", num_samples=2000)


def test_shapes_classes_and_standardisation(mnist1d: Dataset) -> None:
    assert "mnist1d" in available_datasets()
    assert (mnist1d.num_features, mnist1d.num_classes, mnist1d.task) == (40, 10, "classification")
    assert mnist1d.x_train.shape == (1600, 40) and mnist1d.x_test.shape == (400, 40)
    assert mnist1d.x_train.dtype == torch.float32 and mnist1d.y_train.dtype == torch.int64
    assert torch.bincount(mnist1d.y_test).tolist() == [40] * 10  # stratified; 200 of each class in all
    assert mnist1d.x_train.mean(0).abs().max() < 1e-4  # standardised with train statistics
    assert (mnist1d.x_train.std(0) - 1).abs().max() < 1e-2


def test_fixed_by_seed_and_leaves_global_generators_alone(mnist1d: Dataset) -> None:
    np.random.seed(123)
    random.seed(123)
    expected = np.random.random(), random.random()
    np.random.seed(123)
    random.seed(123)
    small = get_dataset("mnist1d", num_samples=105)  # rounded down to 10 of each class
    assert (np.random.random(), random.random()) == expected  # the generator's reseeding is undone
    assert len(small.y_train) + len(small.y_test) == 100
    again = get_dataset("mnist1d", num_samples=105)
    assert torch.equal(small.x_train, again.x_train) and torch.equal(small.y_test, again.y_test)
    other = get_dataset("mnist1d", num_samples=105, seed=1)
    assert not torch.equal(small.x_train, other.x_train)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread: on a busy 2-core machine more threads can make a step many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(
    ("name", "params", "floor"), [("logistic", {}, 0.22), ("mlp", {"hidden": [128, 128]}, 0.4)]
)
def test_brief_training_beats_chance(mnist1d: Dataset, name: str, params: dict, floor: float) -> None:
    """200 Adam steps; measured test accuracy: logistic 0.28, MLP 0.48 (chance 0.10)."""
    torch.manual_seed(0)
    model = build_model(name, mnist1d.num_features, mnist1d.num_classes, **params)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        batch = torch.randint(len(mnist1d.y_train), (256,), generator=generator)
        loss = nn.functional.cross_entropy(model(mnist1d.x_train[batch]), mnist1d.y_train[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = float((model(mnist1d.x_test).argmax(1) == mnist1d.y_test).float().mean())
    assert accuracy > floor, f"{name}: test accuracy {accuracy:.3f}"


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mnist1d", None)  # `import mnist1d` now raises ImportError
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    with pytest.raises(ImportError, match=r"pip install 'gradwire\[mnist1d\]'"):
        get_dataset("mnist1d")


def test_bad_params_are_named() -> None:
    with pytest.raises(InvalidParamsError, match="num_samples: Input should be greater than or equal to 20"):
        get_dataset("mnist1d", num_samples=5)
    with pytest.raises(InvalidParamsError, match="samples: unknown parameter"):
        get_dataset("mnist1d", samples=100)


def test_example_spec_builds(mnist1d: Dataset) -> None:
    spec = JobSpec.from_file(SPEC)
    assert spec.data.dataset == "mnist1d"
    data = get_dataset(spec.data.dataset, seed=spec.seed, **{**spec.data.params, "num_samples": 200})
    model = build_model(spec.model.name, data.num_features, data.num_classes, **spec.model.params)
    assert model(data.x_test[:3]).shape == (3, 10)
