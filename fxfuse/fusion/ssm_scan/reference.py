"""Plain-PyTorch selective scan: the test oracle and the fallback of `fxfuse::selective_scan`.

One step at a time, as the models spell it, in float32 (float64 inputs stay float64): short enough to be
obviously right, and what every kernel is compared with, forward and backward.
"""

from __future__ import annotations

import torch


def state_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the state is kept in: float32, or float64 when an input is float64."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def selective_scan_reference(
    dt: torch.Tensor,
    A: torch.Tensor,
    x: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    h0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dt, x [Bt, D, L]; A [D, N]; B, C [Bt, L, N]; h0 [Bt, D, N] or None (zeros).

    h_t = exp(dt_t * A) * h_{t-1} + x_t * B_t   (per batch b, channel d, state n)
    y_t = sum_n h_t * C_t
    Returns y [Bt, D, L] and the last state h_{L-1} [Bt, D, N], both in the state dtype.
    """
    dtype = state_dtype(dt, A, x, B, C, h0)
    dt, A, x, B, C = (t.to(dtype) for t in (dt, A, x, B, C))
    batch, channels, length = dt.shape
    h = h0.to(dtype) if h0 is not None else dt.new_zeros(batch, channels, A.shape[-1])
    ys = []
    for t in range(length):
        h = torch.exp(dt[:, :, t, None] * A) * h + x[:, :, t, None] * B[:, None, t, :]
        ys.append((h * C[:, None, t, :]).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else dt.new_zeros(batch, channels, 0)
    return y, h
