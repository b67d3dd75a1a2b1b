"""A user's own data from a file: ``.npz``, ``.csv`` or ``.parquet`` (registered as ``npz``,
``csv``, ``parquet`` in ``gradwire.worker.datasets``).

Labels may be integers (kept as they are: class ``k`` is label ``k``) or anything else
(strings, non-integral numbers), which are numbered in sorted order. A file without a test
split is split with :func:`gradwire.worker.datasets.stratified_split`. Parquet needs pyarrow,
an optional dependency imported only when a parquet file is loaded.

Error messages name the file, line and column number, never what the file holds (a header, a
value, an array's name): they end up in a job's reason and logs, which other people read.
"""

from __future__ import annotations

import contextlib
import csv
from pathlib import Path

import numpy as np

from gradwire.worker.datasets import Dataset, Fraction01, from_arrays, split_arrays

_SPLIT_KEYS = ("x_train", "y_train", "x_test", "y_test")


def encode_labels(*splits: np.ndarray) -> tuple[list[np.ndarray], int]:
    """Labels as int64 class ids, numbered consistently across splits, and the class count."""
    joined = np.concatenate([np.asarray(s).ravel() for s in splits])
    if joined.dtype.kind in "iub" or (joined.dtype.kind == "f" and np.all(joined == np.round(joined))):
        ids = joined.astype(np.int64)
        if len(ids) and ids.min() >= 0:
            return [np.asarray(s).astype(np.int64).ravel() for s in splits], int(ids.max()) + 1
    classes = np.unique(joined)
    return [np.searchsorted(classes, np.asarray(s).ravel()).astype(np.int64) for s in splits], len(classes)


def _existing(path: Path, suffixes: tuple[str, ...]) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {str(path)!r} does not exist")
    if path.suffix.lower() not in suffixes:
        raise ValueError(f"{str(path)!r}: expected a {' or '.join(suffixes)} file")
    return path


def _from_table(
    name: str, x: np.ndarray, labels: np.ndarray, *, test_fraction: float, seed: int, standardize: bool
) -> Dataset:
    (y,), num_classes = encode_labels(labels)
    return split_arrays(
        name, x, y, test_fraction=test_fraction, seed=seed, standardize=standardize, num_classes=num_classes
    )


def load_npz(
    *, path: Path, test_fraction: Fraction01 = 0.2, seed: int = 0, standardize: bool = True
) -> Dataset:
    """Arrays ``x_train, y_train, x_test, y_test``, or ``x, y`` split by ``test_fraction`` and ``seed``.

    Features of any shape are flattened to ``[N, F]``.
    """
    path = _existing(path, (".npz",))
    with np.load(path, allow_pickle=False) as arrays:
        keys = set(arrays.files)
        if set(_SPLIT_KEYS) <= keys:
            x_train, y_train, x_test, y_test = (arrays[k] for k in _SPLIT_KEYS)
            (y_train, y_test), num_classes = encode_labels(y_train, y_test)
            return from_arrays(
                path.stem,
                x_train.reshape(len(x_train), -1),
                y_train,
                x_test.reshape(len(x_test), -1),
                y_test,
                num_classes=num_classes,
                standardize=standardize,
            )
        if {"x", "y"} <= keys:
            x = arrays["x"]
            return _from_table(
                path.stem,
                x.reshape(len(x), -1),
                arrays["y"],
                test_fraction=test_fraction,
                seed=seed,
                standardize=standardize,
            )
    raise ValueError(
        f"{str(path)!r} holds {len(keys)} arrays, but not x_train, y_train, x_test, y_test, nor x, y"
    )


def load_csv(
    *,
    path: Path,
    label_column: str = "label",
    delimiter: str = ",",
    test_fraction: Fraction01 = 0.2,
    seed: int = 0,
    standardize: bool = True,
) -> Dataset:
    """A CSV file with a header row: ``label_column`` holds the labels, every other column a feature."""
    path = _existing(path, (".csv", ".tsv", ".txt"))
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle, delimiter=delimiter))
    except (UnicodeDecodeError, csv.Error):  # their messages quote bytes of the file
        raise ValueError(f"{str(path)!r} is not a UTF-8 CSV file") from None
    if not rows:
        raise ValueError(f"{str(path)!r} is empty")
    header, body = rows[0], [row for row in rows[1:] if row]
    if label_column not in header:
        message = f"{str(path)!r} has no column {label_column!r} (its header has {len(header)} columns)"
        raise ValueError(message)
    label_at = header.index(label_column)
    feature_at = [i for i in range(len(header)) if i != label_at]
    x = np.empty((len(body), len(feature_at)), dtype=np.float64)
    for r, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise ValueError(f"{str(path)!r} line {r}: {len(row)} fields, the header has {len(header)}")
        for c, i in enumerate(feature_at):
            try:
                x[r - 2, c] = float(row[i])
            except ValueError:
                raise ValueError(f"{str(path)!r} line {r}, column {i + 1}: not a number") from None
    labels = np.array([row[label_at] for row in body])
    with contextlib.suppress(ValueError):  # string labels are numbered in sorted order by encode_labels
        labels = labels.astype(np.int64)
    return _from_table(path.stem, x, labels, test_fraction=test_fraction, seed=seed, standardize=standardize)


def load_parquet(
    *,
    path: Path,
    label_column: str = "label",
    test_fraction: Fraction01 = 0.2,
    seed: int = 0,
    standardize: bool = True,
) -> Dataset:
    """A Parquet file: ``label_column`` holds the labels, every other (numeric) column a feature."""
    path = _existing(path, (".parquet", ".pq"))
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError(
            "reading .parquet datasets needs the package 'pyarrow', which is not installed; "
            "install it with: pip install pyarrow"
        ) from err
    table = pq.read_table(path)
    if label_column not in table.column_names:
        raise ValueError(
            f"{str(path)!r} has no column {label_column!r} (it has {len(table.column_names)} columns)"
        )
    features = [name for name in table.column_names if name != label_column]
    try:
        x = np.column_stack([table.column(n).to_numpy().astype(np.float64) for n in features])
    except (ValueError, TypeError):
        raise ValueError(f"{str(path)!r}: every column but {label_column!r} must be numeric") from None
    labels = table.column(label_column).to_numpy()
    return _from_table(path.stem, x, labels, test_fraction=test_fraction, seed=seed, standardize=standardize)
