"""Float32 reference of `fxfuse::attention`: the semantics every fast path must reproduce, and the oracle.

Shapes: q [B, Hq, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv], out [B, Hq, Nq, Dv]; bias and mask
broadcast to [B, Hq, Nq, Nk]; q_seg [B, Nq], k_seg [B, Nk].

The functions here take any block of query rows: `causal_offset` is the offset of that block, so the
CPU path can run them on query chunks (rows of attention are independent).
"""

from __future__ import annotations

import torch
from torch import Tensor

SCORE_FNS = ("softmax", "relu2")


def build_keep(
    mask: Tensor | None,
    q_seg: Tensor | None,
    k_seg: Tensor | None,
    causal: bool,
    causal_offset: int,
    nq: int,
    nk: int,
    device: torch.device,
) -> Tensor | None:
    """Bool "attend" mask broadcastable to [B, Hq, Nq, Nk], or None when every position is kept."""
    keep = None
    if mask is not None:
        keep = mask
    if causal:
        i = torch.arange(nq, device=device).unsqueeze(-1)
        j = torch.arange(nk, device=device)
        tri = j <= i + causal_offset
        keep = tri if keep is None else keep & tri
    if q_seg is not None and k_seg is not None:
        same = (q_seg.unsqueeze(-1) == k_seg.unsqueeze(-2)).unsqueeze(1)  # [B, 1, Nq, Nk]
        keep = same if keep is None else keep & same
    return keep


def expand_kv(t: Tensor, hq: int) -> Tensor:
    """[B, Hkv, N, D] -> [B, Hq, N, D]: query head h reads kv head h // (Hq // Hkv)."""
    groups = hq // t.shape[1]
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def reduce_kv(t: Tensor, hkv: int) -> Tensor:
    """[B, Hq, N, D] -> [B, Hkv, N, D]: sums the gradients of the query heads sharing a kv head."""
    b, hq, n, d = t.shape
    return t if hq == hkv else t.view(b, hkv, hq // hkv, n, d).sum(2)


def reduce_to_shape(t: Tensor, shape: torch.Size) -> Tensor:
    """Sums `t` over the dimensions that a tensor of `shape` was broadcast along to reach t.shape."""
    lead = t.dim() - len(shape)
    if lead:
        t = t.sum(dim=tuple(range(lead)))
    dims = tuple(i for i, s in enumerate(shape) if s == 1 and t.shape[i] != 1)
    if dims:
        t = t.sum(dim=dims, keepdim=True)
    return t


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half inputs (and float32), float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def _scores(q, k, bias, mask, q_seg, k_seg, scale, causal, causal_offset, masked_value):
    """Scores [B, Hq, Nq, Nk] after bias and masking (compute dtype), and the keep mask (or None)."""
    acc = compute_dtype(q.dtype)
    kf = expand_kv(k.to(acc), q.shape[1])
    s = torch.matmul(q.to(acc), kf.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.to(acc)
    keep = build_keep(mask, q_seg, k_seg, causal, causal_offset, q.shape[2], k.shape[2], q.device)
    if keep is not None:
        # Replaced, not added: this is what masked_fill in user code does, fully-masked rows included.
        s = s.masked_fill(~keep, masked_value)
    return s, keep


def dropout_scale(shape: tuple[int, ...], dropout_p: float, seed: int, device: torch.device) -> Tensor:
    """Inverted-dropout multiplier [B, Hq, Nq, Nk] (0 or 1 / (1 - p)), a function of `seed` alone so
    the backward can replay the forward's mask."""
    gen = torch.Generator(device=device).manual_seed(seed)
    keep = torch.rand(shape, generator=gen, device=device) >= dropout_p
    return keep / (1.0 - dropout_p)


def _probs(s: Tensor, score_fn: str) -> Tensor:
    if score_fn == "softmax":
        return torch.softmax(s, dim=-1)
    return torch.relu(s).square()


def attention_reference(
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
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
) -> Tensor:
    """Materialized attention in float32: [B, Hq, Nq, D] x [B, Hkv, Nk, D] -> [B, Hq, Nq, Dv] in q's dtype."""
    s, _ = _scores(q, k, bias, mask, q_seg, k_seg, scale, causal, causal_offset, masked_value)
    p = _probs(s, score_fn)
    if dropout_p > 0.0:
        p = p * dropout_scale(p.shape, dropout_p, dropout_seed, p.device)
    out = torch.matmul(p, expand_kv(v.to(p.dtype), q.shape[1]))
    return out.to(q.dtype)


def attention_reference_backward(
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
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of `attention_reference` in float32 (float64 for float64 inputs).

    Returns dq [B, Hq, Nq, D], dk [B, Hkv, Nk, D], dv [B, Hkv, Nk, Dv] and dS [B, Hq, Nq, Nk], the
    gradient of the scores before masking (= the gradient of a bias broadcast to that shape).
    Written out rather than by autograd so it runs inside a custom op's implementation.
    """
    hkv = k.shape[1]
    s, keep = _scores(q, k, bias, mask, q_seg, k_seg, scale, causal, causal_offset, masked_value)
    p = _probs(s, score_fn)
    do = grad_out.to(s.dtype)
    vf = expand_kv(v.to(s.dtype), q.shape[1])
    drop = dropout_scale(p.shape, dropout_p, dropout_seed, p.device) if dropout_p > 0.0 else None
    p_used = p if drop is None else p * drop
    dv = reduce_kv(torch.matmul(p_used.transpose(-1, -2), do), hkv)
    dp = torch.matmul(do, vf.transpose(-1, -2))
    if drop is not None:
        dp = dp * drop
    if score_fn == "softmax":
        ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    else:
        ds = dp * 2.0 * torch.relu(s)
    if keep is not None:
        # Replaced positions do not depend on q, k or bias (also where p is NaN in fully-masked rows).
        ds = ds.masked_fill(~keep, 0.0)
    dq = torch.matmul(ds, expand_kv(k.to(s.dtype), q.shape[1])) * scale
    dk = reduce_kv(torch.matmul(ds.transpose(-1, -2), q.to(s.dtype)) * scale, hkv)
    return dq, dk, dv, ds
