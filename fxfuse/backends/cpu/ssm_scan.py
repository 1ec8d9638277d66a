"""CPU fast path of `fxfuse::selective_scan`: a C kernel (ssm_scan.c) compiled on first use, called via ctypes.

Why C through ctypes rather than torch's cpp_extension: the kernel needs no torch headers, so it builds in
~0.3 s with the system C compiler (cpp_extension's torch/extension.h build takes tens of seconds and needs
ninja), and the built library is cached under the user cache directory, keyed by the source, the flags and
the CPU. Why a compiled loop at all: the scan is sequential in time, and ATen runs it as L small ops per
step (~4 ops of [B, D, N] each) or materializes [B, D, L, N] factors; the C loop keeps the state in
registers and vectorizes over N. Where no C compiler works the op runs its reference, and
`cpu_kernel_problem()` says why (the report shows it).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from fxfuse.backends.cpu.cbuild import build

_SOURCE = Path(__file__).with_name("ssm_scan.c")
_F32 = ctypes.POINTER(ctypes.c_float)
_I64, _INT = ctypes.c_int64, ctypes.c_int


@functools.cache
def _library() -> ctypes.CDLL | str:
    """The loaded kernel library (built by `cbuild`), or a sentence saying why there is none."""
    lib = build(_SOURCE)
    if isinstance(lib, str):
        return lib
    lib.fx_selective_scan_fwd.argtypes = [_F32] * 11 + [_I64] * 4 + [_INT]
    lib.fx_selective_scan_bwd.argtypes = [_F32] * 21 + [_I64] * 4 + [_INT]
    lib.fx_selective_scan_fwd.restype = lib.fx_selective_scan_bwd.restype = None
    return lib


def cpu_kernel_problem() -> str | None:
    """Why the C kernel cannot run here (None when it can); builds it on first call."""
    lib = _library()
    return lib if isinstance(lib, str) else None


def _ptr(t: torch.Tensor | None):
    return None if t is None else ctypes.cast(t.data_ptr(), _F32)


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(torch.float32).contiguous()


def selective_scan_cpu(
    dt: torch.Tensor, A: torch.Tensor, x: torch.Tensor, B: torch.Tensor, C: torch.Tensor, h0: torch.Tensor | None,
    D: torch.Tensor | None = None, z: torch.Tensor | None = None, u: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The reference's contract (see `selective_scan_reference`) for float32 CPU tensors: y [Bt, D, L], h [Bt, D, N]."""
    lib = _library()
    assert not isinstance(lib, str), lib
    dt, A, x, B, C, h0, D, z, u = (_f32(t) for t in (dt, A, x, B, C, h0, D, z, u))
    batch, channels, length = dt.shape
    nstate = A.shape[1]
    y = dt.new_empty(batch, channels, length)
    h = dt.new_empty(batch, channels, nstate)
    lib.fx_selective_scan_fwd(*map(_ptr, (dt, A, x, B, C, h0, D, z, x if u is None else u, y, h)), batch, channels,
                              length, nstate, torch.get_num_threads())  # fmt: skip
    return y, h


def selective_scan_cpu_backward(
    gy: torch.Tensor, gh: torch.Tensor | None, dt: torch.Tensor, A: torch.Tensor, x: torch.Tensor,
    B: torch.Tensor, C: torch.Tensor, h0: torch.Tensor | None, D: torch.Tensor | None = None,
    z: torch.Tensor | None = None, u: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, ...]:  # fmt: skip
    """(d dt, dA, dx, dB, dC, dh0, dD, dz, du) in float32 for output gradients gy [Bt, D, L] and gh [Bt, D, N]
    (or None); None for an absent D, z or u (the skip's gradient goes to dx when u is None)."""
    lib = _library()
    assert not isinstance(lib, str), lib
    gy, gh, dt, A, x, B, C, h0, D, z, u = (_f32(t) for t in (gy, gh, dt, A, x, B, C, h0, D, z, u))
    batch, channels, length = dt.shape
    nstate = A.shape[1]
    threads = torch.get_num_threads()
    grads = [torch.empty_like(t) for t in (dt, A, x, B, C)] + [dt.new_empty(batch, channels, nstate)]
    dz = torch.empty_like(z) if z is not None else None
    du, d_rows = (torch.empty_like(dt), dt.new_empty(batch, channels)) if D is not None else (None, None)
    scratch = dt.new_empty(threads * (channels * nstate + 2 * batch * length * nstate))
    lib.fx_selective_scan_bwd(*map(_ptr, (gy, gh, dt, A, x, B, C, h0, D, z, x if u is None else u, *grads, dz, du,
                                          d_rows, scratch)), batch, channels, length, nstate, threads)  # fmt: skip
    if du is not None and u is None:
        grads[2] += du
        du = None
    return (*grads, None if D is None else d_rows.sum(0), dz, du)
