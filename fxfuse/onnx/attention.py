"""`fxfuse::attention` -> one ONNX `Attention` node (opset 23), or an explicit MatMul/Softmax subgraph.

Semantics to reproduce (fxfuse/fusion/attention/reference.py): s = q @ k^T * scale + bias; positions where
mask is False, j > i + causal_offset (causal) or q_seg != k_seg are *replaced* by masked_value; softmax
(or relu(s)^2); @ v. Checked against ONNX Runtime 1.32 (CPU):
- `attn_mask` must have Nq rows (no broadcast on that axis), so a [B, 1, 1, Nk] padding mask is expanded;
- GQA with 4-D inputs, `is_causal` (upper-left aligned: offset 0) and both mask kinds work;
- a row whose mask entries are all False, -inf or float32's lowest gives 0 in ORT, where our op (and the
  model it replaced) gives NaN (-inf) or the mean of v (a finite lowest value): a Where after the node
  puts the model's value back.
Replacing a score by masked_value equals adding it to the score when it is -inf, or when it is so large
(|v| >= 1e30, fp32/fp64) that s + v rounds to v; other masked values (-1e4, fp16 minima) take the explicit
path, as do relu2 scores. Dropout is refused: an exported model runs in inference.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from onnxscript.onnx_opset import opset23 as op

# arguments of fxfuse::attention after q, k, v
ARGS = ("bias", "mask", "q_seg", "k_seg", "scale", "causal", "causal_offset", "masked_value", "score_fn",
        "dropout_p", "backend")
ADDITIVE_LIMIT = -1e30  # masked values at or below this add like a replacement in fp32/fp64


def attention_plan(
    *, has_bias: bool, has_keep: bool, causal: bool, causal_offset: int, masked_value: float,
    score_fn: str, dropout_p: float, dtype: torch.dtype,
) -> tuple[str, str]:
    """("Attention" | "explicit", what the lowering does) for one site; raises ValueError if impossible."""
    if dropout_p > 0.0:
        raise ValueError(f"attention with dropout_p={dropout_p} cannot be exported; call model.eval() first")
    if score_fn != "softmax":
        return "explicit", f"{score_fn} scores: MatMul/Relu/Mul/MatMul subgraph (ONNX Attention is softmax only)"
    masks = has_keep or (causal and causal_offset != 0)
    additive = masked_value == -math.inf or (
        masked_value <= ADDITIVE_LIMIT and dtype in (torch.float32, torch.float64)
    )
    if masks and not additive:
        return "explicit", (f"masked_value {masked_value:g} replaces scores (not additive in {dtype}): "
                            "MatMul/Where/Softmax/MatMul subgraph")
    parts = ["Attention"]
    if causal and causal_offset == 0 and not (has_bias or has_keep):
        parts.append("is_causal")
    elif causal:
        parts.append(f"causal offset {causal_offset} as mask")
    if has_keep:
        parts.append("bool mask" if masked_value == -math.inf and not has_bias else "additive mask")
    elif has_bias:
        parts.append("bias as additive mask")
    return "Attention", ", ".join(parts)


def check_attention(node: torch.fx.Node) -> str:
    """How this attention node will be lowered, or raise ValueError saying why it cannot be."""
    q = node.args[0].meta["val"]
    named = dict(zip(ARGS, node.args[3:]))
    _, desc = attention_plan(
        has_bias=named["bias"] is not None,
        has_keep=named["mask"] is not None or named["q_seg"] is not None,
        causal=named["causal"], causal_offset=named["causal_offset"], masked_value=named["masked_value"],
        score_fn=named["score_fn"], dropout_p=named["dropout_p"], dtype=q.dtype,
    )
    k = node.args[1].meta["val"]
    if q.shape[1] != k.shape[1] and not all(isinstance(d, int) for d in (q.shape[1], k.shape[1], k.shape[3])):
        raise ValueError("grouped-query attention needs static head counts and head size to export")
    return desc


def _const(value: float, like):
    return op.CastLike(op.Constant(value_float=value), like)


def _causal_keep(q, k, offset: int):
    """[Nq, Nk] bool: j <= i + offset, from the runtime sequence lengths (dynamic shapes stay dynamic)."""
    nq = op.Squeeze(op.Shape(q, start=2, end=3), [0])
    nk = op.Squeeze(op.Shape(k, start=2, end=3), [0])
    zero, one = op.Constant(value_int=0), op.Constant(value_int=1)
    rows = op.Unsqueeze(op.Add(op.Range(zero, nq, one), op.Constant(value_int=offset)), [1])
    cols = op.Unsqueeze(op.Range(zero, nk, one), [0])
    return op.LessOrEqual(cols, rows)


def _keep_mask(q, k, mask, q_seg, k_seg, causal: bool, causal_offset: int, fold_causal: bool):
    keep = mask
    if q_seg is not None:
        same = op.Equal(op.Unsqueeze(q_seg, [1, 3]), op.Unsqueeze(k_seg, [1, 2]))  # [B, 1, Nq, Nk]
        keep = same if keep is None else op.And(keep, same)
    if causal and (fold_causal or causal_offset != 0):
        tri = _causal_keep(q, k, causal_offset)
        keep = tri if keep is None else op.And(keep, tri)
    return keep


def _expand_kv(t, hq: int):
    """[B, Hkv, N, D] -> [B, Hq, N, D]: query head h reads kv head h // (Hq // Hkv)."""
    hkv, d = t.shape[1], t.shape[3]
    if hkv == hq:
        return t
    grouped = op.Expand(op.Unsqueeze(t, [2]), op.Constant(value_ints=[1, 1, hq // hkv, 1, 1]))
    return op.Reshape(grouped, op.Constant(value_ints=[0, hq, -1, d]))


def _rows_mask(mask, q, k):
    """Expand a mask to Nq rows and Nk columns (ORT does not broadcast its last two axes)."""
    shape = mask.shape
    if shape is not None and len(shape) >= 2 and shape[-2] == q.shape[2] and shape[-1] == k.shape[2]:
        return mask
    target = op.Concat(op.Constant(value_ints=[1, 1]), op.Shape(q, start=2, end=3), op.Shape(k, start=2, end=3),
                       axis=0)
    return op.Expand(mask, target)


def _mean_v(v, hq: int):
    return _expand_kv(op.ReduceMean(v, op.Constant(value_ints=[2]), keepdims=1), hq)


def _restore_dead_rows(y, attn_mask, is_bool: bool, v, hq: int, lowest: float):
    """Rows ORT zeroes (every entry False / -inf / lowest) get the value the model computes there."""
    if is_bool:
        alive = op.ReduceMax(op.Cast(attn_mask, to=1), op.Constant(value_ints=[-1]), keepdims=1)
        return op.Where(op.Greater(alive, _const(0.0, alive)), y, _const(math.nan, y))
    row_max = op.ReduceMax(attn_mask, op.Constant(value_ints=[-1]), keepdims=1)
    dead = op.LessOrEqual(row_max, _const(lowest, row_max))
    fill = op.Where(op.Equal(row_max, _const(-math.inf, row_max)), _const(math.nan, y), _mean_v(v, hq))
    return op.Where(dead, fill, y)


def _explicit(q, k, v, bias, keep, scale: float, masked_value: float, score_fn: str):
    hq = q.shape[1]
    k, v = _expand_kv(k, hq), _expand_kv(v, hq)
    s = op.Mul(op.MatMul(q, op.Transpose(k, perm=[0, 1, 3, 2])), _const(scale, q))
    if bias is not None:
        s = op.Add(s, op.CastLike(bias, s))
    if keep is not None:
        s = op.Where(keep, s, _const(masked_value, s))
    if score_fn == "softmax":
        p = op.Softmax(s, axis=-1)
    else:
        r = op.Relu(s)
        p = op.Mul(r, r)
    return op.MatMul(p, v)


def attention_to_onnx(q, k, v, bias, mask, q_seg, k_seg, scale: float, causal: bool, causal_offset: int,
                      masked_value: float, score_fn: str, dropout_p: float, backend: str):
    """Translation of fxfuse::attention (q [B, Hq, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv])."""
    dtype = {np.float16: torch.float16, np.float64: torch.float64}.get(q.dtype.numpy().type, torch.float32)
    has_keep = mask is not None or q_seg is not None
    kind, _ = attention_plan(has_bias=bias is not None, has_keep=has_keep, causal=causal,
                             causal_offset=causal_offset, masked_value=masked_value, score_fn=score_fn,
                             dropout_p=dropout_p, dtype=dtype)
    fold_causal = bias is not None or has_keep  # one mask then describes every dropped score
    keep = _keep_mask(q, k, mask, q_seg, k_seg, causal, causal_offset, fold_causal or kind == "explicit")
    if kind == "explicit":
        return _explicit(q, k, v, bias, keep, scale, masked_value, score_fn)
    is_bool = keep is not None and bias is None and masked_value == -math.inf
    if is_bool:
        attn_mask = keep
    elif keep is not None:
        base = _const(0.0, q) if bias is None else op.CastLike(bias, q)
        attn_mask = op.Where(keep, base, _const(masked_value, q))
    else:
        attn_mask = None if bias is None else op.CastLike(bias, q)
    is_causal = int(causal and causal_offset == 0 and not fold_causal)
    if attn_mask is not None:
        attn_mask = _rows_mask(attn_mask, q, k)
    y, _, _, _ = op.Attention(q, k, v, attn_mask, scale=float(scale), is_causal=is_causal)
    if attn_mask is None:
        return y
    lowest = float(np.finfo(q.dtype.numpy()).min)
    return _restore_dead_rows(y, attn_mask, is_bool, v, q.shape[1], lowest)
