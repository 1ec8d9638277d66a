"""`fxfuse::complex_scan` custom op: input checks, backend dispatch, fake impl and autograd.

Schema: fxfuse::complex_scan(Tensor a, Tensor x, Tensor? h0, str backend) -> Tensor hs
The backward is the same scan run backwards in time with the conjugate decay (the gradient reaching h_t is
g_t = gy_t + conj(a) g_{t+1}), then two elementwise products: no kernel of its own, and a traced training
graph carries the forward op once more instead of a per-step loop.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fxfuse.backends import count_call, kernel_backend
from fxfuse.fusion.complex_scan.reference import as_complex, complex_scan_reference, state_dtype


def check_inputs(a: Tensor, x: Tensor, h0: Tensor | None) -> None:
    """Raise ValueError, with what to change, for inputs outside the op's contract."""
    if a.dim() != 2 or a.shape[1] != 2 or x.dim() != 3:
        raise ValueError("complex_scan expects a [C, 2] and x [L, C, 2] (complex numbers as real, imaginary pairs)")
    if tuple(x.shape[1:]) != tuple(a.shape):
        raise ValueError(f"complex_scan: x has shape {tuple(x.shape)}, expected [L, {a.shape[0]}, 2]")
    if h0 is not None and tuple(h0.shape) != tuple(a.shape):
        raise ValueError(f"complex_scan: h0 has shape {tuple(h0.shape)}, expected {list(a.shape)}")
    if not all(t.is_floating_point() for t in (a, x) + ((h0,) if h0 is not None else ())):
        raise ValueError("complex_scan takes real floating-point tensors (torch.view_as_real of complex ones)")


def cpu_problem() -> str | None:
    """Why the C kernel cannot run here (None when it can); builds it on first call."""
    from fxfuse.backends.cpu.complex_scan import cpu_kernel_problem

    return cpu_kernel_problem()


def complex_scan_backend(backend: str, *tensors: Tensor | None) -> str:
    """Which implementation runs for these inputs: "triton", "cpu" or "reference"."""
    return kernel_backend(backend, list(tensors), cpu_problem)


@torch.library.custom_op("fxfuse::complex_scan", mutates_args=())
def complex_scan_op(a: Tensor, x: Tensor, h0: Tensor | None, backend: str) -> Tensor:
    check_inputs(a, x, h0)
    name = complex_scan_backend(backend, a, x, h0)
    count_call("complex_scan", name)
    if name == "cpu":
        from fxfuse.backends.cpu.complex_scan import complex_scan_cpu

        return complex_scan_cpu(a, x, h0)
    if name == "triton":
        from fxfuse.backends.triton.complex_scan import complex_scan_triton

        return complex_scan_triton(a, x, h0)
    return complex_scan_reference(a, x, h0).contiguous()


@complex_scan_op.register_fake
def _complex_scan_fake(a, x, h0, backend):
    check_inputs(a, x, h0)
    return x.new_empty(x.shape, dtype=state_dtype(a, x, h0))


def _setup_context(ctx, inputs, output) -> None:
    a, x, h0, backend = inputs
    ctx.save_for_backward(a, h0, output)
    ctx.dtypes = (a.dtype, x.dtype, None if h0 is None else h0.dtype)
    ctx.backend = backend


def _backward(ctx, gy):
    a, h0, hs = ctx.saved_tensors
    dtype = hs.dtype
    conj = a.to(dtype) * a.new_tensor([1.0, -1.0], dtype=dtype)
    g = torch.ops.fxfuse.complex_scan(conj, gy.to(dtype).flip(0), None, ctx.backend).flip(0)  # reaches h_t
    gc, hc = as_complex(g, dtype), as_complex(hs, dtype)
    start = as_complex(h0, dtype)[None] if h0 is not None else torch.zeros_like(hc[:1])
    prev = torch.cat([start, hc[:-1]])  # h_{t-1}
    da = torch.view_as_real((gc * prev.conj()).sum(0))
    dh0 = None if h0 is None else torch.view_as_real(as_complex(conj, dtype) * gc[0]).to(ctx.dtypes[2])
    return da.to(ctx.dtypes[0]), g.to(ctx.dtypes[1]), dh0, None


complex_scan_op.register_autograd(_backward, setup_context=_setup_context)
