"""The selective scan as people write it (a Python loop over time) against `fxfuse::selective_scan`.

`scan_cases()` is what the benchmark harness (fxfuse/bench) imports: (name, eager_fn, fused_fn, inputs).
The eager side is the whole scan of a Mamba layer as mamba-minimal spells it: discretization into
[B, D, L, N] factors, then L steps of state update and readout; the fused side reads Δ, A, B, C, u and
never materializes [B, D, L, N].
"""

from __future__ import annotations

import torch

from fxfuse.fusion.ssm_scan import selective_scan

SHAPE = (2, 512, 1024, 16)  # [B, D, L, N]: a small Mamba layer over 1k tokens (the target size)
QUICK_SHAPE = (1, 256, 512, 16)  # ~1/8 of the work, same per-step structure (the quick suite runs both)


def eager_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """u, delta [B, D, L], A [D, N], B, C [B, L, N] -> y [B, D, L], one step at a time."""
    delta_a = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    delta_bu = torch.einsum("bdl,bln,bdl->bdln", delta, B, u)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        h = delta_a[:, :, t] * h + delta_bu[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, t]))
    return torch.stack(ys, dim=-1)


def fused_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    return selective_scan(delta, A, delta * u, B, C)[0]


def scan_inputs(shape: tuple[int, int, int, int] = SHAPE, device: str = "cpu") -> list[torch.Tensor]:
    """Trained-model ranges: Δ = softplus(.) > 0, A = -exp(.) < 0."""
    b, d, length, n = shape
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(b, d, length, generator=gen)
    delta = torch.nn.functional.softplus(torch.randn(b, d, length, generator=gen) - 2.0)
    A = -torch.exp(torch.randn(d, n, generator=gen) * 0.5)
    B, C = torch.randn(b, length, n, generator=gen), torch.randn(b, length, n, generator=gen)
    return [t.to(device) for t in (u, delta, A, B, C)]


def scan_cases(
    shapes: tuple[tuple[int, int, int, int], ...] = (SHAPE, QUICK_SHAPE), device: str = "cpu"
) -> list[tuple]:
    """(name, eager_fn, fused_fn, inputs) per shape; the name is "BxDxLxN"."""
    return [("x".join(map(str, s)), eager_scan, fused_scan, scan_inputs(s, device)) for s in shapes]
