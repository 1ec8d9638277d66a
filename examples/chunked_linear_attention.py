"""Causal linear attention written as a Python loop over chunks, the way chunkwise research code spells it:
within a chunk the masked quadratic form, across chunks a carried [D, E] state per head.

Each class has a `make()` factory returning (model in eval mode, example_inputs tuple); `make_*_at(n)`
factories give the benchmark sizes. The sequence need not be a multiple of the chunk: the last chunk is
then shorter, as `x[:, :, i:i + C]` makes it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from examples.attention_models import merge_heads, split_heads


class ChunkedLinearLayer(nn.Module):
    """Unnormalised causal linear attention (relu features), chunk by chunk: the intra-chunk scores with
    the upper triangle zeroed by masked_fill, the inter-chunk part q @ state, state += kᵀ v."""

    def __init__(self, dim: int = 32, heads: int = 4, chunk: int = 4) -> None:
        super().__init__()
        self.heads, self.chunk = heads, chunk
        self.qkv, self.o = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        q, k = F.relu(q), F.relu(k)
        b, h, n, d = q.shape
        state = q.new_zeros(b, h, d, v.shape[-1])
        outs = []
        for i in range(0, n, self.chunk):
            qi, ki, vi = q[:, :, i : i + self.chunk], k[:, :, i : i + self.chunk], v[:, :, i : i + self.chunk]
            c = qi.shape[2]
            scores = (qi @ ki.transpose(-1, -2)).masked_fill(torch.triu(torch.ones(c, c, dtype=torch.bool), 1), 0)
            outs.append(scores @ vi + qi @ state)
            state = state + ki.transpose(-1, -2) @ vi
        return self.o(merge_heads(torch.cat(outs, dim=2)))

    @staticmethod
    def make(n: int = 16, dim: int = 32, heads: int = 4) -> tuple[nn.Module, tuple]:
        return ChunkedLinearLayer(dim, heads).eval(), (torch.randn(2, n, dim),)


class ChunkedRetentionLayer(nn.Module):
    """RetNet's chunkwise retention (without its normalisers): per-head decay gamma_h; inside a chunk of
    c rows the decay matrix D = gamma^(i - j) (j <= i), across chunks the state read with
    xi = gamma^(r + 1) and updated as gamma^c * state + kᵀ (v * gamma^(c - 1 - r))."""

    def __init__(self, dim: int = 32, heads: int = 4, chunk: int = 4) -> None:
        super().__init__()
        self.heads, self.chunk = heads, chunk
        self.qkv, self.o = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        b, h, n, d = q.shape
        q = q * d**-0.5
        gamma = (1 - torch.exp2(-5 - torch.arange(h, dtype=torch.float32))).view(h, 1, 1)
        state = q.new_zeros(b, h, d, v.shape[-1])
        outs = []
        for i in range(0, n, self.chunk):
            qi, ki, vi = q[:, :, i : i + self.chunk], k[:, :, i : i + self.chunk], v[:, :, i : i + self.chunk]
            c = qi.shape[2]
            r = torch.arange(c, dtype=torch.float32)
            dist = r[:, None] - r[None, :]
            decay = torch.pow(gamma, dist.clamp(min=0)).masked_fill(dist < 0, 0.0)  # [H, c, c]
            inner = ((qi @ ki.transpose(-1, -2)) * decay) @ vi
            cross = (qi @ state) * torch.pow(gamma, (r + 1).view(c, 1))
            outs.append(inner + cross)
            state = state * gamma**c + ki.transpose(-1, -2) @ (vi * torch.pow(gamma, (c - 1 - r).view(c, 1)))
        return self.o(merge_heads(torch.cat(outs, dim=2)))

    @staticmethod
    def make(n: int = 16, dim: int = 32, heads: int = 4) -> tuple[nn.Module, tuple]:
        return ChunkedRetentionLayer(dim, heads).eval(), (torch.randn(2, n, dim),)


class ChunkedNormalisedLayer(nn.Module):
    """Katharopoulos et al.'s causal linear attention (phi = elu + 1) chunk by chunk, with the normaliser
    as a second carried state z (the running key sum): out = (S_intra v + q state) / (rowsum + q z + eps)."""

    def __init__(self, dim: int = 32, heads: int = 4, chunk: int = 4) -> None:
        super().__init__()
        self.heads, self.chunk = heads, chunk
        self.qkv, self.o = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        q, k = F.elu(q) + 1, F.elu(k) + 1
        b, h, n, d = q.shape
        state, z = q.new_zeros(b, h, d, v.shape[-1]), q.new_zeros(b, h, d)
        mask = torch.tril(torch.ones(self.chunk, self.chunk))
        outs = []
        for i in range(0, n, self.chunk):
            qi, ki, vi = q[:, :, i : i + self.chunk], k[:, :, i : i + self.chunk], v[:, :, i : i + self.chunk]
            c = qi.shape[2]
            scores = (qi @ ki.transpose(-1, -2)) * mask[:c, :c]
            num = scores @ vi + qi @ state
            den = scores.sum(-1, keepdim=True) + qi @ z.unsqueeze(-1) + 1e-6
            outs.append(num / den)
            state = state + ki.transpose(-1, -2) @ vi
            z = z + ki.sum(dim=2)
        return self.o(merge_heads(torch.cat(outs, dim=2)))

    @staticmethod
    def make(n: int = 16, dim: int = 32, heads: int = 4) -> tuple[nn.Module, tuple]:
        return ChunkedNormalisedLayer(dim, heads).eval(), (torch.randn(2, n, dim),)


def make_chunked_retention_at(n: int, chunk: int = 64) -> tuple[nn.Module, tuple]:
    """The chunkwise retention layer at sequence length n, d = 32 per head (4 heads), batch 1."""
    return ChunkedRetentionLayer(128, 4, chunk).eval(), (torch.randn(1, n, 128),)


MODELS = (ChunkedLinearLayer, ChunkedRetentionLayer, ChunkedNormalisedLayer)
