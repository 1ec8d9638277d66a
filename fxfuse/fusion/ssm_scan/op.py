"""`fxfuse::selective_scan` custom op: input checks, backend dispatch, fake impl and autograd.

Schema: fxfuse::selective_scan(Tensor dt, Tensor A, Tensor x, Tensor B, Tensor C, Tensor? h0, str backend,
                               Tensor? D=None, Tensor? z=None, Tensor? u=None) -> (Tensor y, Tensor h_last)
D, z and u are the Mamba block's D skip and silu(z) gate, applied to y in the kernels' pass over time:
y = (y + u * D) * silu(z), u defaulting to x.
The backward is its own opaque op (`fxfuse::selective_scan_backward`), so traced training graphs carry one
node instead of tracing into ctypes calls or Triton launches.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fxfuse.backends import count_call, kernel_backend
from fxfuse.fusion.ssm_scan.reference import (
    selective_scan_reference,
    selective_scan_reference_backward,
    state_dtype,
)


def check_inputs(
    dt: Tensor, A: Tensor, x: Tensor, B: Tensor, C: Tensor, h0: Tensor | None, D: Tensor | None = None,
    z: Tensor | None = None, u: Tensor | None = None,
) -> None:  # fmt: skip
    """Raise ValueError, with what to change, for inputs outside the op's contract."""
    if dt.dim() != 3 or A.dim() != 2 or B.dim() != 3:
        raise ValueError("selective_scan expects dt, x [B, D, L], A [D, N] and B, C [B, L, N]")
    batch, channels, length = dt.shape
    nstate = A.shape[1]
    want = {"x": (x, (batch, channels, length)), "A": (A, (channels, nstate)), "B": (B, (batch, length, nstate)),
            "C": (C, (batch, length, nstate))}  # fmt: skip
    optional = {"h0": (h0, (batch, channels, nstate)), "D": (D, (channels,)), "z": (z, (batch, channels, length)),
                "u": (u, (batch, channels, length))}  # fmt: skip
    want.update((name, pair) for name, pair in optional.items() if pair[0] is not None)
    if u is not None and D is None:
        raise ValueError("selective_scan: u is the D skip's input; pass D with it (or leave u out)")
    for name, (t, shape) in want.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"selective_scan: {name} has shape {tuple(t.shape)}, expected {list(shape)}")
    if not all(t.is_floating_point() for t, _ in want.values()):
        raise ValueError("selective_scan takes floating-point tensors")


def cpu_problem() -> str | None:
    """Why the C kernel cannot run here (None when it can); builds it on first call."""
    from fxfuse.backends.cpu.ssm_scan import cpu_kernel_problem

    return cpu_kernel_problem()


def scan_backend(backend: str, *tensors: Tensor | None) -> str:
    """Which implementation runs for these inputs: "triton", "cpu" or "reference"."""
    return kernel_backend(backend, list(tensors), cpu_problem)


@torch.library.custom_op("fxfuse::selective_scan", mutates_args=())
def selective_scan_op(
    dt: Tensor, A: Tensor, x: Tensor, B: Tensor, C: Tensor, h0: Tensor | None, backend: str,
    D: Tensor | None = None, z: Tensor | None = None, u: Tensor | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    check_inputs(dt, A, x, B, C, h0, D, z, u)
    name = scan_backend(backend, dt, A, x, B, C, h0, D, z, u)
    count_call("selective_scan", name)
    if name == "cpu":
        from fxfuse.backends.cpu.ssm_scan import selective_scan_cpu

        y, h = selective_scan_cpu(dt, A, x, B, C, h0, D, z, u)
    elif name == "triton":
        from fxfuse.backends.triton.ssm_scan import selective_scan_triton

        y, h = selective_scan_triton(dt, A, x, B, C, h0, D=D, z=z, u=u)
    else:
        y, h = selective_scan_reference(dt, A, x, B, C, h0, D, z, u)
    return y.contiguous(), h.contiguous()


@selective_scan_op.register_fake
def _selective_scan_fake(dt, A, x, B, C, h0, backend, D=None, z=None, u=None):
    check_inputs(dt, A, x, B, C, h0, D, z, u)
    dtype = state_dtype(dt, A, x, B, C, h0, D, z, u)
    batch, channels, length = dt.shape
    return dt.new_empty(dt.shape, dtype=dtype), dt.new_empty((batch, channels, A.shape[1]), dtype=dtype)


@torch.library.custom_op("fxfuse::selective_scan_backward", mutates_args=())
def selective_scan_backward_op(
    gy: Tensor, gh: Tensor | None, dt: Tensor, A: Tensor, x: Tensor, B: Tensor, C: Tensor, h0: Tensor | None,
    backend: str, D: Tensor | None = None, z: Tensor | None = None, u: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(d dt, dA, dx, dB, dC, dh0, dD, dz, du), each in its input's dtype (dh0 in the state dtype when h0 is
    None); dD, dz, du are empty for an absent input (with u absent the skip's gradient is in dx)."""
    name = scan_backend(backend, dt, A, x, B, C, h0, D, z, u)
    count_call("selective_scan_backward", name)
    if name == "cpu":
        from fxfuse.backends.cpu.ssm_scan import selective_scan_cpu_backward

        grads = selective_scan_cpu_backward(gy, gh, dt, A, x, B, C, h0, D, z, u)
    elif name == "triton":
        from fxfuse.backends.triton.ssm_scan import selective_scan_triton_backward

        grads = selective_scan_triton_backward(gy, gh, dt, A, x, B, C, h0, D, z, u)
    else:
        grads = selective_scan_reference_backward(gy, gh, dt, A, x, B, C, h0, D, z, u)
    like = (dt, A, x, B, C, h0 if h0 is not None else gy, D, z, u)
    return tuple(dt.new_empty(0) if t is None else g.to(t.dtype).contiguous() for g, t in zip(grads, like))


@selective_scan_backward_op.register_fake
def _selective_scan_backward_fake(gy, gh, dt, A, x, B, C, h0, backend, D=None, z=None, u=None):
    state = h0 if h0 is not None else gy.new_empty((dt.shape[0], dt.shape[1], A.shape[1]))
    like = (dt, A, x, B, C, state, D, z, u)
    return tuple(dt.new_empty(0) if t is None else t.new_empty(t.shape) for t in like)


def _setup_context(ctx, inputs, output) -> None:
    dt, A, x, B, C, h0, backend, *tail = inputs
    ctx.save_for_backward(dt, A, x, B, C, h0, *tail, *[None] * (3 - len(tail)))
    ctx.backend = backend


def _backward(ctx, gy, gh):
    dt, A, x, B, C, h0, D, z, u = ctx.saved_tensors
    grads = torch.ops.fxfuse.selective_scan_backward(gy, gh, dt, A, x, B, C, h0, ctx.backend, D, z, u)
    present = (h0, D, z, u)
    dh0, dD, dz, du = (g if t is not None else None for g, t in zip(grads[5:], present))
    return (*grads[:5], dh0, None, dD, dz, du)


selective_scan_op.register_autograd(_backward, setup_context=_setup_context)
