"""Plain-PyTorch complex diagonal scan: the test oracle and the fallback of `fxfuse::complex_scan`.

One step at a time with torch's complex arithmetic, in float32 (float64 inputs stay float64): short enough
to be obviously right, and what every kernel is compared with.
"""

from __future__ import annotations

import torch


def state_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The real dtype the state is kept in: float32, or float64 when an input is float64."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def as_complex(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A [..., 2] (real, imaginary) tensor as a complex tensor of the real `dtype`'s precision."""
    return torch.view_as_complex(t.to(dtype).contiguous())


def complex_scan_reference(a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """a [C, 2]; x [L, C, 2]; h0 [C, 2] or None (zeros) — complex numbers as (real, imaginary) pairs.

    h_t = a * h_{t-1} + x_t   (complex multiply, per channel c)
    Returns every state, hs [L, C, 2], in the state dtype.
    """
    dtype = state_dtype(a, x, h0)
    lam, xs = as_complex(a, dtype), as_complex(x, dtype)
    h = as_complex(h0, dtype) if h0 is not None else torch.zeros_like(lam)
    hs = []
    for t in range(xs.shape[0]):
        h = lam * h + xs[t]
        hs.append(h)
    out = torch.stack(hs) if hs else xs.new_zeros(xs.shape)
    return torch.view_as_real(out)
