"""Linear Recurrent Units (Orvieto et al. 2023, "Resurrecting Recurrent Neural Networks for Long
Sequences") in their recurrent form, as people write them in PyTorch: a complex diagonal decay
λ = exp(-exp(ν) + i·exp(θ)), a γ-normalised complex input projection, y = Re(C h) + D x.

Two spellings of the same layer: with torch complex tensors (`ComplexLRU`), and with the state split into
two real tensors updated by the cross terms of the complex multiply (`SplitLRU`). `LRUStack` puts layers
in a residual network. Every module takes x [B, L, d_model].
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ComplexLRU(nn.Module):
    """x [B, L, d_in] (, h0 [B, N] complex) -> (y [B, L, d_out], last state [B, N] complex)."""

    def __init__(self, d_in: int = 6, d_state: int = 8, d_out: int = 5, r_min: float = 0.4, r_max: float = 0.99,
                 max_phase: float = 6.28) -> None:  # fmt: skip
        super().__init__()
        u1, u2 = torch.rand(d_state), torch.rand(d_state)
        # |λ| uniform on the ring [r_min, r_max], phase in [0, max_phase] (the paper's initialisation)
        self.nu_log = nn.Parameter(torch.log(-0.5 * torch.log(u1 * (r_max**2 - r_min**2) + r_min**2)))
        self.theta_log = nn.Parameter(torch.log(max_phase * u2))
        modulus = torch.exp(-torch.exp(self.nu_log.detach()))
        self.gamma_log = nn.Parameter(torch.log(torch.sqrt(1 - modulus**2)))
        self.B_re = nn.Parameter(torch.randn(d_state, d_in) / math.sqrt(2 * d_in))
        self.B_im = nn.Parameter(torch.randn(d_state, d_in) / math.sqrt(2 * d_in))
        self.C_re = nn.Parameter(torch.randn(d_out, d_state) / math.sqrt(d_state))
        self.C_im = nn.Parameter(torch.randn(d_out, d_state) / math.sqrt(d_state))
        self.D = nn.Parameter(torch.randn(d_out, d_in) / math.sqrt(d_in))

    def forward(self, x, h0=None):
        lam = torch.exp(-torch.exp(self.nu_log) + 1j * torch.exp(self.theta_log))
        B = torch.complex(self.B_re, self.B_im) * torch.exp(self.gamma_log)[:, None]
        C = torch.complex(self.C_re, self.C_im)
        h = torch.zeros(x.shape[0], lam.shape[0], dtype=B.dtype) if h0 is None else h0
        ys = []
        for t in range(x.shape[1]):
            h = lam * h + x[:, t].to(B.dtype) @ B.T
            ys.append((h @ C.T).real + x[:, t] @ self.D.T)
        return torch.stack(ys, dim=1), h


class SplitLRU(ComplexLRU):
    """The same layer with real tensors only: h_re, h_im carried, the input projected before the loop.
    x [B, L, d_in] -> (y [B, L, d_out], h_re [B, N], h_im [B, N])."""

    def forward(self, x):
        modulus, phase = torch.exp(-torch.exp(self.nu_log)), torch.exp(self.theta_log)
        lam_re, lam_im = modulus * torch.cos(phase), modulus * torch.sin(phase)
        gamma = torch.exp(self.gamma_log)
        u_re, u_im = (x @ self.B_re.T) * gamma, (x @ self.B_im.T) * gamma
        h_re = h_im = x.new_zeros(x.shape[0], self.nu_log.shape[0])
        ys = []
        for t in range(x.shape[1]):
            h_re, h_im = lam_re * h_re - lam_im * h_im + u_re[:, t], lam_re * h_im + lam_im * h_re + u_im[:, t]
            ys.append(h_re @ self.C_re.T - h_im @ self.C_im.T + x[:, t] @ self.D.T)
        return torch.stack(ys, dim=1), h_re, h_im


class LRUStack(nn.Module):
    """Residual LRU layers, each followed by a GELU MLP: x [B, L, d] -> [B, L, d]."""

    def __init__(self, layers: int = 2, d_model: int = 6, d_state: int = 8) -> None:
        super().__init__()
        self.lrus = nn.ModuleList(ComplexLRU(d_model, d_state, d_model) for _ in range(layers))
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, 2 * d_model), nn.GELU(),
                          nn.Linear(2 * d_model, d_model))
            for _ in range(layers)
        )  # fmt: skip

    def forward(self, x):
        for lru, mlp in zip(self.lrus, self.mlps):
            x = x + lru(x)[0]
            x = x + mlp(x)
        return x


def make_complex_lru(length: int = 16) -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    return ComplexLRU().eval(), (torch.randn(2, length, 6),)


def make_split_lru(length: int = 16) -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    return SplitLRU().eval(), (torch.randn(2, length, 6),)


def make_lru_stack(length: int = 16) -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    return LRUStack().eval(), (torch.randn(2, length, 6),)


MODELS = {"complex_lru": make_complex_lru, "split_lru": make_split_lru, "lru_stack": make_lru_stack}
