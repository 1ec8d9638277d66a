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
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("ssm_scan.c")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11"]
_F32 = ctypes.POINTER(ctypes.c_float)
_I64, _INT = ctypes.c_int64, ctypes.c_int


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "fxfuse"


def _cpu_key() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return flags


def _compile(compiler: str, target: Path) -> str | None:
    """Build the library at `target`; None, or why it could not be built."""
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        # without an OpenMP runtime (Apple clang): one thread, the `omp simd` vectorization hints kept
        for flags in (_FLAGS, [f if f != "-fopenmp" else "-fopenmp-simd" for f in _FLAGS]):
            try:
                run = subprocess.run([compiler, *flags, "-o", str(built), str(_SOURCE), "-lm"],
                                     capture_output=True, text=True, timeout=120)  # fmt: skip
            except (OSError, subprocess.SubprocessError) as exc:
                return f"the C compiler {compiler} did not run ({exc}); the reference runs instead"
            if run.returncode == 0:
                os.replace(built, target)  # atomic: concurrent processes see a whole library or none
                return None
    return f"the C kernel did not compile ({run.stderr.strip()[:200]}); the reference runs instead"


@functools.cache
def _library() -> ctypes.CDLL | str:
    """The loaded kernel library, or a sentence saying why there is none."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return "no C compiler found (set CC); the selective scan runs its reference on CPU"
    if not _SOURCE.exists():
        return f"the kernel source {_SOURCE.name} is not installed; the reference runs instead"
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([compiler, *_FLAGS, _cpu_key()]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"ssm_scan-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        problem = _compile(compiler, target)
        if problem is not None:
            return problem
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as exc:
        return f"the C kernel did not load ({exc}); the reference runs instead"
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
