"""Datasets by name: the offline built-ins, users' files, and plugins.

``get_dataset("digits", seed=0)`` returns a :class:`Dataset` of train and test tensors
(classification: features float32 ``[N, F]``, labels int64 in ``[0, num_classes)``; language
modelling: token ids int64 ``[N, T]`` and next tokens int64 ``[N, T]``). Built-ins need no network:

* ``digits`` — scikit-learn's 8×8 handwritten digits (1797 × 64, 10 classes);
* ``breast_cancer`` — scikit-learn's Wisconsin breast cancer set (569 × 30, 2 classes);
* ``synthetic`` — seeded Gaussian blobs (:func:`synthetic`);
* ``mnist1d`` — MNIST-1D signals (5000 × 40, 10 classes) from the optional ``mnist1d``
  package's generator (:func:`mnist1d`; ``pip install 'gradwire[mnist1d]'``);
* ``tiny_text`` — a seeded character-level corpus from a small grammar, for language models
  (``gradwire.worker.text``);
* ``npz``, ``csv``, ``parquet`` — a user's file (``gradwire.worker.file_datasets``).

Every classification split is stratified and fixed by ``seed``; features are standardised with
statistics of the training split only, so nothing of the test split leaks into training. Third-party
datasets plug in through the entry-point group ``gradwire.datasets``: a callable taking
keyword parameters and returning a :class:`Dataset`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import Field

from gradwire.worker.registry import Registry

ENTRY_POINT_GROUP = "gradwire.datasets"

Fraction01 = Annotated[float, Field(gt=0.0, lt=1.0)]


TASKS = ("classification", "language_model")


@dataclass(frozen=True)
class Dataset:
    """A data set already split into train and test tensors.

    ``task="classification"``: features float32 ``[N, F]`` and labels int64 ``[N]`` in
    ``[0, num_classes)``. ``task="language_model"``: token ids int64 ``[N, T]`` as inputs and
    the next tokens int64 ``[N, T]`` as targets, all in ``[0, num_classes)`` (the vocabulary
    size); ``num_features`` is then the context length ``T``.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    task: str = "classification"

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"{self.name}: unknown task {self.task!r}; expected one of {', '.join(TASKS)}")
        check = self._check_language_model if self.task == "language_model" else self._check_classification
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            check(split, x, y)
        if self.x_train.shape[1] != self.x_test.shape[1]:
            raise ValueError(f"{self.name}: train and test have different feature counts")
        if len(self.y_train) == 0:
            raise ValueError(f"{self.name}: the training split is empty")

    def _check_classification(self, split: str, x: torch.Tensor, y: torch.Tensor) -> None:
        if x.dtype != torch.float32 or y.dtype != torch.int64:
            raise TypeError(f"{self.name}: {split} features must be float32 and labels int64")
        if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"{self.name}: {split} needs features [N, F] and labels [N]")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(f"{self.name}: {split} labels must lie in [0, {self.num_classes})")

    def _check_language_model(self, split: str, x: torch.Tensor, y: torch.Tensor) -> None:
        if x.dtype != torch.int64 or y.dtype != torch.int64:
            raise TypeError(f"{self.name}: {split} inputs and targets of a language model must be int64")
        if x.ndim != 2 or x.shape != y.shape:
            raise ValueError(f"{self.name}: {split} needs inputs [N, T] and targets [N, T] of the same shape")
        for tokens in (x, y):
            if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.num_classes):
                raise ValueError(f"{self.name}: {split} tokens must lie in [0, {self.num_classes})")

    @property
    def num_features(self) -> int:
        """Features per example (classification) or the context length (language model)."""
        return int(self.x_train.shape[1])


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices, sorted; each class contributes ``round(test_fraction · n_c)`` to test.

    A class keeps at least one training example, so a split never drops a class from training.
    """
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        n_test = min(round(test_fraction * len(members)), len(members) - 1)
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def from_arrays(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    num_classes: int | None = None,
    standardize: bool = True,
) -> Dataset:
    """A :class:`Dataset` from arrays, standardised with the training split's mean and std."""
    x_train = np.asarray(x_train, dtype=np.float64)
    x_test = np.asarray(x_test, dtype=np.float64)
    if standardize:
        mean = x_train.mean(axis=0)
        std = x_train.std(axis=0)
        std[std == 0] = 1.0  # constant features (digits has some blank pixels) stay at 0
        x_train = (x_train - mean) / std
        x_test = (x_test - mean) / std
    y_train = np.asarray(y_train, dtype=np.int64)
    y_test = np.asarray(y_test, dtype=np.int64)
    if num_classes is None:
        num_classes = int(max(y_train.max(initial=-1), y_test.max(initial=-1))) + 1
    return Dataset(
        name=name,
        x_train=torch.from_numpy(x_train.astype(np.float32)),
        y_train=torch.from_numpy(y_train),
        x_test=torch.from_numpy(x_test.astype(np.float32)),
        y_test=torch.from_numpy(y_test),
        num_classes=num_classes,
    )


