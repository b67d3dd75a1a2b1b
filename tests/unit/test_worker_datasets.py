"""Datasets (built-in, file, plugin) and the partitioning of examples across workers."""

from __future__ import annotations

import csv
import importlib.util
from fractions import Fraction
from importlib.metadata import EntryPoint
from pathlib import Path

import numpy as np
import pytest
import torch

from gradwire.spec import DirichletPartition, IidPartition
from gradwire.worker import registry as registry_module
from gradwire.worker.datasets import Dataset, available_datasets, get_dataset
from gradwire.worker.partition import coded_partitions, partition_indices
from gradwire.worker.registry import ImportPathRefusedError, InvalidParamsError, Registry, UnknownNameError


def tiny_dataset(n: int = 12) -> Dataset:
    """An import-path plugin (``tests.unit.test_worker_datasets:tiny_dataset``)."""
    x = torch.arange(n * 2, dtype=torch.float32).reshape(n, 2)
    y = torch.arange(n) % 2
    return Dataset("tiny", x, y, x[:2], y[:2], num_classes=2)


def not_a_dataset() -> str:
    return "oops"


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return get_dataset("digits")


# --- built-ins --------------------------------------------------------------------------------


def test_digits_offline_shapes_and_standardisation(digits: Dataset) -> None:
    assert (digits.num_features, digits.num_classes, digits.task) == (64, 10, "classification")
    assert len(digits.y_train) + len(digits.y_test) == 1797
    assert digits.x_train.dtype == torch.float32 and digits.y_train.dtype == torch.int64
    assert set(digits.y_test.tolist()) == set(range(10))  # stratified: every class in the test split
    assert digits.x_train.mean(0).abs().max() < 1e-4  # standardised with train statistics
    assert digits.x_test.mean(0).abs().max() > 1e-4  # ... not with the test split's


def test_split_is_fixed_by_seed(digits: Dataset) -> None:
    again = get_dataset("digits", seed=0)
    assert torch.equal(digits.x_train, again.x_train) and torch.equal(digits.y_test, again.y_test)
    other = get_dataset("digits", seed=1)
    assert not torch.equal(digits.x_train, other.x_train)


def test_breast_cancer() -> None:
    data = get_dataset("breast_cancer", test_fraction=0.25)
    assert (data.num_features, data.num_classes) == (30, 2)
    assert len(data.y_train) + len(data.y_test) == 569
    assert abs(len(data.y_test) - 0.25 * 569) <= 2


def test_synthetic_follows_its_params_and_seed() -> None:
    params = {"samples": 600, "features": 5, "classes": 3}  # as in examples/specs/synthetic-msgc.yaml
    data = get_dataset("synthetic", **params)
    assert (data.num_features, data.num_classes) == (5, 3)
    assert len(data.y_train) + len(data.y_test) == 600
    assert torch.equal(data.x_train, get_dataset("synthetic", **params).x_train)
    assert not torch.equal(data.x_train, get_dataset("synthetic", **params, seed=1).x_train)
    skewed = get_dataset("synthetic", **params, imbalance=8.0)
    counts = torch.bincount(torch.cat([skewed.y_train, skewed.y_test]))
    assert counts[0] / counts[-1] == pytest.approx(8.0, rel=0.1)


# --- files ------------------------------------------------------------------------------------


def test_npz_with_both_splits_round_trips(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.normal(size=(40, 2, 3)),
        "y_train": rng.integers(0, 3, 40),
        "x_test": rng.normal(size=(10, 2, 3)),
        "y_test": rng.integers(0, 3, 10),
    }
    np.savez(tmp_path / "mine.npz", **arrays)
    data = get_dataset("npz", path=str(tmp_path / "mine.npz"), standardize=False)
    assert data.x_train.shape == (40, 6) and data.x_test.shape == (10, 6)  # flattened
    assert np.allclose(data.x_train.numpy(), arrays["x_train"].reshape(40, 6).astype(np.float32))
    assert data.y_test.tolist() == arrays["y_test"].tolist()


