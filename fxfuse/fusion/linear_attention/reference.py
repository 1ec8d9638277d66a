"""Float32 reference of `fxfuse::linear_attention`: the quadratic form written out, the test oracle.

Shapes: q [B, Hq, N, D] and k [B, Hkv, M, D] (feature maps already applied), v [B, Hkv, M, E],
out [B, Hq, N, E]. Query head h reads kv head h // (Hq // Hkv).

    w[i, j] = scale * (q_i . k_j) * mask[i, j]      mask = 1, or (j <= i) * gamma_h^(i - j) when causal
                                                    or (j // c < i // c) when causal with block = c > 0
    out_i   = sum_j w[i, j] v_j  /  den_i            den = 1, sum_j w[i, j] + eps, or clamp(sum_j w[i, j], eps)

Everything the fused op computes reduces to one primitive, `decayed_product(a, b, c)`: the weights above
with `a` for q and `b` for k, applied to `c`. The row sums are the product with a column of ones appended
to v, and the backward is three more products (see `linear_attention_reference_backward`), so a backend
that implements the primitive implements the op, forward and backward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

NORMALIZERS = ("none", "eps", "clamp")
# decayed_product(a, b, c, scale, causal, decay, reverse, block) -> [B, H, N, E] in float32
Product = Callable[[Tensor, Tensor, Tensor, float, bool, "Tensor | None", bool, int], Tensor]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half inputs (and float32), float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def expand_kv(t: Tensor, hq: int) -> Tensor:
    """[B, Hkv, M, D] -> [B, Hq, M, D]: query head h reads kv head h // (Hq // Hkv)."""
    groups = hq // t.shape[1]
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def reduce_kv(t: Tensor, hkv: int) -> Tensor:
    """[B, Hq, M, D] -> [B, Hkv, M, D]: the gradients of the query heads sharing a kv head, summed."""
    b, hq, m, d = t.shape
    return t if hq == hkv else t.view(b, hkv, hq // hkv, m, d).sum(2)


def decay_tensor(decay: Sequence[float] | None, heads: int, device: torch.device) -> Tensor | None:
    """Per-head gamma as a float64 [H] tensor (one value is shared by every head), or None."""
    if decay is None:
        return None
    gamma = torch.tensor(list(decay), dtype=torch.float64, device=device)
    return gamma.expand(heads) if gamma.numel() == 1 else gamma


def causal_weights(n: int, gamma: Tensor | None, device: torch.device, dtype: torch.dtype) -> Tensor:
    """[H or 1, N, N]: (j <= i) * gamma_h^(i - j), the exponent in float64 before the cast."""
    i = torch.arange(n, device=device)
    dist = (i[:, None] - i[None, :]).to(torch.float64)
    lower = dist >= 0
    if gamma is None:
        return lower.to(dtype).unsqueeze(0)
    powers = torch.pow(gamma.view(-1, 1, 1), dist.clamp(min=0))
    return torch.where(lower, powers, 0.0).to(dtype)


def block_weights(n: int, block: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """[1, N, N]: (j // block < i // block), block-exclusive: a position sees the keys of the blocks before
    its own, none of its own block (the last block may be partial)."""
    blocks = torch.arange(n, device=device) // block
    return (blocks[None, :] < blocks[:, None]).to(dtype).unsqueeze(0)


def quadratic_product(
    a: Tensor, b: Tensor, c: Tensor, scale: float, causal: bool, decay: Tensor | None, reverse: bool = False,
    block: int = 0,
) -> Tensor:  # fmt: skip
    """out_i = scale * sum_j mask[i, j] (a_i . b_j) c_j with the N x M weights materialized (float32).

    a [B, H, N, D], b [B, H, M, D], c [B, H, M, E] -> [B, H, N, E]. `reverse` flips the causal direction
    (j >= i, gamma^(j - i); with a block j // block > i // block): the backward's products run that way."""
    acc = compute_dtype(a.dtype)
    w = torch.matmul(a.to(acc), b.to(acc).transpose(-1, -2)) * scale
    if causal:
        if block > 0:
            mask = block_weights(a.shape[-2], block, a.device, acc)
        else:
            mask = causal_weights(a.shape[-2], decay, a.device, acc)
        w = w * (mask.transpose(-1, -2) if reverse else mask)
    return torch.matmul(w, c.to(acc))


def _with_ones(v: Tensor) -> Tensor:
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)


def _denominator(rowsum: Tensor, normalize: str, eps: float) -> Tensor:
    return rowsum + eps if normalize == "eps" else rowsum.clamp(min=eps)


def linear_attention_forward(
    product: Product, q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool,
    decay: Sequence[float] | None, normalize: str, eps: float, block: int = 0,
) -> Tensor:  # fmt: skip
    """The op's forward in the compute dtype, with the products of `product` (any backend's)."""
    acc = compute_dtype(q.dtype)
    hq = q.shape[1]
    kf, vf = expand_kv(k, hq).to(acc), expand_kv(v, hq).to(acc)
    gamma = decay_tensor(decay, hq, q.device)
    if normalize == "none":
        return product(q.to(acc), kf, vf, scale, causal, gamma, False, block)
    if not causal and product is not quadratic_product:
        # non-causal row sums are q_i . sum_j k_j: one small product instead of a column appended to v
        rowsum = torch.matmul(q.to(acc), kf.sum(-2, keepdim=True).transpose(-1, -2)) * scale
        return product(q.to(acc), kf, vf, scale, False, None, False) / _denominator(rowsum, normalize, eps)
    y = product(q.to(acc), kf, _with_ones(vf), scale, causal, gamma, False, block)
    return y[..., :-1] / _denominator(y[..., -1:], normalize, eps)


def linear_attention_backward(
    product: Product, grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool,
    decay: Sequence[float] | None, normalize: str, eps: float, block: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(dq, dk, dv) in the compute dtype from four products.

    With c = v (or [v, 1] when normalized) and g the gradient of the unnormalized c-product y
    (do / den for the values, -(do . out) / den for the row sum, zeroed where clamp cut it):
    dq_i = scale sum_{j} mask[i, j] (g_i . c_j) k_j        -> product(g, c, k)
    dk_j = scale sum_{i} mask[i, j] (c_j . g_i) q_i        -> product(c, g, q), reversed
    dc_j = scale sum_{i} mask[i, j] (k_j . q_i) g_i        -> product(k, q, g), reversed
    """
    acc = compute_dtype(q.dtype)
    hq, hkv = q.shape[1], k.shape[1]
    qf, kf, vf = q.to(acc), expand_kv(k, hq).to(acc), expand_kv(v, hq).to(acc)
    do = grad_out.to(acc)
    gamma = decay_tensor(decay, hq, q.device)
    if normalize == "none":
        c, g = vf, do
    else:
        c = _with_ones(vf)
        y = product(qf, kf, c, scale, causal, gamma, False, block)
        rowsum = y[..., -1:]
        den = _denominator(rowsum, normalize, eps)
        out = y[..., :-1] / den
        dden = -(do * out).sum(-1, keepdim=True) / den
        if normalize == "clamp":
            dden = dden * (rowsum >= eps)  # clamp passes the gradient where it did not cut
        g = torch.cat([do / den, dden], dim=-1)
    dq = product(g, c, kf, scale, causal, gamma, False, block)
    dk = product(c, g, qf, scale, causal, gamma, True, block)
    dc = product(kf, qf, g, scale, causal, gamma, True, block)
    dv = dc if normalize == "none" else dc[..., :-1]
    return dq, reduce_kv(dk, hkv), reduce_kv(dv, hkv)


def linear_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, scale: float = 1.0, causal: bool = False,
    decay: Sequence[float] | None = None, normalize: str = "none", eps: float = 0.0, block: int = 0,
) -> Tensor:  # fmt: skip
    """Materialized linear attention in float32: q [B, Hq, N, D], k [B, Hkv, M, D], v [B, Hkv, M, E]
    -> [B, Hq, N, E] in q's dtype (see the module docstring for the formula)."""
    out = linear_attention_forward(quadratic_product, q, k, v, scale, causal, decay, normalize, eps, block)
    return out.to(q.dtype)


def linear_attention_reference_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, scale: float = 1.0, causal: bool = False,
    decay: Sequence[float] | None = None, normalize: str = "none", eps: float = 0.0, block: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Gradients of `linear_attention_reference` (compute dtype) with materialized products."""
    return linear_attention_backward(quadratic_product, grad_out, q, k, v, scale, causal, decay, normalize, eps, block)
