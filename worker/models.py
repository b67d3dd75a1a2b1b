"""Models by name: ``build_model(name, num_features, num_classes, **params) -> nn.Module``.

A classifier maps features ``[B, num_features]`` to logits ``[B, num_classes]``; a language
model maps token ids ``[B, T]`` (``T = num_features``, the context length) to logits
``[B, T, num_classes]`` (``num_classes``: the vocabulary size). Built-ins:

* ``logistic`` — multinomial logistic regression (one linear layer);
* ``mlp`` — ``hidden`` sizes (an int or a list), ``activation``, ``dropout``;
* ``cnn`` — a small CNN for square single-channel images stored flat (8×8 digits: 64 → 1×8×8);
* ``transformer_lm`` — a small causal transformer language model (``d_model``, ``layers``,
  ``heads``, ``feedforward``, ``dropout``, ``tie_weights``), in ``gradwire.worker.transformer``.

Third-party models plug in through the entry-point group ``gradwire.models``: a callable
``f(num_features, num_classes, **params)`` returning an ``nn.Module``. Its keyword parameters
are validated against its signature, like the built-ins'.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import nn

from gradwire.worker.registry import Registry

ENTRY_POINT_GROUP = "gradwire.models"

Width = Annotated[int, Field(ge=1)]

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


def logistic(num_features: int, num_classes: int) -> nn.Module:
    """Multinomial logistic regression: the logits are one affine map of the features."""
    return nn.Linear(num_features, num_classes)


def mlp(
    num_features: int,
    num_classes: int,
    *,
    hidden: Width | list[Width] = 64,
    activation: Literal["relu", "tanh", "gelu"] = "relu",
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0,
) -> nn.Module:
    """A multilayer perceptron with hidden layers of sizes ``hidden`` (``[]``: logistic regression)."""
    widths = [hidden] if isinstance(hidden, int) else list(hidden)
    layers: list[nn.Module] = []
    width_in = num_features
    for width in widths:
        layers += [nn.Linear(width_in, width), _ACTIVATIONS[activation]()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width_in = width
    layers.append(nn.Linear(width_in, num_classes))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """Two 3×3 conv blocks over a ``side × side`` single-channel image given as flat features.

    Conv → ReLU → 2×2 max-pool, twice, then adaptive average pooling to 2×2 and a linear
    classifier, so any ``side >= 4`` works (8×8 digits pool to 2×2 exactly).
    """

    def __init__(self, side: int, num_classes: int, channels: tuple[int, int]):
        super().__init__()
        self.side = side
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(2),
        )
        self.classifier = nn.Linear(c2 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images = x.reshape(-1, 1, self.side, self.side)
        return self.classifier(self.features(images).flatten(1))


def cnn(
    num_features: int,
    num_classes: int,
    *,
    channels: tuple[Width, Width] = (16, 32),
) -> nn.Module:
    """:class:`SmallCNN` for ``num_features = side²`` (a square single-channel image, side >= 4)."""
    side = math.isqrt(num_features)
    if side * side != num_features or side < 4:
        raise ValueError(
            f"model 'cnn' needs square single-channel images of side >= 4 given as flat features "
            f"(64 for 8×8 digits); got num_features={num_features}"
        )
    return SmallCNN(side, num_classes, (channels[0], channels[1]))


MODELS = Registry(
    kind="model",
    group=ENTRY_POINT_GROUP,
    builtins={
        "logistic": logistic,
        "mlp": mlp,
        "cnn": cnn,
        "transformer_lm": "gradwire.worker.transformer:transformer_lm",
    },
)


def build_model(
    name: str, num_features: int, num_classes: int, *, allow_import_paths: bool = False, **params: Any
) -> nn.Module:
    """The model ``name`` for this data (a spec's ``model.name`` and ``model.params``).

    Raises ``UnknownNameError`` (listing the available names), ``InvalidParamsError`` (naming
    each bad parameter) or ``ImportPathRefusedError`` for a ``module:function`` name unless
    ``allow_import_paths`` is true.
    """
    if num_features < 1 or num_classes < 1:
        raise ValueError(f"need num_features >= 1 and num_classes >= 1; got {num_features}, {num_classes}")
    model = MODELS.build(name, num_features, num_classes, allow_import_paths=allow_import_paths, **params)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model {name!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def available_models() -> list[str]:
    return MODELS.available()
