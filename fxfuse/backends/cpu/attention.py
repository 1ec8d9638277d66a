"""CPU fast path of `fxfuse::attention`: ATen's scaled_dot_product_attention where it is exact, else the
float32 reference run over query chunks so the [Nq, Nk] score matrix is never materialized whole.

Shapes: q [B, Hq, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv] -> out [B, Hq, Nq, Dv].

SDPA on CPU (torch 2.13) returns 0 for a fully-masked row (bool mask all False, or a float mask of
-inf), where the formula it stands for gives NaN; `attention_cpu` puts the NaN back. With a float mask
of finfo(float32).min it gives the uniform average, as the formula does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fxfuse.fusion.attention.reference import (
    attention_reference,
    attention_reference_backward,
    build_keep,
    compute_dtype,
    expand_kv,
    reduce_kv,
    reduce_to_shape,
)

# Score elements per chunk of the chunked path (float32): 4M elements = 16 MB, about an L3's worth.
_CHUNK_ELEMENTS = 1 << 22
# Mask values at or below this leave a score saturated (s + value rounds to value): see _flash_backward.
_SATURATED = torch.finfo(torch.float32).min / 2


def sdpa_unsupported(score_fn: str, masked_value: float) -> str | None:
    """Why SDPA cannot express this case exactly (None when it can)."""
    if score_fn != "softmax":
        return f"score_fn={score_fn!r} is not a softmax"
    # SDPA adds its float mask; adding a value this negative to a finite score gives that value back in
    # float32, so adding equals replacing. A milder masked value (e.g. -1e4) would not.
    if not (masked_value == -math.inf or masked_value <= torch.finfo(torch.float32).min / 2):
        return f"masked_value={masked_value} is finite and not ~finfo(float32).min"
    return None


def _rows(t: Tensor | None, start: int, stop: int) -> Tensor | None:
    """Query rows [start, stop) of a tensor broadcastable to [B, H, Nq, Nk] (unchanged if broadcast)."""
    if t is None or t.dim() < 2 or t.shape[-2] == 1:
        return t
    return t[..., start:stop, :]


def _chunk_rows(q: Tensor, nk: int) -> int:
    b, h = q.shape[0], q.shape[1]
    return max(1, _CHUNK_ELEMENTS // max(1, b * h * nk))


def _sdpa_mask(q, bias, mask, q_seg, k_seg, causal, causal_offset, masked_value, nk):
    """(attn_mask for SDPA (bool, float in the compute dtype, or None), is_causal, rows to set to NaN or
    None). SDPA adds a float mask, which equals replacing by masked_value (see sdpa_unsupported)."""
    nq, acc = q.shape[2], compute_dtype(q.dtype)
    if causal and causal_offset == 0 and bias is None and mask is None and q_seg is None:
        # SDPA's is_causal is top-left aligned (j <= i), i.e. causal_offset == 0; no row is fully masked.
        return None, True, None
    keep = build_keep(mask, q_seg, k_seg, causal, causal_offset, nq, nk, q.device)
    if bias is None and keep is not None and masked_value == -math.inf:
        return keep, False, ~keep.any(-1, keepdim=True)
    attn_mask = bias.to(acc) if bias is not None else None
    if keep is not None:
        base = attn_mask if attn_mask is not None else torch.zeros((), dtype=acc, device=q.device)
        attn_mask = torch.where(keep, base, torch.tensor(masked_value, dtype=acc, device=q.device))
    if attn_mask is not None and attn_mask.dim() < 2:  # SDPA takes masks of rank >= 2 (a 0-d bias is legal)
        attn_mask = attn_mask.reshape((1,) * (2 - attn_mask.dim()) + tuple(attn_mask.shape))
    dead = None if attn_mask is None else (attn_mask == -math.inf).all(-1, keepdim=True)
    return attn_mask, False, dead


def _nan_rows(out: Tensor, dead: Tensor | None) -> Tensor:
    if dead is not None and bool(dead.any()):  # the test is cheaper than an unneeded masked_fill
        out = out.masked_fill(dead, math.nan)
    return out


def _sdpa(q, k, v, bias, mask, q_seg, k_seg, scale, causal, causal_offset, masked_value) -> Tensor:
    # Half inputs: the reference accumulates in float32 and finfo(float32).min would overflow a half mask.
    acc = compute_dtype(q.dtype)
    qf, kf, vf = (t if t.dtype == acc else t.to(acc) for t in (q, k, v))
    attn_mask, is_causal, dead = _sdpa_mask(q, bias, mask, q_seg, k_seg, causal, causal_offset, masked_value,
                                            k.shape[2])  # fmt: skip
    out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                         enable_gqa=True)  # fmt: skip
    out = _nan_rows(out, dead)
    return out if out.dtype == q.dtype else out.to(q.dtype)


def cpu_stats_unsupported(dtype: torch.dtype, head_dim: int, v_head_dim: int, score_fn: str,
                          masked_value: float) -> str | None:  # fmt: skip
    """Why ATen's CPU flash attention cannot give this case's log-sum-exp (None when it can)."""
    why = sdpa_unsupported(score_fn, masked_value)
    if why is not None:
        return why
    if dtype not in (torch.float32, torch.float64):
        return f"dtype {dtype} (the chunked backward recomputes the row statistics)"
    if head_dim != v_head_dim:
        return "q/k and v head dims differ"
    return None


def _flash_inputs(q, k, v, bias, mask, q_seg, k_seg, causal, causal_offset, masked_value):
    """k and v with the query's heads, and SDPA's mask as a float mask (the flash kernels take no bool)."""
    attn_mask, is_causal, dead = _sdpa_mask(q, bias, mask, q_seg, k_seg, causal, causal_offset, masked_value,
                                            k.shape[2])  # fmt: skip
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros((), dtype=q.dtype).masked_fill(~attn_mask, -math.inf)
    if attn_mask is not None and attn_mask.dim() != 4:  # the flash kernels take 2-D or 4-D masks
        attn_mask = attn_mask.view((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    return _dense_rows(expand_kv(k, q.shape[1])), _dense_rows(expand_kv(v, q.shape[1])), attn_mask, is_causal, dead


def _dense_rows(t: Tensor) -> Tensor:
    """`t` with a unit stride on its last axis: the raw ATen flash kernels read rows as dense (SDPA's
    wrapper copies for them; called directly, a [B, H, D, N] tensor seen transposed gave NaN and wrong
    gradients)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def attention_cpu_with_stats(
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
) -> tuple[Tensor, Tensor | None]:
    """Forward for training: (out [B, Hq, Nq, Dv], row log-sum-exp [B, Hq, Nq] for the backward, or None
    where `cpu_stats_unsupported`)."""
    if cpu_stats_unsupported(q.dtype, q.shape[3], v.shape[3], score_fn, masked_value) is not None:
        return attention_cpu(q, k, v, bias, mask, q_seg, k_seg, scale, causal, causal_offset, masked_value,
                             score_fn), None  # fmt: skip
    kx, vx, attn_mask, is_causal, dead = _flash_inputs(q, k, v, bias, mask, q_seg, k_seg, causal, causal_offset,
                                                       masked_value)  # fmt: skip
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        _dense_rows(q), kx, vx, 0.0, is_causal, attn_mask=attn_mask, scale=scale
    )
    return _nan_rows(out, dead), lse


