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


def selective_scan_reference_backward(
    gy: torch.Tensor,
    gh: torch.Tensor | None,
    dt: torch.Tensor,
    A: torch.Tensor,
    x: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    h0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Gradients of `selective_scan_reference` for output gradients gy [Bt, D, L] and gh [Bt, D, N] (or
    None): (d dt, dA, dx, dB, dC, dh0) in the state dtype. The states are recomputed, then time runs
    backwards: g_t = g_{t+1} * a_{t+1} + gy_t * C_t is the gradient reaching h_t."""
    dtype = state_dtype(dt, A, x, B, C, h0)
    gy, dt, A, x, B, C = (t.to(dtype) for t in (gy, dt, A, x, B, C))
    batch, channels, length = dt.shape
    states = [h0.to(dtype) if h0 is not None else dt.new_zeros(batch, channels, A.shape[-1])]
    decays = []
    for t in range(length):
        decays.append(torch.exp(dt[:, :, t, None] * A))
        states.append(decays[t] * states[t] + x[:, :, t, None] * B[:, None, t, :])
    g = gh.to(dtype) if gh is not None else torch.zeros_like(states[0])
    ddt, dx, dA = torch.zeros_like(dt), torch.zeros_like(x), torch.zeros_like(A)
    dB, dC = torch.zeros_like(B), torch.zeros_like(C)
    for t in reversed(range(length)):
        g = g + gy[:, :, t, None] * C[:, None, t, :]
        dC[:, t] = (gy[:, :, t, None] * states[t + 1]).sum(1)
        dx[:, :, t] = (g * B[:, None, t, :]).sum(-1)
        dB[:, t] = (g * x[:, :, t, None]).sum(1)
        through_decay = g * states[t] * decays[t]  # d/du of exp(u) * h_{t-1}, u = dt_t * A
        ddt[:, :, t] = (through_decay * A).sum(-1)
        dA += (through_decay * dt[:, :, t, None]).sum(0)
        g = g * decays[t]
    return ddt, dA, dx, dB, dC, g
