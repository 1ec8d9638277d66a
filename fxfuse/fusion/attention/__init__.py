"""Fused attention: the `fxfuse::attention` op (registered on import) and its Python entry point."""

from __future__ import annotations

import math

from torch import Tensor

from fxfuse.fusion.attention.op import attention_backend, attention_op, check_inputs
from fxfuse.fusion.attention.reference import attention_reference

__all__ = ["attention", "attention_backend", "attention_op", "attention_reference"]


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    bias: Tensor | None = None,
    mask: Tensor | None = None,
    q_seg: Tensor | None = None,
    k_seg: Tensor | None = None,
    scale: float | None = None,
    causal: bool = False,
    causal_offset: int = 0,
    masked_value: float = float("-inf"),
    score_fn: str = "softmax",
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> Tensor:
    """Attention of q [B, Hq, Nq, D] over k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv] -> [B, Hq, Nq, Dv].

    s = (q @ k^T) * scale (default 1/sqrt(D)) + bias, bias broadcastable to [B, Hq, Nq, Nk]; then s is
    replaced by masked_value where mask [.., Nq, Nk] (bool, True = attend) is False, where j > i +
    causal_offset if causal, and where q_seg [B, Nq] and k_seg [B, Nk] segment ids differ. p =
    softmax(s) (score_fn="softmax") or relu(s)**2 ("relu2"), with dropout_p dropout; out = p @ v.
    Query head h reads kv head h // (Hq // Hkv) (GQA). A fully-masked row gives NaN with masked_value
    -inf and the mean of v with finfo(float32).min, as the formula does. backend: "auto", "triton",
    "cpu" or "reference"; `attention_backend` tells which one runs. Gradients flow to q, k, v and bias;
    dropout_p > 0 runs in the Triton kernels (a Philox mask drawn in-kernel) or else in the reference,
    seeded from torch's generator; the backward replays the forward's mask, eagerly or traced.
    """
    check_inputs(q, k, v, bias, mask, q_seg, k_seg, score_fn)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return attention_op(
        q, k, v, bias, mask, q_seg, k_seg, float(scale), bool(causal), int(causal_offset),
        float(masked_value), score_fn, float(dropout_p), backend,
    )  # fmt: skip