def split_arrays(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    *,
    test_fraction: float,
    seed: int,
    standardize: bool = True,
    num_classes: int | None = None,
) -> Dataset:
    """:func:`stratified_split` then :func:`from_arrays`."""
    train, test = stratified_split(y, test_fraction, seed)
    return from_arrays(
        name, x[train], y[train], x[test], y[test], num_classes=num_classes, standardize=standardize
    )


# --- built-ins --------------------------------------------------------------------------------


def _sklearn_loader(attr: str) -> Any:
    try:
        import sklearn.datasets
    except ImportError as err:  # an optional dependency (extras "examples" and "dev")
        raise ImportError(
            "the built-in datasets digits and breast_cancer need scikit-learn: pip install scikit-learn"
        ) from err
    return getattr(sklearn.datasets, attr)


def digits(*, seed: int = 0, test_fraction: Fraction01 = 0.2, standardize: bool = True) -> Dataset:
    """scikit-learn's 8×8 digits (bundled with scikit-learn, no download); 64 features, 10 classes."""
    x, y = _sklearn_loader("load_digits")(return_X_y=True)
    return split_arrays(
        "digits", x, y, test_fraction=test_fraction, seed=seed, standardize=standardize, num_classes=10
    )


def breast_cancer(*, seed: int = 0, test_fraction: Fraction01 = 0.2, standardize: bool = True) -> Dataset:
    """scikit-learn's breast cancer set (bundled, no download); 30 features, 2 classes."""
    x, y = _sklearn_loader("load_breast_cancer")(return_X_y=True)
    return split_arrays(
        "breast_cancer", x, y, test_fraction=test_fraction, seed=seed, standardize=standardize, num_classes=2
    )


def synthetic(
    *,
    samples: Annotated[int, Field(ge=2)] = 2048,
    features: Annotated[int, Field(ge=1)] = 20,
    classes: Annotated[int, Field(ge=2)] = 4,
    clusters_per_class: Annotated[int, Field(ge=1)] = 1,
    separation: Annotated[float, Field(ge=0.0)] = 2.0,
    spread: Annotated[float, Field(ge=0.0)] = 0.0,
    imbalance: Annotated[float, Field(ge=1.0)] = 1.0,
    seed: int = 0,
    test_fraction: Fraction01 = 0.2,
) -> Dataset:
    """Seeded Gaussian blobs: ``classes × clusters_per_class`` unit-variance clusters.

    Cluster centres are drawn from N(0, separation²·I), so a larger ``separation`` makes the
    classes easier to tell apart. Heterogeneity knobs: ``clusters_per_class > 1`` gives every
    class distinct sub-populations (a label-skewed partition then also skews features);
    ``spread > 0`` draws each cluster's noise scale from exp(N(0, spread²)); ``imbalance`` is
    the ratio of the largest class's size to the smallest's (sizes geometric in between).
    """
    if samples < 2 * classes:
        raise ValueError(f"synthetic: samples={samples} is too few for classes={classes}; need 2 per class")
    rng = np.random.default_rng(seed)
    weights = imbalance ** -(np.arange(classes) / max(classes - 1, 1))
    per_class = np.maximum(np.floor(samples * weights / weights.sum()).astype(int), 1)
    per_class[0] += samples - per_class.sum()  # exactly `samples` examples in all
    centres = rng.normal(0.0, separation, size=(classes, clusters_per_class, features))
    scales = np.exp(rng.normal(0.0, spread, size=(classes, clusters_per_class)))
    xs, ys = [], []
    for label, count in enumerate(per_class):
        cluster = rng.integers(clusters_per_class, size=count)
        noise = rng.normal(size=(count, features)) * scales[label, cluster][:, None]
        xs.append(centres[label, cluster] + noise)
        ys.append(np.full(count, label))
    x, y = np.concatenate(xs), np.concatenate(ys)
    return split_arrays(
        "synthetic", x, y, test_fraction=test_fraction, seed=seed, standardize=False, num_classes=classes
    )


