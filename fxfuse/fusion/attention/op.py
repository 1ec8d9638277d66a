"""`fxfuse::attention` custom op: input checks, backend dispatch, fake impl and autograd.

The backward is its own opaque op (`fxfuse::attention_backward`) so make_fx / torch.compile / export
trace it as one node, like the forward, instead of tracing into Triton launches.
"""

import functools
import math
import threading

import torch
from torch import Tensor

from fxfuse.backends import check_backend, count_call, resolve
from fxfuse.fusion.attention.reference import (
    SCORE_FNS,
    attention_reference,
    attention_reference_backward,
    reduce_to_shape,
)

# Backends are imported where used: they import this package's reference (an import cycle at module
# level), and triton is optional and must be imported after TRITON_INTERPRET is set.


def _triton_unsupported(dtype: torch.dtype, head_dim: int, v_head_dim: int, dropout_p: float) -> str | None:
    from fxfuse.backends.triton.attention import triton_unsupported

    return triton_unsupported(dtype, head_dim, v_head_dim, dropout_p)


def attention_backend(backend: str, device: torch.device | str, **params) -> tuple[str, str]:
    """Which implementation will run, and why: ("triton" | "cpu" | "reference", reason).

    params (all optional): dtype, head_dim, v_head_dim, score_fn, masked_value, dropout_p; others are
    ignored, so a caller can pass the op's whole parameter set.
    """
    check_backend(backend)
    dtype = params.get("dtype", torch.float32)
    head_dim = int(params.get("head_dim", 64))
    v_head_dim = int(params.get("v_head_dim") or head_dim)
    score_fn = params.get("score_fn", "softmax")
    masked_value = float(params.get("masked_value", -math.inf))
    dropout_p = float(params.get("dropout_p", 0.0))
    name = resolve(backend, device)
    if name == "reference":
        if backend == "reference":
            return "reference", "asked for"
        return "reference", f"no {backend} path for {torch.device(device)} tensors"
    if name == "triton":
        why = _triton_unsupported(dtype, head_dim, v_head_dim, dropout_p)
        if why is not None:
            return "reference", f"triton: {why}"
        return "triton", "flash-attention kernels"
    if dropout_p > 0.0:
        return "reference", "cpu: dropout runs in the reference"
    from fxfuse.backends.cpu.attention import sdpa_unsupported

    why = sdpa_unsupported(score_fn, masked_value)
    if why is None:
        return "cpu", "scaled_dot_product_attention"
    return "cpu", f"chunked float32 path ({why})"


