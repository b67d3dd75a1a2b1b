"""Models by name: shapes, a few training steps on digits, errors, plugins, the example specs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from gradwire.spec import JobSpec
from gradwire.worker.datasets import Dataset, get_dataset
from gradwire.worker.models import available_models, build_model
from gradwire.worker.registry import ImportPathRefusedError, InvalidParamsError, UnknownNameError

SPECS = sorted((Path(__file__).parents[2] / "examples" / "specs").glob("*.yaml"))


def two_layer(num_features: int, num_classes: int, width: int = 8) -> nn.Module:
    """An import-path plugin (``tests.unit.test_worker_models:two_layer``)."""
    return nn.Sequential(nn.Linear(num_features, width), nn.ReLU(), nn.Linear(width, num_classes))


class Bilinear(nn.Module):
    """A class as a plugin: its ``__init__`` parameters are validated."""

    def __init__(self, num_features: int, num_classes: int, width: int = 4):
        super().__init__()
        self.body = two_layer(num_features, num_classes, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def not_a_module(num_features: int, num_classes: int) -> int:
    return num_features


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return get_dataset("digits")


@pytest.mark.parametrize(
    ("name", "params"),
    [("logistic", {}), ("mlp", {}), ("mlp", {"hidden": [32, 16], "activation": "gelu"}), ("cnn", {})],
)
def test_logits_have_one_column_per_class(digits: Dataset, name: str, params: dict) -> None:
    torch.manual_seed(0)
    model = build_model(name, digits.num_features, digits.num_classes, **params)
    assert model(digits.x_train[:5]).shape == (5, 10)


@pytest.mark.parametrize("name", ["logistic", "mlp", "cnn"])
def test_a_few_steps_reduce_the_loss_on_digits(digits: Dataset, name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, 64, 10)
    x, y = digits.x_train[:256], digits.y_train[:256]
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(15):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_mlp_hidden_sizes() -> None:
    widths = [m.out_features for m in build_model("mlp", 5, 3, hidden=[7, 6]) if isinstance(m, nn.Linear)]
    assert widths == [7, 6, 3]
    assert [m.out_features for m in build_model("mlp", 5, 3, hidden=4) if isinstance(m, nn.Linear)] == [4, 3]
    assert len(build_model("mlp", 5, 3, hidden=[])) == 1  # no hidden layer: logistic regression
    assert any(isinstance(m, nn.Dropout) for m in build_model("mlp", 5, 3, dropout=0.1))


def test_unknown_model_lists_the_available_ones() -> None:
    with pytest.raises(UnknownNameError, match="unknown model 'resnet'; available: cnn, logistic, mlp"):
        build_model("resnet", 64, 10)
    assert {"cnn", "logistic", "mlp"} <= set(available_models())


def test_bad_params_are_named() -> None:
    with pytest.raises(InvalidParamsError, match="hiden: unknown parameter"):
        build_model("mlp", 64, 10, hiden=[8])
    with pytest.raises(InvalidParamsError, match=r"hidden: .*\[1\] Input should be greater than"):
        build_model("mlp", 64, 10, hidden=[8, 0])
    with pytest.raises(InvalidParamsError, match="activation: Input should be 'relu', 'tanh' or 'gelu'"):
        build_model("mlp", 64, 10, activation="sigmoid")
    with pytest.raises(InvalidParamsError, match="takes no parameters"):
        build_model("logistic", 64, 10, hidden=8)
    with pytest.raises(ValueError, match="square single-channel images"):
        build_model("cnn", 30, 2)


def test_import_paths_need_permission() -> None:
    path = "tests.unit.test_worker_models:two_layer"
    with pytest.raises(ImportPathRefusedError, match="import path"):
        build_model(path, 4, 3)
    model = build_model(path, 4, 3, allow_import_paths=True, width=5)
    assert model(torch.zeros(2, 4)).shape == (2, 3) and model[0].out_features == 5
    cls = "tests.unit.test_worker_models:Bilinear"
    assert build_model(cls, 4, 3, allow_import_paths=True, width=6).body[0].out_features == 6
    with pytest.raises(InvalidParamsError, match="width: Input should be a valid integer"):
        build_model(cls, 4, 3, allow_import_paths=True, width="wide")
    with pytest.raises(TypeError, match=r"not a torch\.nn\.Module"):
        build_model("tests.unit.test_worker_models:not_a_module", 4, 3, allow_import_paths=True)


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_example_specs_build(path: Path) -> None:
    spec = JobSpec.from_file(path)
    data = get_dataset(spec.data.dataset, seed=spec.seed, **spec.data.params)
    model = build_model(spec.model.name, data.num_features, data.num_classes, **spec.model.params)
    assert model(data.x_test[:3]).shape == (3, *data.y_test.shape[1:], data.num_classes)