def _mnist1d_generator() -> tuple[Any, Any]:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as err:  # an optional dependency (extras "mnist1d" and "dev")
        raise ImportError(
            f"the built-in dataset mnist1d needs the mnist1d package: pip install 'gradwire[mnist1d]' ({err})"
        ) from err
    return get_dataset_args, make_dataset


def mnist1d(
    *,
    seed: int = 0,
    num_samples: Annotated[int, Field(ge=20)] = 5000,
    test_fraction: Fraction01 = 0.2,
    standardize: bool = True,
) -> Dataset:
    """MNIST-1D (Greydanus, 2020): 1-D signals of 40 points made from 10 digit templates, 10 classes.

    Generated by the ``mnist1d`` package's own generator with its default transformations
    (padding, scaling, translation, correlated and iid noise, shear), never downloaded.
    ``num_samples`` is rounded down to a multiple of 10 (the generator makes equally many of
    each class); ``seed`` fixes both the signals and the split (``seed=42``, the package's
    default, draws the same signals as the package's own data set).
    """
    get_dataset_args, make_dataset = _mnist1d_generator()
    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    args.train_split = 1.0  # everything in "x"; the split is ours, stratified like the other built-ins
    # the generator seeds and draws from numpy's and Python's global generators: leave them as they were
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        generated = make_dataset(args)
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    x, y = np.asarray(generated["x"]), np.asarray(generated["y"])
    return split_arrays(
        "mnist1d", x, y, test_fraction=test_fraction, seed=seed, standardize=standardize, num_classes=10
    )


DATASETS = Registry(
    kind="dataset",
    group=ENTRY_POINT_GROUP,
    builtins={
        "digits": digits,
        "breast_cancer": breast_cancer,
        "synthetic": synthetic,
        "mnist1d": mnist1d,
        "tiny_text": "gradwire.worker.text:tiny_text",
        "npz": "gradwire.worker.file_datasets:load_npz",
        "csv": "gradwire.worker.file_datasets:load_csv",
        "parquet": "gradwire.worker.file_datasets:load_parquet",
    },
)


def get_dataset(name: str, *, allow_import_paths: bool = False, **params: Any) -> Dataset:
    """The dataset ``name`` built with ``params`` (a spec's ``data.dataset`` and ``data.params``).

    Raises ``UnknownNameError`` (listing the available names), ``InvalidParamsError`` (naming
    each bad parameter) or ``ImportPathRefusedError`` for a ``module:function`` name unless
    ``allow_import_paths`` is true.
    """
    dataset = DATASETS.build(name, allow_import_paths=allow_import_paths, **params)
    if not isinstance(dataset, Dataset):
        raise TypeError(f"dataset {name!r} returned a {type(dataset).__name__}, not a gradwire Dataset")
    return dataset


def available_datasets() -> list[str]:
    return DATASETS.available()
