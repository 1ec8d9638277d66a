"""CPU fast path of `fxfuse::complex_scan`: a C kernel (complex_scan.c) compiled on first use, called via
ctypes (see `cbuild.py` for why C through ctypes).

Why a compiled loop: the recurrence is sequential in time, and ATen runs it as L steps of a few small
complex ops each; the C loop keeps a block of channels' states in registers and cache, and writes each
state once.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from fxfuse.backends.cpu.cbuild import load

_SOURCE = Path(__file__).with_name("complex_scan.c")
_F32 = ctypes.POINTER(ctypes.c_float)


@functools.cache
def _library() -> ctypes.CDLL | str:
    lib = load(_SOURCE)
    if isinstance(lib, str):
        return lib
    lib.fx_complex_scan_fwd.argtypes = [_F32] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_int]
    lib.fx_complex_scan_fwd.restype = None
    return lib


def cpu_kernel_problem() -> str | None:
    """Why the C kernel cannot run here (None when it can); builds it on first call."""
    lib = _library()
    return lib if isinstance(lib, str) else None


def _ptr(t: torch.Tensor | None):
    return None if t is None else ctypes.cast(t.data_ptr(), _F32)


def complex_scan_cpu(a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
    """The reference's contract (see `complex_scan_reference`) for CPU tensors, in float32: hs [L, C, 2]."""
    lib = _library()
    assert not isinstance(lib, str), lib
    a, x, h0 = (None if t is None else t.detach().to(torch.float32).contiguous() for t in (a, x, h0))
    hs = torch.empty_like(x)
    lib.fx_complex_scan_fwd(*map(_ptr, (a, x, h0, hs)), x.shape[0], x.shape[1], torch.get_num_threads())
    return hs
