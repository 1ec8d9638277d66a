"""`fxfuse::selective_scan`: the re-rolled recurrence of selective state-space models (Mamba) as one op.

Importing this package registers the op; `selective_scan` below is its Python entry point.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fxfuse.fusion.ssm_scan.op import check_inputs, scan_backend, selective_scan_op
from fxfuse.fusion.ssm_scan.reference import selective_scan_reference

__all__ = ["scan_backend", "selective_scan", "selective_scan_op", "selective_scan_reference"]


def selective_scan(
    dt: Tensor, A: Tensor, x: Tensor, B: Tensor, C: Tensor, h0: Tensor | None = None, backend: str = "auto",
    D: Tensor | None = None, z: Tensor | None = None, u: Tensor | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The selective scan with discretization, D skip and gate fused: [B, D, L, N] is never materialized.

    dt, x [B, D, L]; A [D, N]; B, C [B, L, N]; h0 [B, D, N] or None (zeros); D [D], z, u [B, D, L] or None.
    h_t = exp(dt_t * A) * h_{t-1} + x_t * B_t;  y_t = (sum_n h_t * C_t + u_t * D) * silu(z_t)
    (Mamba: dt = softplus(Δ), x = Δ * u.) Without D there is no skip, without z no gate; u defaults to x.
    Returns y [B, D, L] and the last state [B, D, N] in float32 (float64 for float64 inputs). backend:
    "auto", "triton", "cpu" or "reference"; `scan_backend` tells which one runs. Gradients flow to every input.
    """
    check_inputs(dt, A, x, B, C, h0, D, z, u)
    return torch.ops.fxfuse.selective_scan(dt, A, x, B, C, h0, backend, D, z, u)
