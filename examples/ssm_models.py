"""Example state-space models with the recurrence written as a Python loop over time, as research code
spells it (mamba-minimal, Hugging Face's `MambaMixer.slow_forward`, LRU). Capture unrolls the loop.

Each `make_*()` returns (model in eval mode, example_inputs tuple) for the demo, tests and benchmarks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MambaBlock(nn.Module):
    """A Mamba-style block: in-projection, causal depthwise conv, input-dependent (selective) scan, gate.

    x [B, L, d_model] -> [B, L, d_model]. The scan keeps time on dim 1 and reads out with an einsum.
    """

    def __init__(self, d_model: int = 16, d_state: int = 8, expand: int = 2, d_conv: int = 4) -> None:
        super().__init__()
        d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16)
        self.d_state = d_state
        self.in_proj = nn.Linear(d_model, 2 * d_inner)
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        x, z = self.in_proj(x).chunk(2, dim=-1)
        x = F.silu(self.conv1d(x.transpose(1, 2))[..., :length].transpose(1, 2))
        A = -torch.exp(self.A_log)
        delta, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(delta))
        y = self.selective_scan(x, delta, A, B, C)
        return self.out_proj((y + x * self.D) * F.silu(z))

    @staticmethod
    def selective_scan(u, delta, A, B, C):
        """u, delta [B, L, D], A [D, N], B, C [B, L, N] -> y [B, L, D]."""
        delta_a = torch.exp(torch.einsum("bld,dn->bldn", delta, A))
        delta_bu = torch.einsum("bld,bln,bld->bldn", delta, B, u)
        h = torch.zeros(u.shape[0], u.shape[2], A.shape[1], device=u.device, dtype=u.dtype)
        ys = []
        for i in range(u.shape[1]):
            h = delta_a[:, i] * h + delta_bu[:, i]
            ys.append(torch.einsum("bdn,bn->bd", h, C[:, i, :]))
        return torch.stack(ys, dim=1)


class MambaModel(nn.Module):
    """Embedding-free stack of residual, RMS-normed Mamba-style blocks: x [B, L, d_model] -> same."""

    def __init__(self, layers: int = 2, d_model: int = 16, d_state: int = 8) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.RMSNorm(d_model) for _ in range(layers))
        self.blocks = nn.ModuleList(MambaBlock(d_model, d_state) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, block in zip(self.norms, self.blocks):
            x = x + block(norm(x))
        return x


def make_mamba_block(length: int = 16, batch: int = 2, d_model: int = 16) -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    return MambaBlock(d_model).eval(), (torch.randn(batch, length, d_model),)


def make_mamba_model(length: int = 16, batch: int = 2, layers: int = 2) -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    return MambaModel(layers).eval(), (torch.randn(batch, length, 16),)
