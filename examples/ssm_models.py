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


def make_mamba_block_128() -> tuple[nn.Module, tuple]:
    """Demo size: the block's loop over 128 steps (at the default 16, the fused scan's fixed cost dominates)."""
    return make_mamba_block(128)


def make_mamba_model(length: int = 16, batch: int = 2, layers: int = 2) -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    return MambaModel(layers).eval(), (torch.randn(batch, length, 16),)


class SlowForwardScan(nn.Module):
    """The scan as Hugging Face's `MambaMixer.slow_forward` spells it: time on dim 2, [B, D, L, N] factors
    built before the loop, a float32 state, a matmul readout stacked on the last dim, the state returned.

    u, delta [B, D, L], B, C [B, L, N] -> (y [B, D, L], last state [B, D, N]); A = -exp(A_log) [D, N].
    """

    def __init__(self, channels: int = 8, d_state: int = 4) -> None:
        super().__init__()
        self.A_log = nn.Parameter(torch.randn(channels, d_state) * 0.5)
        self.D = nn.Parameter(torch.randn(channels))

    def forward(self, u, delta, B, C):
        A = -torch.exp(self.A_log.float())
        delta = F.softplus(delta)
        discrete_A = torch.exp(A[None, :, None, :] * delta[:, :, :, None])
        discrete_B = delta[:, :, :, None] * B[:, None, :, :].float()
        deltaB_u = discrete_B * u[:, :, :, None].float()
        state = torch.zeros(u.shape[0], u.shape[1], A.shape[-1], dtype=u.dtype, device=u.device)
        outputs = []
        for i in range(u.shape[2]):
            state = discrete_A[:, :, i, :] * state + deltaB_u[:, :, i, :]
            outputs.append(torch.matmul(state.to(u.dtype), C[:, i, :].unsqueeze(-1))[:, :, 0])
        y = torch.stack(outputs, dim=-1)
        return y + u * self.D[None, :, None], state


class InLoopScan(nn.Module):
    """Discretization inside the loop, a sum readout, outputs concatenated along time, an initial state.

    u, delta [B, L, D], B, C [B, L, N], h0 [B, D, N] -> y [B, L, D].
    """

    def __init__(self, channels: int = 8, d_state: int = 4) -> None:
        super().__init__()
        self.A_log = nn.Parameter(torch.randn(channels, d_state) * 0.5)

    def forward(self, u, delta, B, C, h0):
        A = -torch.exp(self.A_log)
        delta = F.softplus(delta)
        h = h0
        ys = []
        for t in range(u.shape[1]):
            dA = torch.exp(delta[:, t].unsqueeze(-1) * A)
            dBu = (delta[:, t] * u[:, t]).unsqueeze(-1) * B[:, t].unsqueeze(1)
            h = dA * h + dBu
            ys.append((h * C[:, t].unsqueeze(1)).sum(-1).unsqueeze(1))
        return torch.cat(ys, dim=1)


class SelectiveScanRef(nn.Module):
    """The scan as mamba_ssm's `selective_scan_ref` spells it: B, C [B, N, L] (state before time), einsum
    discretization and readout, the last state kept inside the loop, stacked on dim 2.

    u, delta [B, D, L], B, C [B, N, L] -> (y [B, D, L], last state [B, D, N]).
    """

    def __init__(self, channels: int = 8, d_state: int = 4) -> None:
        super().__init__()
        self.A = nn.Parameter(-torch.rand(channels, d_state) - 0.5)
        self.D = nn.Parameter(torch.randn(channels))

    def forward(self, u, delta, B, C):
        delta = F.softplus(delta)
        delta_a = torch.exp(torch.einsum("bdl,dn->bdln", delta, self.A))
        delta_bu = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
        x = u.new_zeros((u.shape[0], self.A.shape[0], self.A.shape[1]))
        ys = []
        for i in range(u.shape[2]):
            x = delta_a[:, :, i] * x + delta_bu[:, :, i]
            ys.append(torch.einsum("bdn,bn->bd", x, C[:, :, i]))
            if i == u.shape[2] - 1:
                last_state = x
        return torch.stack(ys, dim=2) + u * self.D[:, None], last_state


class LRULoop(nn.Module):
    """An LRU-style linear recurrent layer in its recurrent form: a constant diagonal decay
    a = exp(-exp(ν)) (real state), the input projected per step, a linear readout, the final state returned.

    x [B, L, d_in], h0 [B, N] -> (y [B, L, d_out], last state [B, N]).
    """

    def __init__(self, d_in: int = 6, d_state: int = 8, d_out: int = 5) -> None:
        super().__init__()
        self.nu_log = nn.Parameter(torch.randn(d_state) * 0.5 - 1.0)
        self.B = nn.Parameter(torch.randn(d_in, d_state) / math.sqrt(d_in))
        self.C = nn.Parameter(torch.randn(d_state, d_out) / math.sqrt(d_state))

    def forward(self, x, h0):
        a = torch.exp(-torch.exp(self.nu_log))
        h = h0
        ys = []
        for t in range(x.shape[1]):
            h = a * h + x[:, t] @ self.B
            ys.append(h @ self.C)
        return torch.stack(ys, dim=1), h


def make_lru_loop(length: int = 16) -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    return LRULoop().eval(), (torch.randn(2, length, 6), torch.randn(2, 8))


def scan_inputs(length: int, layout: str = "bdl", batch: int = 2, channels: int = 8, d_state: int = 4) -> tuple:
    """(u, delta, B, C) with u, delta in `layout` ("bdl" or "bld") and B, C [B, L, N]."""
    shape = (batch, channels, length) if layout == "bdl" else (batch, length, channels)
    return (
        torch.randn(shape),
        torch.randn(shape),
        torch.randn(batch, length, d_state),
        torch.randn(batch, length, d_state),
    )


def make_slow_forward_scan(length: int = 16) -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    return SlowForwardScan().eval(), scan_inputs(length)


def make_in_loop_scan(length: int = 16) -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    return InLoopScan().eval(), (*scan_inputs(length, "bld"), torch.randn(2, 8, 4))


def make_selective_scan_ref(length: int = 16) -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    u, delta, B, C = scan_inputs(length)
    return SelectiveScanRef().eval(), (u, delta, B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous())


MODELS = {
    "mamba_block": make_mamba_block,
    "mamba_model": make_mamba_model,
    "slow_forward_scan": make_slow_forward_scan,
    "in_loop_scan": make_in_loop_scan,
    "selective_scan_ref": make_selective_scan_ref,
    "lru_loop": make_lru_loop,
}
