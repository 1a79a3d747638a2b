"""A small character-level GPT written as an ``nn.Sequential`` for fine-grained pipelining.

Each pre-norm transformer block becomes four stages under ``partition="layer"``:
``Fork``, ``OnBranch(LayerNorm, qkv Linear, causal attention)``, ``OnBranch(output Linear)``, ``Join``,
``Fork``, ``OnBranch(LayerNorm, Linear d→4d, GELU)``, ``OnBranch(Linear 4d→d)``, ``Join``; the embedding
(token + learned position) and the head (final LayerNorm joins the stage before it) add two, so
``n_layers`` blocks give ``4 n_layers + 2`` stages (18 for 4 blocks).

The output embedding is NOT tied to the input embedding: the two live in different pipeline stages
(first and last), and sharing a weight across stages needs the shared-weight support of the
any-model work. The model returns logits of shape ``(batch, context, vocab)``; train it with
:func:`lm_loss` (mean cross-entropy per character, in nats).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import Fork, Join, OnBranch

__all__ = ["char_gpt", "TokenPositionEmbedding", "CausalSelfAttention", "lm_loss"]


class TokenPositionEmbedding(nn.Module):
    """``ids (b, T) -> tok[ids] + pos[:T]``, shape ``(b, T, d)``."""

    def __init__(self, vocab_size: int, context: int, d_model: int) -> None:
        super().__init__()
        self.context = context
        # the token table is a parameter of this module (not an nn.Embedding inside it), so the module is one
        # layer for the partitioner; the initialisation draws the same random numbers as nn.Embedding did
        self.token = nn.Parameter(torch.empty(vocab_size, d_model).normal_())
        self.position = nn.Parameter(torch.zeros(context, d_model))
        nn.init.normal_(self.token, std=0.02)
        nn.init.normal_(self.position, std=0.02)

    def forward(self, ids: Tensor) -> Tensor:
        if ids.dim() != 2 or ids.shape[1] > self.context:
            raise ValueError(f"expected character ids of shape (batch, <= {self.context}), got {tuple(ids.shape)}")
        return F.embedding(ids, self.token) + self.position[: ids.shape[1]]


class CausalSelfAttention(nn.Module):
    """Parameter-free causal multi-head attention on packed ``qkv`` of shape ``(b, T, 3d)``."""

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv: Tensor) -> Tensor:
        b, t, three_d = qkv.shape
        d = three_d // 3
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in qkv.split(d, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return y.transpose(1, 2).reshape(b, t, d)

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}"


def _linear(d_in: int, d_out: int, std: float = 0.02) -> nn.Linear:
    layer = nn.Linear(d_in, d_out)
    nn.init.normal_(layer.weight, std=std)
    nn.init.zeros_(layer.bias)
    return layer


def char_gpt(
    vocab_size: int = 65,
    context: int = 64,
    d_model: int = 64,
    n_layers: int = 4,
    n_heads: int = 4,
    mlp_ratio: int = 4,
    *,
    norm: str | None = None,
    num_classes: int | None = None,
) -> nn.Sequential:
    """A GPT-2-style pre-norm decoder (``n_layers`` blocks, untied output embedding) as an ``nn.Sequential``.

    ``norm``/``num_classes`` are accepted for the zoo's common signature and ignored (the vocabulary size is
    ``vocab_size``); initialisation follows GPT-2 (normal 0.02, residual projections scaled by
    ``1/√(2 n_layers)``).
    """
    if norm not in (None, "none", "ln", "layernorm"):
        raise ValueError(f"char_gpt uses LayerNorm; norm={norm!r} is not supported")
    if d_model % n_heads:
        raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
    proj_std = 0.02 / math.sqrt(2 * n_layers)
    layers: list[nn.Module] = [TokenPositionEmbedding(vocab_size, context, d_model)]
    for _ in range(n_layers):
        layers += [
            Fork(),
            OnBranch(nn.LayerNorm(d_model), _linear(d_model, 3 * d_model), CausalSelfAttention(n_heads)),
            OnBranch(_linear(d_model, d_model, proj_std)),
            Join(act=False),
            Fork(),
            OnBranch(nn.LayerNorm(d_model), _linear(d_model, mlp_ratio * d_model), nn.GELU()),
            OnBranch(_linear(mlp_ratio * d_model, d_model, proj_std)),
            Join(act=False),
        ]
    layers += [nn.LayerNorm(d_model), _linear(d_model, vocab_size)]
    return nn.Sequential(*layers)


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-character cross-entropy (nats per character) of ``(b, T, V)`` logits."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
