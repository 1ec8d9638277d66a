"""`fxfuse::attention` op: input checks, backend dispatch, fake impls and autograd.

Three ops, each one opaque node for make_fx / torch.compile / export (never traced into Triton launches):
- `fxfuse::attention` returns the output; rewritten graphs call it, and without gradients it is all
  that runs;
- `fxfuse::attention_forward` also returns what the backward needs: the row statistics (O(B*H*N), the
  kernels' by-product) and the dropout seed; `fxfuse::attention`'s autograd kernel runs it and saves them;
- `fxfuse::attention_backward` takes them back, so no backend re-runs its forward for them.
"""

import functools
import math

import torch
from torch import Tensor

from fxfuse.backends import check_backend, count_call, resolve
from fxfuse.fusion.attention.reference import (
    SCORE_FNS,
    attention_reference,
    attention_reference_backward,
    compute_dtype,
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


# Spelled out: inference from the hints would make causal_offset a SymInt.
_ARGS = (
    "Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor? mask, Tensor? q_seg, Tensor? k_seg, "
    "float scale, bool causal, int causal_offset, float masked_value, str score_fn, float dropout_p"
)
_SCHEMA = f"({_ARGS}, str backend) -> Tensor"

# `fxfuse::attention` is what rewritten graphs call. It is defined with torch.library directly, not
# torch.library.custom_op, because its autograd kernel runs another op, `fxfuse::attention_forward`,
# which also returns what the backward needs (a custom_op's autograd sees only its own outputs).
_lib = torch.library.Library("fxfuse", "FRAGMENT")
_lib.define("attention" + _SCHEMA, tags=(torch.Tag.pt2_compliant_tag,))
attention_op = torch.ops.fxfuse.attention.default


def _run_forward(q, k, v, bias, mask, q_seg, k_seg, scale, causal, causal_offset, masked_value, score_fn,
                 dropout_p, backend, stats: bool) -> tuple[Tensor, Tensor | None, int]:  # fmt: skip
    """(out, row statistics for the backward or None, dropout seed)."""
    check_inputs(q, k, v, bias, mask, q_seg, k_seg, score_fn)
    args = (q, k, v, bias, mask, q_seg, k_seg, scale, causal, causal_offset, masked_value, score_fn)
    name = _choose(backend, q, k, v, score_fn, masked_value, dropout_p)
    count_call("attention", "reference" if dropout_p > 0.0 and name != "triton" else name)
    seed, row_stats = 0, None
    if dropout_p > 0.0:
        # Drawn from torch's generator (torch.manual_seed makes runs repeatable); the backward replays
        # the mask from it.
        seed = int(torch.randint(0, 2**62, ()).item())
    if name == "triton":
        from fxfuse.backends.triton.attention import attention_triton

        out, row_stats = attention_triton(*args, store_stats=stats, dropout_p=dropout_p, seed=seed)
    elif dropout_p > 0.0:
        out = attention_reference(*args, dropout_p, seed)
    elif name == "cpu" and stats:
        from fxfuse.backends.cpu.attention import attention_cpu_with_stats

        out, row_stats = attention_cpu_with_stats(*args)
    elif name == "cpu":
        from fxfuse.backends.cpu.attention import attention_cpu

        out = attention_cpu(*args)
    else:
        out = attention_reference(*args)
    # Contiguous whatever the path (SDPA may follow q's layout): the fake impl promises this layout.
    return out.contiguous(), row_stats, seed


def _stats_shape(backend, q, k, v, score_fn, masked_value, dropout_p) -> tuple[int, ...]:
    """Shape of the row statistics `attention_forward` returns ((0,) when its backward recomputes them).
    Fake impls call it with symbolic shapes, hence not `_choose` (cached on ints)."""
    name = attention_backend(backend, q.device, dtype=q.dtype, head_dim=q.shape[3], v_head_dim=v.shape[3],
                             score_fn=score_fn, masked_value=masked_value, dropout_p=dropout_p)[0]  # fmt: skip
    if name == "triton" and score_fn == "softmax":
        return (2, *q.shape[:3])  # row max and 1 / row sum
    if name == "cpu":
        from fxfuse.backends.cpu.attention import cpu_stats_unsupported

        if cpu_stats_unsupported(q.dtype, q.shape[3], v.shape[3], score_fn, masked_value) is None:
            return tuple(q.shape[:3])  # log-sum-exp
    return (0,)


def _attention_impl(q, k, v, bias, mask, q_seg, k_seg, scale, causal, causal_offset, masked_value, score_fn,
                    dropout_p, backend):  # fmt: skip
    return _run_forward(q, k, v, bias, mask, q_seg, k_seg, scale, causal, causal_offset, masked_value,
                        score_fn, dropout_p, backend, stats=False)[0]  # fmt: skip


@torch.library.register_fake("fxfuse::attention", lib=_lib)
def _attention_fake(q, k, v, bias, mask, q_seg, k_seg, scale, causal, causal_offset, masked_value, score_fn,
                    dropout_p, backend):  # fmt: skip
    check_inputs(q, k, v, bias, mask, q_seg, k_seg, score_fn)
    return q.new_empty((*q.shape[:3], v.shape[3]))


@torch.library.custom_op(
    "fxfuse::attention_forward", mutates_args=(), schema=f"({_ARGS}, str backend) -> (Tensor, Tensor, Tensor)"
)
def attention_forward_op(q, k, v, bias, mask, q_seg, k_seg, scale, causal, causal_offset, masked_value, score_fn,
                         dropout_p, backend):  # fmt: skip
    """(out [B, Hq, Nq, Dv], row statistics in the compute dtype ([2, B, Hq, Nq] row max and 1 / row sum
    from the Triton kernels, [B, Hq, Nq] log-sum-exp on CPU, empty where the backward recomputes them), and
    the dropout seed (int64 scalar; a graph value, so a traced backward replays the traced forward's mask))."""
    out, stats, seed = _run_forward(q, k, v, bias, mask, q_seg, k_seg, scale, causal, causal_offset, masked_value,
                                    score_fn, dropout_p, backend, stats=True)  # fmt: skip
    if stats is None:  # the backward recomputes them (or the inputs are empty and there is nothing to do)
        shape = _stats_shape(backend, q, k, v, score_fn, masked_value, dropout_p)
        stats = q.new_empty(shape, dtype=compute_dtype(q.dtype))
    return out, stats.contiguous(), torch.tensor(seed, dtype=torch.int64, device=q.device)


@attention_forward_op.register_fake
def _attention_forward_fake(q, k, v, bias, mask, q_seg, k_seg, scale, causal, causal_offset, masked_value,
                            score_fn, dropout_p, backend):  # fmt: skip
    check_inputs(q, k, v, bias, mask, q_seg, k_seg, score_fn)
    stats = q.new_empty(_stats_shape(backend, q, k, v, score_fn, masked_value, dropout_p), dtype=compute_dtype(q.dtype))
    return q.new_empty((*q.shape[:3], v.shape[3])), stats, q.new_empty((), dtype=torch.int64)


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
    out: Tensor,
    stats: Tensor,
    dropout_seed: Tensor,
    scale: float,
    causal: bool,
    causal_offset: int,
    masked_value: float,
    score_fn: str,
    dropout_p: float,
    backend: str,
    bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dbias) in the inputs' dtypes; dbias is empty when not `bias_grad`. `out`, `stats` and
    `dropout_seed` are attention_forward's outputs."""
    args = (grad_out, q, k, v, bias, mask, q_seg, k_seg, scale, causal, causal_offset, masked_value, score_fn)
    name = _choose(backend, q, k, v, score_fn, masked_value, dropout_p)
    count_call("attention_backward", "reference" if dropout_p > 0.0 and name != "triton" else name)
    if name == "triton":
        from fxfuse.backends.triton.attention_bwd import attention_triton_backward

        dq, dk, dv, dbias = attention_triton_backward(*args, bias_grad, out=out, stats=stats, dropout_p=dropout_p,
                                                      seed=int(dropout_seed.item()))  # fmt: skip
    elif dropout_p > 0.0:
        dq, dk, dv, ds = attention_reference_backward(*args, dropout_p, int(dropout_seed.item()))
        dbias = reduce_to_shape(ds, bias.shape) if bias_grad and bias is not None else None
    elif name == "cpu":
        from fxfuse.backends.cpu.attention import attention_cpu_backward

        dq, dk, dv, dbias = attention_cpu_backward(*args, bias_grad, out=out, stats=stats)
    else:
        dq, dk, dv, ds = attention_reference_backward(*args)
        dbias = reduce_to_shape(ds, bias.shape) if bias_grad and bias is not None else None
    dbias = dbias.to(bias.dtype) if dbias is not None else q.new_empty(0)
    grads = (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias)
    return tuple(g.contiguous() for g in grads)


