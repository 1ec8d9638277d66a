"""Softmax-free (linear) attention layers, spelled the way their papers' reference code spells them.

Each class has a `make()` factory (no arguments) returning (model in eval mode, example_inputs tuple),
used by the matcher tests, the demo and the benchmarks; `make_*_at(n)` factories give the benchmark sizes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from examples.attention_models import merge_heads, split_heads


class LinearTransformerLayer(nn.Module):
    """Katharopoulos et al. 2020 written as the quadratic form: phi = elu + 1, weights normalized by
    their row sum + eps, then applied to v. O(N^2 d) as written."""

    def __init__(self, dim: int = 32, heads: int = 4, eps: float = 1e-6) -> None:
        super().__init__()
        self.heads, self.eps = heads, eps
        self.qkv, self.o = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        q, k = F.elu(q) + 1, F.elu(k) + 1
        scores = q @ k.transpose(-2, -1)
        weights = scores / (scores.sum(dim=-1, keepdim=True) + self.eps)
        return self.o(merge_heads(weights @ v))

    @staticmethod
    def make(n: int = 16, dim: int = 32, heads: int = 4) -> tuple[nn.Module, tuple]:
        return LinearTransformerLayer(dim, heads).eval(), (torch.randn(2, n, dim),)


class CausalLinearLayer(nn.Module):
    """Causal linear attention (relu feature map) masked with a lower-triangular 0/1 matrix, normalized
    with a clamp, as autoregressive linear transformers write it in their quadratic training mode."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.o = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        q, k, v = (split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        tril = torch.tril(torch.ones(n, n, device=x.device, dtype=x.dtype))
        scores = torch.relu(q) @ torch.relu(k).transpose(-2, -1) * tril
        weights = scores / scores.sum(-1, keepdim=True).clamp(min=1e-4)
        return self.o(merge_heads(weights @ v))

    @staticmethod
    def make(n: int = 16, dim: int = 32, heads: int = 4) -> tuple[nn.Module, tuple]:
        return CausalLinearLayer(dim, heads).eval(), (torch.randn(2, n, dim),)


class RetentionLayer(nn.Module):
    """RetNet-style parallel retention without its normalizers: per-head decay gamma_h^(i - j) on and
    below the diagonal, gamma_h = 1 - 2^(-5 - h) and the decay matrix built from arange differences
    as the paper's code does."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.d = heads, dim // heads
        self.qkv, self.o = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def decay(self, n: int) -> torch.Tensor:
        gamma = 1 - torch.exp2(-5 - torch.arange(self.heads, dtype=torch.float32))
        i = torch.arange(n)
        dist = (i[:, None] - i[None, :]).float()
        mask = torch.pow(gamma.view(-1, 1, 1), dist.clamp(min=0))
        return mask.masked_fill(dist < 0, 0.0)  # [H, N, N]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        retention = (q @ k.transpose(-1, -2)) * self.d**-0.5 * self.decay(x.shape[1]).to(x.dtype)
        return self.o(merge_heads(retention @ v))

    @staticmethod
    def make(n: int = 16, dim: int = 32, heads: int = 4) -> tuple[nn.Module, tuple]:
        return RetentionLayer(dim, heads).eval(), (torch.randn(2, n, dim),)


class PerformerLayer(nn.Module):
    """Already linear (Performer-like): positive random features, kv = einsum(k, v) and the normaliser
    q . sum(k), in einsum spellings with the heads on axis 2."""

    def __init__(self, dim: int = 32, heads: int = 4, features: int = 16) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.o = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.register_buffer("proj", torch.randn(dim // heads, features) / math.sqrt(dim // heads))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(x @ self.proj - x.pow(2).sum(-1, keepdim=True) / 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (t.view(b, n, self.heads, -1) for t in self.qkv(x).chunk(3, dim=-1))
        q, k = self.features(q), self.features(k)
        kv = torch.einsum("bnhd,bnhe->bhde", k, v)
        z = 1.0 / (torch.einsum("bnhd,bhd->bnh", q, k.sum(dim=1)) + 1e-6)
        out = torch.einsum("bnhd,bhde->bnhe", q, kv) * z.unsqueeze(-1)
        return self.o(out.reshape(b, n, -1))

    @staticmethod
    def make(n: int = 16, dim: int = 32, heads: int = 4) -> tuple[nn.Module, tuple]:
        return PerformerLayer(dim, heads).eval(), (torch.randn(2, n, dim),)


def make_linear_transformer_at(n: int) -> tuple[nn.Module, tuple]:
    """The elu + 1 layer at sequence length n, d = 32 per head (4 heads), batch 1."""
    return LinearTransformerLayer(128, 4).eval(), (torch.randn(1, n, 128),)


def make_causal_linear_at(n: int) -> tuple[nn.Module, tuple]:
    """The causal relu layer at sequence length n, d = 32 per head (4 heads), batch 1."""
    return CausalLinearLayer(128, 4).eval(), (torch.randn(1, n, 128),)


def make_linear_transformer() -> tuple[nn.Module, tuple]:
    """Demo size: the elu + 1 layer at N = 1024 (the test-sized `make()` is too small to gain from fusing)."""
    torch.manual_seed(0)
    return make_linear_transformer_at(1024)


MODELS = (LinearTransformerLayer, CausalLinearLayer, RetentionLayer, PerformerLayer)
