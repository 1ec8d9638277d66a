"""`fxfuse::complex_scan`: a diagonal linear recurrence with a constant complex decay (LRU, S4D in
recurrent mode) as one op.

Importing this package registers the op; `complex_scan` below is its Python entry point.
"""

from __future__ import annotations

from torch import Tensor

from fxfuse.fusion.complex_scan.op import check_inputs, complex_scan_backend, complex_scan_op
from fxfuse.fusion.complex_scan.reference import complex_scan_reference

__all__ = ["complex_scan", "complex_scan_backend", "complex_scan_op", "complex_scan_reference"]


def complex_scan(a: Tensor, x: Tensor, h0: Tensor | None = None, backend: str = "auto") -> Tensor:
    """Every state of h_t = a * h_{t-1} + x_t with complex a, x and h stored as (real, imaginary) pairs.

    a [C, 2] (the decay per channel, constant over time); x [L, C, 2]; h0 [C, 2] or None (zeros).
    Returns hs [L, C, 2] in float32 (float64 for float64 inputs); the final state is hs[-1]. Complex
    tensors go in and out through `torch.view_as_real` / `torch.view_as_complex` without a copy.
    backend: "auto" (CUDA -> Triton, CPU -> C kernel), "triton", "cpu" or "reference".
    Gradients flow to a, x and h0.
    """
    check_inputs(a, x, h0)
    return complex_scan_op(a, x, h0, backend)
