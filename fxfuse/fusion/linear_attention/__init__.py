"""Fused linear attention: the `fxfuse::linear_attention` op (registered on import) and its entry point."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from fxfuse.fusion.linear_attention.op import check_inputs, linear_attention_backend, linear_attention_op
from fxfuse.fusion.linear_attention.reference import linear_attention_reference

__all__ = ["linear_attention", "linear_attention_backend", "linear_attention_op", "linear_attention_reference"]


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float = 1.0,
    causal: bool = False,
    decay: Sequence[float] | None = None,
    normalize: str = "none",
    eps: float = 0.0,
    backend: str = "auto",
    block: int = 0,
) -> Tensor:
    """Softmax-free attention of q [B, Hq, N, D] over k [B, Hkv, M, D], v [B, Hkv, M, E] -> [B, Hq, N, E].

    q and k are the feature maps phi(Q), phi(K) (applied by the caller). With w[i, j] = scale * (q_i . k_j),
    times (j <= i) * gamma_h^(i - j) when causal (decay: one gamma, or one per query head; none = 1):
    out_i = sum_j w[i, j] v_j, divided by sum_j w[i, j] + eps (normalize="eps") or by
    clamp(sum_j w[i, j], min=eps) ("clamp"). Computed as phi(Q)(phi(K)^T V) (chunked when causal) with
    float32 states: O(N D E) instead of O(N M D). Query head h reads kv head h // (Hq // Hkv).
    block=c > 0 (causal only, no decay): block-exclusive instead of token-causal, position i sees the
    keys j with j // c < i // c (none of its own block of c; the last block may be partial; a row that
    sees no key has row sum 0, so eps / clamp decides its normalised value).
    backend: "auto", "triton", "cpu" or "reference"; gradients flow to q, k and v.
    """
    decay = None if decay is None else [float(g) for g in decay]
    check_inputs(q, k, v, causal, decay, normalize, int(block))
    return linear_attention_op(q, k, v, float(scale), bool(causal), decay, normalize, float(eps), backend, int(block))
