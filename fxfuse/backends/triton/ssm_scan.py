"""Triton kernel of `fxfuse::selective_scan` (forward): a chunked parallel scan, one program per (batch, channel).

Each program walks time in chunks of BLOCK_L steps. Inside a chunk it builds the decays exp(dt_t * A) and
inputs x_t * B_t as a [BLOCK_L, N] tile (never [B, D, L, N] in memory), scans them in parallel with
`tl.associative_scan` over the linear-recurrence combine (a1, b1) ∘ (a2, b2) = (a1 a2, a2 b1 + b2), applies
the state carried in from the previous chunk, reads out y_t = Σ_n h_t C_t, and carries the chunk's last
state on. Chunk tails are padded with the identity (dt = 0 -> a = 1, x = 0 -> b = 0), so the tile's last row
is the last real state. The state is float32 whatever the input dtype. The Mamba block's D skip and silu
gate, y = (y + u * D) * silu(z), are applied to the chunk's readout before it is stored.

The backward walks the chunks last to first. It recomputes each chunk's states from the chunk-start state
the forward kernel saved ([B, D, L / BLOCK_L, N], not [B, D, L, N]), runs the gradient recurrence
g_t = a_{t+1} g_{t+1} + gy_t C_t as a forward scan over the flipped tile, and accumulates dB, dC (summed
over channels) and dA (summed over batch) with atomic adds. With a skip or gate it recomputes the readout
from the states and takes gy through the gate and the skip first (dz, du; dD per row, summed by the launcher).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _combine(a1, b1, a2, b2):
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _sigmoid(v):
    return 1.0 / (1.0 + tl.exp(-v))


@triton.jit
def _selective_scan_kernel(
    dt_ptr, A_ptr, x_ptr, B_ptr, C_ptr, h0_ptr, y_ptr, h_ptr, Dv_ptr, z_ptr, u_ptr,
    D, L, N,
    starts_ptr, HAS_H0: tl.constexpr, SAVE_STARTS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)  # b * D + d
    b, d = row // D, row % D
    n = tl.arange(0, BLOCK_N)
    steps = tl.arange(0, BLOCK_L)
    n_ok = n < N
    a_row = tl.load(A_ptr + d * N + n, mask=n_ok, other=0.0).to(tl.float32)
    if HAS_H0:
        h = tl.load(h0_ptr + row.to(tl.int64) * N + n, mask=n_ok, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BLOCK_N], dtype=tl.float32)
    seq = row.to(tl.int64) * L
    bc = b.to(tl.int64) * L * N
    chunks = tl.cdiv(L, BLOCK_L)
    for t0 in range(0, L, BLOCK_L):
        if SAVE_STARTS:
            tl.store(starts_ptr + (row.to(tl.int64) * chunks + t0 // BLOCK_L) * N + n, h, mask=n_ok)
        t = t0 + steps
        t_ok = t < L
        dt = tl.load(dt_ptr + seq + t, mask=t_ok, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + seq + t, mask=t_ok, other=0.0).to(tl.float32)
        tile = bc + t[:, None] * N + n[None, :]
        ok = t_ok[:, None] & n_ok[None, :]
        Bt = tl.load(B_ptr + tile, mask=ok, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + tile, mask=ok, other=0.0).to(tl.float32)
        decay = tl.exp(dt[:, None] * a_row[None, :])
        inp = x[:, None] * Bt
        acc_a, acc_b = tl.associative_scan((decay, inp), axis=0, combine_fn=_combine)
        states = acc_a * h[None, :] + acc_b
        y = tl.sum(states * Ct, axis=1)
        if HAS_D:
            y += tl.load(u_ptr + seq + t, mask=t_ok, other=0.0).to(tl.float32) * tl.load(Dv_ptr + d).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + seq + t, mask=t_ok, other=0.0).to(tl.float32)
            y *= z * _sigmoid(z)
        tl.store(y_ptr + seq + t, y, mask=t_ok)
        h = tl.sum(tl.where(steps[:, None] == BLOCK_L - 1, states, 0.0), axis=0)
    tl.store(h_ptr + row.to(tl.int64) * N + n, h, mask=n_ok)


@triton.jit
def _selective_scan_bwd_kernel(
    gy_ptr, gh_ptr, dt_ptr, A_ptr, x_ptr, B_ptr, C_ptr, starts_ptr, Dv_ptr, z_ptr, u_ptr,
    ddt_ptr, dA_ptr, dx_ptr, dB_ptr, dC_ptr, dh0_ptr, dz_ptr, du_ptr, dD_ptr,
    D, L, N,
    HAS_GH: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    b, d = row // D, row % D
    n = tl.arange(0, BLOCK_N)
    steps = tl.arange(0, BLOCK_L)
    n_ok = n < N
    a_row = tl.load(A_ptr + d * N + n, mask=n_ok, other=0.0).to(tl.float32)
    if HAS_GH:
        g = tl.load(gh_ptr + row.to(tl.int64) * N + n, mask=n_ok, other=0.0).to(tl.float32)
    else:
        g = tl.zeros([BLOCK_N], dtype=tl.float32)
    seq = row.to(tl.int64) * L
    bc = b.to(tl.int64) * L * N
    chunks = tl.cdiv(L, BLOCK_L)
    dA_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    dD_acc = tl.zeros([BLOCK_L], dtype=tl.float32)
    for back in range(0, chunks):
        c = chunks - 1 - back
        t0 = c * BLOCK_L
        t = t0 + steps
        t_ok = t < L
        ok = t_ok[:, None] & n_ok[None, :]
        tile = bc + t[:, None] * N + n[None, :]
        dt = tl.load(dt_ptr + seq + t, mask=t_ok, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + seq + t, mask=t_ok, other=0.0).to(tl.float32)
        gy = tl.load(gy_ptr + seq + t, mask=t_ok, other=0.0).to(tl.float32)
        Bt = tl.load(B_ptr + tile, mask=ok, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + tile, mask=ok, other=0.0).to(tl.float32)
        start = tl.load(starts_ptr + (row.to(tl.int64) * chunks + c) * N + n, mask=n_ok, other=0.0)
        decay = tl.exp(dt[:, None] * a_row[None, :])
        acc_a, acc_b = tl.associative_scan((decay, x[:, None] * Bt), axis=0, combine_fn=_combine)
        states = acc_a * start[None, :] + acc_b
        if HAS_D:
            u = tl.load(u_ptr + seq + t, mask=t_ok, other=0.0).to(tl.float32)
            D_d = tl.load(Dv_ptr + d).to(tl.float32)
        if HAS_Z:  # through the gate: d/dy of y * silu(z), and d/dz with y the skipped readout
            z = tl.load(z_ptr + seq + t, mask=t_ok, other=0.0).to(tl.float32)
            sig = _sigmoid(z)
            y = tl.sum(states * Ct, axis=1)
            if HAS_D:
                y += u * D_d
            tl.store(dz_ptr + seq + t, gy * y * sig * (1.0 + z * (1.0 - sig)), mask=t_ok)
            gy = gy * z * sig
        if HAS_D:
            tl.store(du_ptr + seq + t, gy * D_d, mask=t_ok)
            dD_acc += gy * u
        # h_{t-1}: the same scan over the inputs shifted one step later, the chunk start in row 0
        prev_ok = (steps >= 1) & t_ok
        dt_p = tl.load(dt_ptr + seq + t - 1, mask=prev_ok, other=0.0).to(tl.float32)
        x_p = tl.load(x_ptr + seq + t - 1, mask=prev_ok, other=0.0).to(tl.float32)
        B_p = tl.load(B_ptr + tile - N, mask=prev_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        pa, pb = tl.associative_scan((tl.exp(dt_p[:, None] * a_row[None, :]), x_p[:, None] * B_p), axis=0,
                                     combine_fn=_combine)  # fmt: skip
        prev = pa * start[None, :] + pb
        # g_t = a_{t+1} g_{t+1} + gy_t C_t, with the gradient flowing in from the next chunk on the last row
        next_ok = (steps < BLOCK_L - 1) & (t + 1 < L)
        dt_n = tl.load(dt_ptr + seq + t + 1, mask=next_ok, other=0.0).to(tl.float32)
        alpha = tl.exp(dt_n[:, None] * a_row[None, :])
        last = steps[:, None] == BLOCK_L - 1
        beta = gy[:, None] * Ct + tl.where(last, g[None, :], 0.0)
        ga, gb = tl.associative_scan((tl.flip(alpha, 0), tl.flip(beta, 0)), axis=0, combine_fn=_combine)
        grads = tl.where(ok, tl.flip(gb, 0), 0.0)
        through = grads * prev * decay  # d/du of exp(u) * h_{t-1}, u = dt_t * A
        tl.store(dx_ptr + seq + t, tl.sum(grads * Bt, axis=1), mask=t_ok)
        tl.store(ddt_ptr + seq + t, tl.sum(through * a_row[None, :], axis=1), mask=t_ok)
        tl.atomic_add(dB_ptr + tile, grads * x[:, None], mask=ok)
        tl.atomic_add(dC_ptr + tile, gy[:, None] * states, mask=ok)
        dA_acc += tl.sum(through * dt[:, None], axis=0)
        g = tl.sum(tl.where(steps[:, None] == 0, grads * decay, 0.0), axis=0)  # a_{t0} g_{t0}: into the chunk before
    tl.atomic_add(dA_ptr + d * N + n, dA_acc, mask=n_ok)
    tl.store(dh0_ptr + row.to(tl.int64) * N + n, g, mask=n_ok)
    if HAS_D:
        tl.store(dD_ptr + row, tl.sum(dD_acc, axis=0))


def _blocks(length: int, nstate: int) -> tuple[int, int]:
    block_n = triton.next_power_of_2(max(nstate, 2))
    return max(16, min(64, 4096 // block_n, triton.next_power_of_2(length))), block_n


def selective_scan_triton_backward(
    gy: torch.Tensor, gh: torch.Tensor | None, dt: torch.Tensor, A: torch.Tensor, x: torch.Tensor,
    B: torch.Tensor, C: torch.Tensor, h0: torch.Tensor | None, D: torch.Tensor | None = None,
    z: torch.Tensor | None = None, u: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, ...]:  # fmt: skip
    """(d dt, dA, dx, dB, dC, dh0, dD, dz, du) in float32 for output gradients gy [Bt, D, L] and gh [Bt, D, N]
    (or None); None for an absent D, z or u (the skip's gradient goes to dx when u is None)."""
    gy, dt, A, x, B, C = (t.contiguous() for t in (gy, dt, A, x, B, C))
    D, z, skip = (t.contiguous() if t is not None else None for t in (D, z, x if u is None else u))
    batch, channels, length = dt.shape
    nstate = A.shape[1]
    block_l, block_n = _blocks(length, nstate)
    starts = torch.empty(batch * channels, triton.cdiv(length, block_l), nstate, device=dt.device)
    _, _ = selective_scan_triton(dt, A, x, B, C, h0, starts)
    f32 = dict(device=dt.device, dtype=torch.float32)
    ddt, dx = torch.empty(batch, channels, length, **f32), torch.empty(batch, channels, length, **f32)
    dA, dB, dC = (
        torch.zeros(channels, nstate, **f32),
        torch.zeros(batch, length, nstate, **f32),
        torch.zeros(batch, length, nstate, **f32),
    )
    dh0 = torch.empty(batch, channels, nstate, **f32)
    dz = torch.empty(batch, channels, length, **f32) if z is not None else None
    du, d_rows = (torch.empty_like(ddt), torch.empty(batch, channels, **f32)) if D is not None else (None, None)
    ghc = gh.contiguous() if gh is not None else dh0
    _selective_scan_bwd_kernel[(batch * channels,)](
        gy, ghc, dt, A, x, B, C, starts, *(t if t is not None else dh0 for t in (D, z, skip)),
        ddt, dA, dx, dB, dC, dh0, *(t if t is not None else dh0 for t in (dz, du, d_rows)), channels, length, nstate,
        HAS_GH=gh is not None, HAS_D=D is not None, HAS_Z=z is not None, BLOCK_L=block_l, BLOCK_N=block_n,
    )  # fmt: skip
    if du is not None and u is None:
        dx += du
        du = None
    return ddt, dA, dx, dB, dC, dh0, None if D is None else d_rows.sum(0), dz, du


def selective_scan_triton(
    dt: torch.Tensor, A: torch.Tensor, x: torch.Tensor, B: torch.Tensor, C: torch.Tensor, h0: torch.Tensor | None,
    starts: torch.Tensor | None = None, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
    u: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """dt, x [Bt, D, L]; A [D, N]; B, C [Bt, L, N]; h0 [Bt, D, N] or None; D [D], z, u [Bt, D, L] or None ->
    y [Bt, D, L], h [Bt, D, N] float32. `starts` ([Bt * D, chunks, N] float32), when given, receives each
    chunk's incoming state (for the backward)."""
    dt, A, x, B, C = (t.contiguous() for t in (dt, A, x, B, C))
    D, z, skip = (t.contiguous() if t is not None else None for t in (D, z, x if u is None else u))
    batch, channels, length = dt.shape
    nstate = A.shape[1]
    y = torch.empty(batch, channels, length, device=dt.device, dtype=torch.float32)
    h = torch.empty(batch, channels, nstate, device=dt.device, dtype=torch.float32)
    block_l, block_n = _blocks(length, nstate)
    h0c = h0.contiguous() if h0 is not None else h
    _selective_scan_kernel[(batch * channels,)](
        dt, A, x, B, C, h0c, y, h, *(t if t is not None else h for t in (D, z, skip)), channels, length, nstate,
        starts if starts is not None else h, HAS_H0=h0 is not None, SAVE_STARTS=starts is not None,
        HAS_D=D is not None, HAS_Z=z is not None, BLOCK_L=block_l, BLOCK_N=block_n,
    )  # fmt: skip
    return y, h
