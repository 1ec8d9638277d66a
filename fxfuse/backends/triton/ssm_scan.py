"""Triton kernel of `fxfuse::selective_scan` (forward): a chunked parallel scan, one program per (batch, channel).

Each program walks time in chunks of BLOCK_L steps. Inside a chunk it builds the decays exp(dt_t * A) and
inputs x_t * B_t as a [BLOCK_L, N] tile (never [B, D, L, N] in memory), scans them in parallel with
`tl.associative_scan` over the linear-recurrence combine (a1, b1) ∘ (a2, b2) = (a1 a2, a2 b1 + b2), applies
the state carried in from the previous chunk, reads out y_t = Σ_n h_t C_t, and carries the chunk's last
state on. Chunk tails are padded with the identity (dt = 0 -> a = 1, x = 0 -> b = 0), so the tile's last row
is the last real state. The state is float32 whatever the input dtype. The backward runs the op's
reference (see `fusion/ssm_scan/op.py`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _combine(a1, b1, a2, b2):
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _selective_scan_kernel(
    dt_ptr, A_ptr, x_ptr, B_ptr, C_ptr, h0_ptr, y_ptr, h_ptr,
    D, L, N,
    HAS_H0: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr,
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
    for t0 in range(0, L, BLOCK_L):
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
        tl.store(y_ptr + seq + t, tl.sum(states * Ct, axis=1), mask=t_ok)
        h = tl.sum(tl.where(steps[:, None] == BLOCK_L - 1, states, 0.0), axis=0)
    tl.store(h_ptr + row.to(tl.int64) * N + n, h, mask=n_ok)


def selective_scan_triton(
    dt: torch.Tensor, A: torch.Tensor, x: torch.Tensor, B: torch.Tensor, C: torch.Tensor, h0: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """dt, x [Bt, D, L]; A [D, N]; B, C [Bt, L, N]; h0 [Bt, D, N] or None -> y [Bt, D, L], h [Bt, D, N] float32."""
    dt, A, x, B, C = (t.contiguous() for t in (dt, A, x, B, C))
    batch, channels, length = dt.shape
    nstate = A.shape[1]
    y = torch.empty(batch, channels, length, device=dt.device, dtype=torch.float32)
    h = torch.empty(batch, channels, nstate, device=dt.device, dtype=torch.float32)
    block_n = triton.next_power_of_2(max(nstate, 2))
    block_l = max(16, min(64, 4096 // block_n, triton.next_power_of_2(length)))
    h0c = h0.contiguous() if h0 is not None else h
    _selective_scan_kernel[(batch * channels,)](
        dt, A, x, B, C, h0c, y, h, channels, length, nstate,
        HAS_H0=h0 is not None, BLOCK_L=block_l, BLOCK_N=block_n,
    )  # fmt: skip
    return y, h