def check_inputs(q, k, v, bias, mask, q_seg, k_seg, score_fn: str) -> None:
    """Raise ValueError, with what to change, for inputs outside the op's contract."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("attention expects q, k, v of rank 4: [B, H, N, D]; reshape heads out first")
    b, hq, nq, d = q.shape
    if k.shape[0] != b or v.shape[0] != b or k.shape[3] != d or v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"attention shapes do not fit: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}; "
            "expected q [B, Hq, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv]"
        )
    if k.shape[1] == 0 or hq % k.shape[1] != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({k.shape[1]})")
    if score_fn not in SCORE_FNS:
        raise ValueError(f"score_fn={score_fn!r} is not one of {', '.join(SCORE_FNS)}")
    full = (b, hq, nq, k.shape[2])
    for name, t in (("bias", bias), ("mask", mask)):
        if t is not None and not _broadcasts_to(t.shape, full):
            raise ValueError(f"{name} of shape {tuple(t.shape)} does not broadcast to [B, Hq, Nq, Nk] {full}")
    if bias is not None and not bias.is_floating_point():
        raise ValueError("bias must be a floating-point tensor; pass a boolean `mask` for masking")
    if mask is not None and mask.dtype != torch.bool:
        raise ValueError("mask must be boolean (True = attend); pass additive masks as `bias`")
    if (q_seg is None) != (k_seg is None):
        raise ValueError("q_seg and k_seg go together: pass both or neither")
    if q_seg is not None and (tuple(q_seg.shape) != (b, nq) or tuple(k_seg.shape) != (b, k.shape[2])):
        raise ValueError("q_seg must be [B, Nq] and k_seg [B, Nk] segment ids")
    if q_seg is not None and (q_seg.is_floating_point() or k_seg.is_floating_point()):
        raise ValueError("q_seg and k_seg must be integer segment ids")


def _broadcasts_to(shape, full: tuple) -> bool:
    if len(shape) > len(full):
        return False
    return all(s == 1 or s == f for s, f in zip(reversed(tuple(shape)), reversed(full)))


def _choose(backend: str, q: Tensor, k: Tensor, v: Tensor, score_fn: str, masked_value: float,
            dropout_p: float) -> str:  # fmt: skip
    if q.numel() == 0 or k.shape[2] == 0:
        return "reference"
    name = _backend_name(backend, q.device, q.dtype, q.shape[3], v.shape[3], score_fn, masked_value, dropout_p)
    if name == "triton" and not (k.dtype == v.dtype == q.dtype):
        return "reference"  # tl.dot needs one operand dtype; mixed inputs are rare enough to not cast
    return name


@functools.lru_cache(maxsize=256)
def _backend_name(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int, v_head_dim: int,
                  score_fn: str, masked_value: float, dropout_p: float) -> str:  # fmt: skip
    # Cached: the decision depends only on these, and it cost ~10 us per call, a third of the op's
    # overhead at small sizes.
    return attention_backend(backend, device, dtype=dtype, head_dim=head_dim, v_head_dim=v_head_dim,
                             score_fn=score_fn, masked_value=masked_value, dropout_p=dropout_p)[0]  # fmt: skip


# The seed of the last forward with dropout, per thread (see attention_op and _setup_context).
_dropout = threading.local()


# Spelled out: inference from the hints would make causal_offset a SymInt.
_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor? mask, Tensor? q_seg, Tensor? k_seg, "
    "float scale, bool causal, int causal_offset, float masked_value, str score_fn, float dropout_p, "
    "str backend) -> Tensor"
)


@torch.library.custom_op("fxfuse::attention", mutates_args=(), schema=_SCHEMA)
def attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    mask: Tensor | None,
    q_seg: Tensor | None,
    k_seg: Tensor | None,
    scale: float,
    causal: bool,
    causal_offset: int,
    masked_value: float,
    score_fn: str,
    dropout_p: float,
    backend: str,
) -> Tensor:
    check_inputs(q, k, v, bias, mask, q_seg, k_seg, score_fn)
    args = (q, k, v, bias, mask, q_seg, k_seg, scale, causal, causal_offset, masked_value, score_fn)
    name = _choose(backend, q, k, v, score_fn, masked_value, dropout_p)
    count_call("attention", "reference" if dropout_p > 0.0 else name)
    if dropout_p > 0.0:
        # Drawn from torch's generator (torch.manual_seed makes runs repeatable) and handed to
        # _setup_context, which runs right after this in the same thread, for the backward's replay.
        seed = int(torch.randint(0, 2**62, ()).item())
        _dropout.seed = seed
        out = attention_reference(*args, dropout_p, seed)
    elif name == "triton":
        from fxfuse.backends.triton.attention import attention_triton

        out = attention_triton(*args)[0]
    elif name == "cpu":
        from fxfuse.backends.cpu.attention import attention_cpu

        out = attention_cpu(*args)
    else:
        out = attention_reference(*args)
    # Contiguous whatever the path (SDPA may follow q's layout): the fake impl promises this layout.
    return out.contiguous()


@attention_op.register_fake
def _attention_fake(q, k, v, bias, mask, q_seg, k_seg, scale, causal, causal_offset, masked_value, score_fn,
                    dropout_p, backend):  # fmt: skip
    check_inputs(q, k, v, bias, mask, q_seg, k_seg, score_fn)
    _dropout.seed = None  # a traced forward must not pick up an earlier eager forward's seed
    return q.new_empty((*q.shape[:3], v.shape[3]))


@torch.library.custom_op("fxfuse::attention_backward", mutates_args=())
def attention_backward_op(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    mask: Tensor | None,
    q_seg: Tensor | None,
    k_seg: Tensor | None,
    scale: float,
    causal: bool,
    causal_offset: int,
    masked_value: float,
    score_fn: str,
    dropout_p: float,
    dropout_seed: int,
    backend: str,
    bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dbias) in the inputs' dtypes; dbias is empty when not `bias_grad`."""
    args = (grad_out, q, k, v, bias, mask, q_seg, k_seg, scale, causal, causal_offset, masked_value, score_fn)
    name = _choose(backend, q, k, v, score_fn, masked_value, dropout_p)
    count_call("attention_backward", "reference" if dropout_p > 0.0 else name)
    if dropout_p > 0.0:
        dq, dk, dv, ds = attention_reference_backward(*args, dropout_p, dropout_seed)
        dbias = reduce_to_shape(ds, bias.shape) if bias_grad and bias is not None else None
    elif name == "triton":
        from fxfuse.backends.triton.attention_bwd import attention_triton_backward

        dq, dk, dv, dbias = attention_triton_backward(*args, bias_grad)
    elif name == "cpu":
        from fxfuse.backends.cpu.attention import attention_cpu_backward

        dq, dk, dv, dbias = attention_cpu_backward(*args, bias_grad)
    else:
        dq, dk, dv, ds = attention_reference_backward(*args)
        dbias = reduce_to_shape(ds, bias.shape) if bias_grad and bias is not None else None
    dbias = dbias.to(bias.dtype) if dbias is not None else q.new_empty(0)
    grads = (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias)
    return tuple(g.contiguous() for g in grads)


@attention_backward_op.register_fake
def _attention_backward_fake(grad_out, q, k, v, bias, mask, q_seg, k_seg, scale, causal, causal_offset,
                             masked_value, score_fn, dropout_p, dropout_seed, backend,
                             bias_grad):  # fmt: skip
    dbias = bias.new_empty(bias.shape) if bias_grad and bias is not None else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, bias, mask, q_seg, k_seg, *params = inputs
    ctx.save_for_backward(q, k, v, bias, mask, q_seg, k_seg)
    ctx.params = params
    dropout_p = params[5]
    # Only a real (eager) forward draws a seed; traced ones (fake tensors) leave None.
    ctx.dropout_seed = getattr(_dropout, "seed", None) if dropout_p > 0.0 else 0
    _dropout.seed = None


def _backward(ctx, grad_out):
    q, k, v, bias, mask, q_seg, k_seg = ctx.saved_tensors
    scale, causal, causal_offset, masked_value, score_fn, dropout_p, backend = ctx.params
    if ctx.dropout_seed is None:
        # Traced (torch.compile / make_fx): the seed would be baked into the graph as a constant.
        raise NotImplementedError(
            "fxfuse::attention with dropout_p > 0 has no traced backward; train it eagerly, or rewrite "
            "the model in eval mode (dropout_p=0)"
        )
    bias_grad = bias is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dbias = torch.ops.fxfuse.attention_backward(
        grad_out, q, k, v, bias, mask, q_seg, k_seg, scale, causal, causal_offset, masked_value, score_fn,
        dropout_p, ctx.dropout_seed, backend, bias_grad,
    )  # fmt: skip
    return dq, dk, dv, dbias if bias_grad else None, *([None] * 10)


attention_op.register_autograd(_backward, setup_context=_setup_context)