@attention_backward_op.register_fake
def _attention_backward_fake(grad_out, q, k, v, bias, mask, q_seg, k_seg, out, stats, dropout_seed, scale, causal,
                             causal_offset, masked_value, score_fn, dropout_p, backend, bias_grad):  # fmt: skip
    dbias = bias.new_empty(bias.shape) if bias_grad and bias is not None else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias


class _Attention(torch.autograd.Function):
    """The autograd of `fxfuse::attention`: saves q, k, v (and bias, masks), the output and O(B*H*N)
    row statistics, never the [B, H, Nq, Nk] probabilities."""

    @staticmethod
    def forward(ctx, q, k, v, bias, mask, q_seg, k_seg, *params):
        out, stats, seed = torch.ops.fxfuse.attention_forward(q, k, v, bias, mask, q_seg, k_seg, *params)
        ctx.save_for_backward(q, k, v, bias, mask, q_seg, k_seg, out, stats, seed)
        ctx.params = params
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, bias, mask, q_seg, k_seg, out, stats, seed = ctx.saved_tensors
        bias_grad = bias is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dbias = torch.ops.fxfuse.attention_backward(
            grad_out, q, k, v, bias, mask, q_seg, k_seg, out, stats, seed, *ctx.params, bias_grad
        )
        return dq, dk, dv, dbias if bias_grad else None, *([None] * (3 + len(ctx.params)))


def _attention_autograd(keyset, *args):
    if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
        return _Attention.apply(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return attention_op.redispatch(keyset & torch._C._after_autograd_keyset, *args)


_lib.impl("attention", _attention_impl, "CompositeExplicitAutograd")
_lib.impl("attention", _attention_autograd, "Autograd", with_keyset=True)
