"""What the compressor benchmark measures: parameter shapes of the models, the
gradients it feeds, and the configurations it compares."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

Shape = tuple[int, ...]

# --------------------------------------------------------------------------------------
# Parameter shapes
# --------------------------------------------------------------------------------------


def resnet18_shapes(num_classes: int = 1000) -> list[tuple[str, Shape]]:
    """Parameters of torchvision's ``resnet18`` in ``named_parameters()`` order.

    BasicBlock stages of (64, 128, 256, 512) channels, two blocks each; the first block
    of stages 2-4 has stride 2 and a 1x1 downsample conv + BN. BatchNorm running
    statistics are buffers, not parameters, so they are not here.
    """
    shapes: list[tuple[str, Shape]] = [
        ("conv1.weight", (64, 3, 7, 7)),
        ("bn1.weight", (64,)),
        ("bn1.bias", (64,)),
    ]
    in_ch = 64
    for stage, out_ch in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            pre = f"layer{stage}.{block}"
            cin = in_ch if block == 0 else out_ch
            shapes += [
                (f"{pre}.conv1.weight", (out_ch, cin, 3, 3)),
                (f"{pre}.bn1.weight", (out_ch,)),
                (f"{pre}.bn1.bias", (out_ch,)),
                (f"{pre}.conv2.weight", (out_ch, out_ch, 3, 3)),
                (f"{pre}.bn2.weight", (out_ch,)),
                (f"{pre}.bn2.bias", (out_ch,)),
            ]
            if block == 0 and cin != out_ch:
                shapes += [
                    (f"{pre}.downsample.0.weight", (out_ch, cin, 1, 1)),
                    (f"{pre}.downsample.1.weight", (out_ch,)),
                    (f"{pre}.downsample.1.bias", (out_ch,)),
                ]
        in_ch = out_ch
    shapes += [("fc.weight", (num_classes, 512)), ("fc.bias", (num_classes,))]
    return shapes


def transformer_shapes(
    vocab: int = 8192, d_model: int = 256, layers: int = 4, ffn: int = 1024, context: int = 512
) -> list[tuple[str, Shape]]:
    """A GPT-2-style decoder LM (pre-LayerNorm, fused QKV, output head tied to the token
    embedding). The head count (4) does not change any parameter shape."""
    shapes: list[tuple[str, Shape]] = [
        ("tok_emb.weight", (vocab, d_model)),
        ("pos_emb.weight", (context, d_model)),
    ]
    for i in range(layers):
        pre = f"blocks.{i}"
        shapes += [
            (f"{pre}.ln1.weight", (d_model,)),
            (f"{pre}.ln1.bias", (d_model,)),
            (f"{pre}.attn.qkv.weight", (3 * d_model, d_model)),
            (f"{pre}.attn.qkv.bias", (3 * d_model,)),
            (f"{pre}.attn.out.weight", (d_model, d_model)),
            (f"{pre}.attn.out.bias", (d_model,)),
            (f"{pre}.ln2.weight", (d_model,)),
            (f"{pre}.ln2.bias", (d_model,)),
            (f"{pre}.mlp.fc1.weight", (ffn, d_model)),
            (f"{pre}.mlp.fc1.bias", (ffn,)),
            (f"{pre}.mlp.fc2.weight", (d_model, ffn)),
            (f"{pre}.mlp.fc2.bias", (d_model,)),
        ]
    shapes += [("ln_f.weight", (d_model,)), ("ln_f.bias", (d_model,))]
    return shapes


MODELS: dict[str, tuple[str, Callable[[], list[tuple[str, Shape]]]]] = {
    "resnet18": ("ResNet-18 (ImageNet, 1000 classes)", resnet18_shapes),
    "transformer": (
        "Transformer LM (vocab 8192, d 256, 4 layers, 4 heads, ffn 1024, ctx 512, tied head)",
        transformer_shapes,
    ),
}
# torchvision.models.resnet18() has exactly this many parameters.
RESNET18_NUMEL = 11_689_512


def numel(shape: Shape) -> int:
    return math.prod(shape)


def make_grads(shapes: Sequence[tuple[str, Shape]], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _, shape in shapes]


class FixedGradients(nn.Module):
    """Parameters with the model's shapes; ``forward() = Σ_ℓ <p_ℓ, c_ℓ>`` so backward
    produces exactly ``c_ℓ`` (this rank's fixed random gradient) at the cost of one
    multiply per element."""

    def __init__(self, shapes: Sequence[tuple[str, Shape]], coeffs: list[torch.Tensor]):
        super().__init__()
        self.weights = nn.ParameterList(nn.Parameter(torch.zeros(s)) for _, s in shapes)
        self.coeffs = coeffs  # plain attribute: not a buffer, never broadcast

    def forward(self) -> torch.Tensor:
        dots = [torch.dot(p.reshape(-1), c.reshape(-1)) for p, c in zip(self.weights, self.coeffs)]
        return torch.stack(dots).sum()


# --------------------------------------------------------------------------------------
# What is benchmarked
# --------------------------------------------------------------------------------------

# (label, registry name, params)
REDUCER_CONFIGS: list[tuple[str, str, dict[str, Any]]] = [
    ("none", "none", {}),
    ("fp16", "fp16", {}),
    ("bf16", "bf16", {}),
    ("powersgd r=2", "powersgd", {"rank": 2}),
    ("powersgd r=4", "powersgd", {"rank": 4}),
    ("topk 1%", "topk", {"ratio": 0.01, "feedback": "ef"}),
    ("randk 1%", "randk", {"ratio": 0.01}),
    ("qsgd", "qsgd", {}),
    ("sign", "sign", {}),
]

PSGD_RANKS = (2, 4)
TORCH_START_ITER = 2  # torch requires > 1 with error feedback / warm start