def test_npz_with_one_array_is_split(tmp_path: Path) -> None:
    x, y = np.ones((50, 4)), np.repeat([0, 1], 25)
    np.savez(tmp_path / "xy.npz", x=x, y=y)
    data = get_dataset("npz", path=tmp_path / "xy.npz", test_fraction=0.2)
    assert (len(data.y_train), len(data.y_test), data.num_classes) == (40, 10, 2)
    np.savez(tmp_path / "bad.npz", a=x)
    with pytest.raises(ValueError, match="not x_train, y_train, x_test, y_test, nor x, y"):
        get_dataset("npz", path=tmp_path / "bad.npz")


def test_csv_round_trips_with_string_labels(tmp_path: Path) -> None:
    path = tmp_path / "flowers.csv"
    rows = [(i * 0.5, i % 7, ["iris", "rose", "tulip"][i % 3]) for i in range(30)]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["width", "petals", "kind"])
        writer.writerows(rows)
    data = get_dataset("csv", path=str(path), label_column="kind", test_fraction=0.2, standardize=False)
    assert (data.num_features, data.num_classes) == (2, 3)
    assert len(data.y_train) + len(data.y_test) == 30
    first = data.x_train[0].tolist()  # the train split is sorted, so row 0 comes first
    assert first == [0.0, 0.0] and data.y_train[0] == 0  # "iris" is class 0 in sorted order
    with pytest.raises(ValueError, match=r"no column 'label' \(its header has 3 columns\)") as refused:
        get_dataset("csv", path=str(path))
    assert "petals" not in str(refused.value)  # the file's own words stay out of messages


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nothing\.csv"):
        get_dataset("csv", path=tmp_path / "nothing.csv")


def test_parquet_without_pyarrow_names_the_package(tmp_path: Path) -> None:
    if importlib.util.find_spec("pyarrow") is not None:
        pytest.skip("pyarrow is installed")
    (tmp_path / "data.parquet").write_bytes(b"PAR1")
    with pytest.raises(ImportError, match="pyarrow"):
        get_dataset("parquet", path=tmp_path / "data.parquet")


def test_parquet_round_trips(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"a": [float(i) for i in range(20)], "label": [i % 2 for i in range(20)]})
    pq.write_table(table, tmp_path / "data.parquet")
    data = get_dataset("parquet", path=tmp_path / "data.parquet")
    assert (data.num_features, data.num_classes, len(data.y_train) + len(data.y_test)) == (1, 2, 20)


# --- errors and plugins -----------------------------------------------------------------------


def test_unknown_name_lists_the_available_ones() -> None:
    with pytest.raises(UnknownNameError) as err:
        get_dataset("mnist")
    assert "unknown dataset 'mnist'" in str(err.value)
    for name in ("digits", "breast_cancer", "synthetic", "npz", "csv", "parquet"):
        assert name in str(err.value) and name in available_datasets()


def test_bad_params_are_named() -> None:
    with pytest.raises(InvalidParamsError, match="sampels: unknown parameter") as err:
        get_dataset("synthetic", sampels=10)
    assert "samples" in str(err.value)  # the accepted names are listed
    with pytest.raises(InvalidParamsError, match="test_fraction: Input should be less than 1"):
        get_dataset("digits", test_fraction=1.5)
    with pytest.raises(InvalidParamsError, match="path: Field required"):
        get_dataset("npz")


def test_import_paths_need_permission() -> None:
    path = "tests.unit.test_worker_datasets:tiny_dataset"
    with pytest.raises(ImportPathRefusedError, match="import-path plugins are disabled"):
        get_dataset(path)
    data = get_dataset(path, allow_import_paths=True, n=8)
    assert data.name == "tiny" and len(data.y_train) == 8
    with pytest.raises(InvalidParamsError, match="n: Input should be a valid integer"):
        get_dataset(path, allow_import_paths=True, n="many")
    with pytest.raises(TypeError, match="not a gradwire Dataset"):
        get_dataset("tests.unit.test_worker_datasets:not_a_dataset", allow_import_paths=True)