def _flash_backward(grad_out, q, k, v, bias, mask, q_seg, k_seg, out, lse, scale, causal, causal_offset,
                    masked_value) -> tuple[Tensor, Tensor, Tensor] | None:  # fmt: skip
    """(dq, dk, dv) from ATen's CPU flash backward with the forward's log-sum-exp, or None where a row is
    masked everywhere: its log-sum-exp (masked value + log N rounds to the masked value) does not give
    back its probabilities."""
    kx, vx, attn_mask, is_causal, _ = _flash_inputs(q, k, v, bias, mask, q_seg, k_seg, causal, causal_offset,
                                                    masked_value)  # fmt: skip
    if attn_mask is not None and not bool((attn_mask > _SATURATED).any(-1).all()):
        return None
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out.contiguous(), _dense_rows(q), kx, vx, out, lse, 0.0, is_causal, attn_mask=attn_mask, scale=scale
    )
    return dq, reduce_kv(dk, k.shape[1]), reduce_kv(dv, k.shape[1])


def attention_cpu(
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
) -> Tensor:
    """Forward on CPU tensors (no dropout): [B, Hq, Nq, D], [B, Hkv, Nk, D], [B, Hkv, Nk, Dv] ->
    [B, Hq, Nq, Dv]."""
    if sdpa_unsupported(score_fn, masked_value) is None:
        return _sdpa(q, k, v, bias, mask, q_seg, k_seg, scale, causal, causal_offset, masked_value)
    nq, nk = q.shape[2], k.shape[2]
    step = _chunk_rows(q, nk)
    outs = []
    for start in range(0, nq, step):
        stop = min(nq, start + step)
        outs.append(
            attention_reference(
                q[:, :, start:stop],
                k,
                v,
                _rows(bias, start, stop),
                _rows(mask, start, stop),
                None if q_seg is None else q_seg[:, start:stop],
                k_seg,
                scale,
                causal,
                causal_offset + start,
                masked_value,
                score_fn,
            )
        )
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def attention_cpu_backward(
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
    bias_grad: bool,
    out: Tensor | None = None,
    stats: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Gradients, in float32 (float64 for float64 inputs): from the forward's output and log-sum-exp
    `stats` [B, Hq, Nq] by ATen's CPU flash backward where it applies, else over query chunks.

    Returns dq [B, Hq, Nq, D], dk [B, Hkv, Nk, D], dv [B, Hkv, Nk, Dv], and dbias in bias's shape when
    `bias_grad` (else None): summed chunk by chunk, so a broadcast bias never gets a [B, H, Nq, Nk] buffer.
    """
    if stats is not None and stats.numel() and out is not None and not bias_grad:
        grads = _flash_backward(grad_out, q, k, v, bias, mask, q_seg, k_seg, out, stats, scale, causal,
                                causal_offset, masked_value)  # fmt: skip
        if grads is not None:
            return (*grads, None)
    nq, nk = q.shape[2], k.shape[2]
    step = _chunk_rows(q, nk)
    dqs = []
    acc = compute_dtype(q.dtype)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    dbias = None
    if bias_grad and bias is not None:
        shape4 = (1,) * (4 - bias.dim()) + tuple(bias.shape)
        dbias = torch.zeros(shape4, dtype=acc, device=bias.device)
    for start in range(0, nq, step):
        stop = min(nq, start + step)
        dq_c, dk_c, dv_c, ds_c = attention_reference_backward(
            grad_out[:, :, start:stop],
            q[:, :, start:stop],
            k,
            v,
            _rows(bias, start, stop),
            _rows(mask, start, stop),
            None if q_seg is None else q_seg[:, start:stop],
            k_seg,
            scale,
            causal,
            causal_offset + start,
            masked_value,
            score_fn,
        )
        dqs.append(dq_c)
        dk += dk_c
        dv += dv_c
        if dbias is not None:
            if dbias.shape[2] != 1:  # bias has a query dim: these rows are its own
                rows = (*dbias.shape[:2], stop - start, dbias.shape[3])
                dbias[:, :, start:stop] = reduce_to_shape(ds_c, rows)
            else:
                dbias += reduce_to_shape(ds_c, dbias.shape)
    dq = dqs[0] if len(dqs) == 1 else torch.cat(dqs, dim=2)
    if dbias is not None:
        dbias = dbias.view(bias.shape)
    return dq, dk, dv, dbias
