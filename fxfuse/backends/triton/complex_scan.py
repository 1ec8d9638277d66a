"""Triton kernel of `fxfuse::complex_scan`: one program per block of channels, time walked in order.

h_t = a * h_{t-1} + x_t is elementwise over channels, so a block of BLOCK_C channels keeps its decays and
states in registers and streams x_t in and h_t out once per step: the kernel moves exactly the bytes the
op must read and write. The state is float32 whatever the input dtype. The backward needs no kernel of its
own: it is this scan run on the reversed gradients with the conjugate decay (`fusion/complex_scan/op.py`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _complex_scan_kernel(a_ptr, x_ptr, h0_ptr, hs_ptr, L, C, HAS_H0: tl.constexpr, BLOCK_C: tl.constexpr):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = c < C
    re, im = 2 * c, 2 * c + 1  # complex numbers as (real, imaginary) pairs
    ar = tl.load(a_ptr + re, mask=ok, other=0.0).to(tl.float32)
    ai = tl.load(a_ptr + im, mask=ok, other=0.0).to(tl.float32)
    if HAS_H0:
        hr = tl.load(h0_ptr + re, mask=ok, other=0.0).to(tl.float32)
        hi = tl.load(h0_ptr + im, mask=ok, other=0.0).to(tl.float32)
    else:
        hr = tl.zeros([BLOCK_C], dtype=tl.float32)
        hi = tl.zeros([BLOCK_C], dtype=tl.float32)
    step = C.to(tl.int64) * 2
    for t in range(0, L):
        base = t * step
        xr = tl.load(x_ptr + base + re, mask=ok, other=0.0).to(tl.float32)
        xi = tl.load(x_ptr + base + im, mask=ok, other=0.0).to(tl.float32)
        hr, hi = ar * hr - ai * hi + xr, ar * hi + ai * hr + xi
        tl.store(hs_ptr + base + re, hr, mask=ok)
        tl.store(hs_ptr + base + im, hi, mask=ok)


def complex_scan_triton(a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
    """a [C, 2]; x [L, C, 2]; h0 [C, 2] or None -> every state hs [L, C, 2] in float32."""
    a, x = a.contiguous(), x.contiguous()
    h0 = h0.contiguous() if h0 is not None else None
    length, channels = x.shape[0], x.shape[1]
    hs = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    block = min(256, triton.next_power_of_2(max(channels, 16)))
    grid = (triton.cdiv(channels, block),)
    _complex_scan_kernel[grid](a, x, h0 if h0 is not None else a, hs, length, channels, HAS_H0=h0 is not None,
                               BLOCK_C=block)  # fmt: skip
    return hs
