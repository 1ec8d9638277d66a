"""`fxfuse::linear_attention` custom op: input checks, backend dispatch, fake impl and autograd.

Every backend supplies one primitive, the (decayed, causal or not) product of the reference, and the
forward and backward are built from it there: CPU -> chunked ATen matmuls, CUDA -> the Triton chunked
kernel, anything else -> the materialized quadratic form. `block=c > 0` (with causal) is the
block-exclusive mask j // c < i // c: a position sees the keys of the earlier blocks only. The backward
is its own opaque op (`fxfuse::linear_attention_backward`) so make_fx / torch.compile / export trace it
as one node.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from fxfuse.backends import check_backend, count_call, resolve
from fxfuse.fusion.linear_attention.reference import (
    NORMALIZERS,
    Product,
    linear_attention_backward,
    linear_attention_forward,
    quadratic_product,
)

SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, float scale, bool causal, float[]? decay, str normalize, float eps, "
    "str backend, int block=0) -> Tensor"
)
BACKWARD_SCHEMA = (
    "(Tensor grad_out, Tensor q, Tensor k, Tensor v, float scale, bool causal, float[]? decay, str normalize, "
    "float eps, str backend, int block=0) -> (Tensor, Tensor, Tensor)"
)


def check_inputs(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, decay: Sequence[float] | None, normalize: str, block: int = 0
) -> None:
    """Raise ValueError, with what to change, for inputs outside the op's contract."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("linear_attention expects q, k, v of rank 4: [B, H, N, D]; reshape heads out first")
    b, hq, n, d = q.shape
    if k.shape[0] != b or v.shape[0] != b or k.shape[3] != d or v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"linear_attention shapes do not fit: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}; "
            "expected q [B, Hq, N, D], k [B, Hkv, M, D], v [B, Hkv, M, E]"
        )
    if k.shape[1] == 0 or hq % k.shape[1] != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({k.shape[1]})")
    if causal and n != k.shape[2]:
        raise ValueError(f"causal linear attention needs as many queries as keys, got {n} and {k.shape[2]}")
    if decay is not None:
        if not causal:
            raise ValueError("a decay gamma^(i - j) is defined for causal linear attention only; pass causal=True")
        if len(decay) not in (1, hq) or any(not g >= 0.0 for g in decay):
            raise ValueError(f"decay must be 1 or {hq} (one per query head) gammas >= 0, got {list(decay)}")
    if block < 0:
        raise ValueError(f"block must be 0 (token-causal) or a block size > 0, got {block}")
    if block > 0 and not causal:
        raise ValueError("block > 0 (block-exclusive: keys of the earlier blocks only) needs causal=True")
    if block > 0 and decay is not None:
        raise ValueError("decay is not supported with block > 0 (block-exclusive); pass decay=None or block=0")
    if normalize not in NORMALIZERS:
        raise ValueError(f"normalize={normalize!r} is not one of {', '.join(NORMALIZERS)}")


def linear_attention_backend(backend: str, device: torch.device | str, dtype: torch.dtype = torch.float32,
                             head_dim: int = 32, v_head_dim: int = 32, block: int = 0) -> tuple[str, str]:  # fmt: skip
    """Which implementation will run, and why: ("triton" | "cpu" | "reference", reason)."""
    check_backend(backend)
    name = resolve(backend, device)
    if name == "reference":
        return "reference", "asked for" if backend == "reference" else f"no {backend} path for {device} tensors"
    if name == "triton":
        from fxfuse.backends.triton.linear_attention import triton_unsupported

        why = triton_unsupported(dtype, head_dim, v_head_dim, block)
        if why is not None:
            return "cpu", f"chunked ATen matmuls (triton: {why})"
        return "triton", "chunked Triton kernel"
    return "cpu", "chunked ATen matmuls"


def _product(op: str, backend: str, q: Tensor, v: Tensor, block: int = 0) -> Product:
    """The product primitive of the backend that runs `op` (counted in `fxfuse.backends.CALLS`)."""
    name = linear_attention_backend(backend, q.device, q.dtype, q.shape[3], v.shape[3], block)[0]
    if q.numel() == 0 or v.numel() == 0:
        name = "reference"
    count_call(op, name)
    if name == "reference":
        return quadratic_product
    if name == "triton":
        from fxfuse.backends.triton.linear_attention import chunked_product_triton

        if q.dtype in (torch.float16, torch.bfloat16):
            # half inputs carry ~1e-3 rounding already: TF32 tensor cores, float32 states all the same
            return functools.partial(chunked_product_triton, precision="tf32")
        return chunked_product_triton
    from fxfuse.backends.cpu.linear_attention import chunked_product

    return chunked_product


def _decay(decay: Sequence[float] | None) -> list[float] | None:
    return None if decay is None else [float(g) for g in decay]


@torch.library.custom_op("fxfuse::linear_attention", mutates_args=(), schema=SCHEMA)
def linear_attention_op(
    q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, decay: Sequence[float] | None, normalize: str,
    eps: float, backend: str, block: int = 0,
) -> Tensor:  # fmt: skip
    check_inputs(q, k, v, causal, decay, normalize, block)
    product = _product("linear_attention", backend, q, v, block)
    out = linear_attention_forward(product, q, k, v, scale, causal, _decay(decay), normalize, eps, block)
    return out.to(q.dtype).contiguous()


@linear_attention_op.register_fake
def _fake(q, k, v, scale, causal, decay, normalize, eps, backend, block=0):
    check_inputs(q, k, v, causal, decay, normalize, block)
    return q.new_empty((*q.shape[:3], v.shape[3]))


@torch.library.custom_op("fxfuse::linear_attention_backward", mutates_args=(), schema=BACKWARD_SCHEMA)
def linear_attention_backward_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, decay: Sequence[float] | None,
    normalize: str, eps: float, backend: str, block: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(dq, dk, dv) in the inputs' dtypes."""
    product = _product("linear_attention_backward", backend, q, v, block)
    decay = _decay(decay)
    grads = linear_attention_backward(product, grad_out, q, k, v, scale, causal, decay, normalize, eps, block)
    return tuple(g.to(t.dtype).contiguous() for g, t in zip(grads, (q, k, v)))


@linear_attention_backward_op.register_fake
def _backward_fake(grad_out, q, k, v, scale, causal, decay, normalize, eps, backend, block=0):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, *params = inputs
    ctx.save_for_backward(q, k, v)
    ctx.params = params


def _backward(ctx, grad_out):
    q, k, v = ctx.saved_tensors
    dq, dk, dv = torch.ops.fxfuse.linear_attention_backward(grad_out, q, k, v, *ctx.params)
    return dq, dk, dv, *([None] * len(ctx.params))


linear_attention_op.register_autograd(_backward, setup_context=_setup_context)