def test_entry_points_are_loaded_and_may_not_shadow(monkeypatch: pytest.MonkeyPatch) -> None:
    group = "gradwire.datasets"
    plugin = EntryPoint("tiny", "tests.unit.test_worker_datasets:tiny_dataset", group)
    monkeypatch.setattr(registry_module, "entry_points", lambda group: [plugin])
    reg = Registry("dataset", group, {"digits": "gradwire.worker.datasets:digits"})
    assert reg.available() == ["digits", "tiny"]
    assert reg.build("tiny", n=4).name == "tiny"
    clash = EntryPoint("digits", "tests.unit.test_worker_datasets:tiny_dataset", group)
    monkeypatch.setattr(registry_module, "entry_points", lambda group: [clash])
    with pytest.raises(ValueError, match="already taken"):
        Registry("dataset", group, {"digits": "gradwire.worker.datasets:digits"}).available()


# --- partitions -------------------------------------------------------------------------------


def _covers_once(parts: list[torch.Tensor], n: int) -> bool:
    joined = torch.cat(parts)
    return len(joined) == n and torch.equal(joined.sort().values, torch.arange(n))


def _mean_label_entropy(labels: torch.Tensor, parts: list[torch.Tensor], classes: int) -> float:
    """Average over workers of the entropy (nats) of the worker's label mix."""
    entropies = []
    for part in parts:
        p = torch.bincount(labels[part], minlength=classes).double() / len(part)
        entropies.append(float(-(p[p > 0] * p[p > 0].log()).sum()))
    return sum(entropies) / len(entropies)


def test_iid_is_balanced_complete_and_seeded(digits: Dataset) -> None:
    y = digits.y_train
    parts = partition_indices(y, 7, seed=3, **IidPartition().model_dump())
    assert _covers_once(parts, len(y))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    again = partition_indices(y, 7, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(parts, again))
    assert not torch.equal(parts[0], partition_indices(y, 7, seed=4)[0])


def test_dirichlet_skew_grows_as_alpha_shrinks(digits: Dataset) -> None:
    y = digits.y_train
    skewed = partition_indices(y, 8, seed=0, **DirichletPartition(alpha=0.1).model_dump())
    mixed = partition_indices(y, 8, "dirichlet", alpha=100.0, seed=0)
    for parts in (skewed, mixed):
        assert _covers_once(parts, len(y)) and min(map(len, parts)) >= 1
    low, high = _mean_label_entropy(y, skewed, 10), _mean_label_entropy(y, mixed, 10)
    assert high > 0.95 * np.log(10)  # large alpha: nearly uniform label mixes
    assert low < 0.6 * high
    again = partition_indices(y, 8, "dirichlet", alpha=0.1, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(skewed, again))


def test_dirichlet_leaves_no_worker_empty() -> None:
    y = torch.arange(40) % 2  # two classes, many workers, tiny alpha: most workers get nothing at first
    for seed in range(5):
        parts = partition_indices(y, 20, "dirichlet", alpha=0.01, seed=seed)
        assert _covers_once(parts, 40) and min(map(len, parts)) >= 1


def test_partition_errors() -> None:
    y = torch.zeros(10, dtype=torch.int64)
    with pytest.raises(ValueError, match="unknown partition kind 'shards'"):
        partition_indices(y, 2, "shards")
    with pytest.raises(ValueError, match="alpha > 0"):
        partition_indices(y, 2, "dirichlet")
    with pytest.raises(ValueError, match="'iid' takes none"):
        partition_indices(y, 2, "iid", alpha=1.0)
    with pytest.raises(ValueError, match="cannot give each of 11 workers one"):
        partition_indices(y, 11)


def test_coded_partitions_are_equal_complete_and_seeded() -> None:
    parts = coded_partitions(103, 4, seed=1)
    assert _covers_once(parts, 103) and [len(p) for p in parts] == [26, 26, 26, 25]
    assert all(torch.equal(a, b) for a, b in zip(parts, coded_partitions(103, 4, seed=1)))
    assert not torch.equal(parts[0], coded_partitions(103, 4, seed=2)[0])
    uneven = coded_partitions(100, 3, sizes=[Fraction(1, 2), Fraction(1, 4), Fraction(1, 4)])
    assert [len(p) for p in uneven] == [50, 25, 25] and _covers_once(uneven, 100)
    with pytest.raises(ValueError, match="summing to 1"):
        coded_partitions(100, 2, sizes=[0.5, 0.6])
