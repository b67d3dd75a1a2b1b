"""``transformer_lm``: a small decoder-only transformer for next-token prediction.

Registered in ``gradwire.worker.models`` as ``transformer_lm``. It reads token ids
``[B, T]`` (int64) and returns logits ``[B, T, vocab]``, the logits at position ``t``
depending on tokens ``0..t`` only. Built for a language-model dataset such as ``tiny_text``:
the registry passes ``num_features`` (the dataset's context length ``T``) and ``num_classes``
(its vocabulary size).

Architecture: token embeddings plus learned position embeddings, ``layers`` pre-norm blocks
(LayerNorm → causal multi-head self-attention → residual, LayerNorm → GELU MLP → residual),
a final LayerNorm and an output head, by default tied to the token embeddings. Every
parameter takes part in every forward pass, so DDP needs no ``find_unused_parameters``.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from gradwire.worker.registry import InvalidParamsError

Positive = Annotated[int, Field(ge=1)]


class CausalBlock(nn.Module):
    """One pre-norm transformer block with causal self-attention."""

    def __init__(self, d_model: int, heads: int, feedforward: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.attention_norm = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.attention_out = nn.Linear(d_model, d_model)
        self.mlp_norm = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, feedforward), nn.GELU(), nn.Linear(feedforward, d_model))
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        batch, length, width = h.shape
        qkv = self.qkv(self.attention_norm(h)).view(batch, length, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [batch, heads, length, head width]
        p = self.dropout.p if self.training else 0.0
        mixed = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        h = h + self.dropout(self.attention_out(mixed.transpose(1, 2).reshape(batch, length, width)))
        return h + self.dropout(self.mlp(self.mlp_norm(h)))


class TransformerLM(nn.Module):
    """Token ids ``[..., T]`` (``T <= context``) → next-token logits ``[..., T, vocab]``."""

    def __init__(
        self,
        context: int,
        vocab: int,
        *,
        d_model: int = 64,
        layers: int = 2,
        heads: int = 4,
        feedforward: int | None = None,
        dropout: float = 0.0,
        tie_weights: bool = True,
    ):
        super().__init__()
        self.context = context
        self.vocab = vocab
        self.token_embedding = nn.Embedding(vocab, d_model)
        self.position_embedding = nn.Embedding(context, d_model)
        self.dropout = nn.Dropout(dropout)
        width = feedforward or 4 * d_model
        self.blocks = nn.ModuleList(CausalBlock(d_model, heads, width, dropout) for _ in range(layers))
        self.final_norm = nn.LayerNorm(d_model)
        self.head: nn.Linear | None = None if tie_weights else nn.Linear(d_model, vocab)
        self.head_bias = nn.Parameter(torch.zeros(vocab)) if tie_weights else None
        self._init_weights(layers)

    def _init_weights(self, layers: int) -> None:
        # small normal weights (GPT-2 style); the projections that feed the residual stream are
        # scaled down by the depth so that the stream's variance does not grow with it
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            assert isinstance(block, CausalBlock)
            for residual in (block.attention_out, block.mlp[2]):
                assert isinstance(residual, nn.Linear)
                nn.init.normal_(residual.weight, std=0.02 / math.sqrt(2 * layers))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(
                f"transformer_lm takes integer token ids, got {tokens.dtype}; use it with a language-model "
                "dataset such as tiny_text"
            )
        length = tokens.shape[-1] if tokens.ndim else 0
        if not 1 <= length <= self.context:
            raise ValueError(
                f"transformer_lm: sequences of 1 to {self.context} tokens; got shape {tuple(tokens.shape)}"
            )
        flat = tokens.reshape(-1, length)
        positions = torch.arange(length, device=tokens.device)
        h = self.dropout(self.token_embedding(flat) + self.position_embedding(positions))
        for block in self.blocks:
            h = block(h)
        h = self.final_norm(h)
        if self.head is not None:
            logits = self.head(h)
        else:
            logits = F.linear(h, self.token_embedding.weight, self.head_bias)
        return logits.reshape(*tokens.shape, self.vocab)


def transformer_lm(
    num_features: int,
    num_classes: int,
    *,
    d_model: Positive = 64,
    layers: Positive = 2,
    heads: Positive = 4,
    feedforward: Positive | None = None,
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0,
    tie_weights: bool = True,
) -> nn.Module:
    """:class:`TransformerLM` with context ``num_features`` and vocabulary ``num_classes``.

    ``d_model`` must be a multiple of ``heads``; ``feedforward`` (the MLP's hidden width)
    defaults to ``4 * d_model``; ``tie_weights`` shares the output head with the token embeddings.
    """
    if d_model % heads:
        raise InvalidParamsError(
            "model", "transformer_lm", {"heads": f"d_model={d_model} must be a multiple of heads={heads}"}
        )
    return TransformerLM(
        num_features,
        num_classes,
        d_model=d_model,
        layers=layers,
        heads=heads,
        feedforward=feedforward,
        dropout=dropout,
        tie_weights=tie_weights,
    )
