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
    reduce_to_shape,
)

# Score elements per chunk of the chunked path (float32): 4M elements = 16 MB, about an L3's worth.
_CHUNK_ELEMENTS = 1 << 22


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


def _sdpa(q, k, v, bias, mask, q_seg, k_seg, scale, causal, causal_offset, masked_value) -> Tensor:
    nq, nk = q.shape[2], k.shape[2]
    # Half inputs: the reference accumulates in float32 and finfo(float32).min would overflow a half mask.
    acc = compute_dtype(q.dtype)
    qf, kf, vf = (t if t.dtype == acc else t.to(acc) for t in (q, k, v))
    only_causal = causal and causal_offset == 0 and bias is None and mask is None and q_seg is None
    if only_causal:
        # SDPA's is_causal is top-left aligned (j <= i), i.e. causal_offset == 0; no row is fully masked.
        out = F.scaled_dot_product_attention(qf, kf, vf, is_causal=True, scale=scale, enable_gqa=True)
        return out.to(q.dtype)
    keep = build_keep(mask, q_seg, k_seg, causal, causal_offset, nq, nk, q.device)
    if bias is None and keep is not None and masked_value == -math.inf:
        attn_mask = keep
        dead = ~keep.any(-1, keepdim=True)
    else:
        attn_mask = bias.to(acc) if bias is not None else None
        if keep is not None:
            base = attn_mask if attn_mask is not None else torch.zeros((), dtype=acc, device=q.device)
            attn_mask = torch.where(keep, base, torch.tensor(masked_value, dtype=acc, device=q.device))
        dead = None if attn_mask is None else (attn_mask == -math.inf).all(-1, keepdim=True)
    out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=attn_mask, scale=scale, enable_gqa=True)
    if dead is not None and bool(dead.any()):  # the test is cheaper than an unneeded masked_fill
        out = out.masked_fill(dead, math.nan)
    return out if out.dtype == q.dtype else out.to(q.dtype)


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
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Gradients over query chunks, in float32 (float64 for float64 inputs).

    Returns dq [B, Hq, Nq, D], dk [B, Hkv, Nk, D], dv [B, Hkv, Nk, Dv], and dbias in bias's shape when
    `bias_grad` (else None).
    """
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
