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
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    u: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dt, x [Bt, D, L]; A [D, N]; B, C [Bt, L, N]; h0 [Bt, D, N] or None (zeros); D [D], z, u [Bt, D, L]
    or None.

    h_t = exp(dt_t * A) * h_{t-1} + x_t * B_t   (per batch b, channel d, state n)
    y_t = sum_n h_t * C_t, then y_t + u_t * D (u defaults to x) when D is given, times silu(z_t) when z is
    Returns y [Bt, D, L] and the last state h_{L-1} [Bt, D, N], both in the state dtype.
    """
    dtype = state_dtype(dt, A, x, B, C, h0, D, z, u)
    skip = x if u is None else u
    dt, A, x, B, C = (t.to(dtype) for t in (dt, A, x, B, C))
    batch, channels, length = dt.shape
    h = h0.to(dtype) if h0 is not None else dt.new_zeros(batch, channels, A.shape[-1])
    ys = []
    for t in range(length):
        h = torch.exp(dt[:, :, t, None] * A) * h + x[:, :, t, None] * B[:, None, t, :]
        ys.append((h * C[:, None, t, :]).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else dt.new_zeros(batch, channels, 0)
    return skip_and_gate(y, skip, D, z), h


def skip_and_gate(y: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None) -> torch.Tensor:
    """(y + u * D[:, None]) * silu(z) in y's dtype, each part only where given: y, u, z [Bt, D, L]; D [D]."""
    if D is not None:
        y = y + u.to(y.dtype) * D.to(y.dtype)[:, None]
    if z is not None:
        y = y * torch.nn.functional.silu(z.to(y.dtype))
    return y


def skip_and_gate_backward(
    gout: torch.Tensor, y: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """For gout, the gradient of `skip_and_gate(y, u, D, z)`, and the scan's readout y: (gy, dD, dz, du) in
    y's dtype (None for an absent part)."""
    skipped = y + u.to(y.dtype) * D.to(y.dtype)[:, None] if D is not None else y
    gy, dz = gout, None
    if z is not None:
        zs = z.to(y.dtype)
        sig = torch.sigmoid(zs)
        gy = gout * zs * sig
        dz = gout * skipped * sig * (1 + zs * (1 - sig))
    if D is None:
        return gy, None, dz, None
    return gy, (gy * u.to(y.dtype)).sum((0, 2)), dz, gy * D.to(y.dtype)[:, None]


def selective_scan_reference_backward(
    gy: torch.Tensor,
    gh: torch.Tensor | None,
    dt: torch.Tensor,
    A: torch.Tensor,
    x: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    h0: torch.Tensor | None = None,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    u: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of `selective_scan_reference` for output gradients gy [Bt, D, L] and gh [Bt, D, N] (or
    None): (d dt, dA, dx, dB, dC, dh0, dD, dz, du) in the state dtype, None for an absent D, z or u (the
    skip's gradient goes to dx when u is None). The states are recomputed, then time runs backwards:
    g_t = g_{t+1} * a_{t+1} + gy_t * C_t is the gradient reaching h_t."""
    dtype = state_dtype(dt, A, x, B, C, h0, D, z, u)
    tail = (None, None, None)
    if D is not None or z is not None:
        y, _ = selective_scan_reference(dt, A, x, B, C, h0)
        gy, *tail = skip_and_gate_backward(gy.to(dtype), y, x if u is None else u, D, z)
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
    dD, dz, du = tail
    if du is not None and u is None:
        dx, du = dx + du, None
    return ddt, dA, dx, dB, dC, g, dD, dz, du
