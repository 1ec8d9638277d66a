"""`fxfuse::attention` -> one ONNX `Attention` node (opset 23), or an explicit MatMul/Softmax subgraph.

Semantics to reproduce (fxfuse/fusion/attention/reference.py): s = q @ k^T * scale + bias; positions where
mask is False, j > i + causal_offset (causal) or q_seg != k_seg are *replaced* by masked_value; softmax
(or relu(s)^2); @ v. Checked against ONNX Runtime 1.32 (CPU):
- `attn_mask` must have Nq rows (no broadcast on that axis), so a [B, 1, 1, Nk] padding mask is expanded;
- GQA, 3-D inputs with q_num_heads/kv_num_heads, `is_causal` (upper-left: offset 0), bool and float masks;
- a row whose mask entries are all False, -inf or exactly float32's lowest gives 0 in ORT, where the model
  gives NaN (-inf) or the mean of v (lowest: s + lowest rounds to lowest, a uniform row). So finite fills
  are moved to lowest / 2 (still "s + fill == fill", but an ordinary number to ORT) and NaN rows are put
  back after the node (`/ any(row)` for bool masks, `+ 0 * rowmax` for float ones). Left approximate: a
  row mixing -inf and lowest and nothing else (the model averages v over the lowest entries only).
Replacing a score by masked_value equals adding it when it is -inf, or when it is so large (<= -1e30,
fp32/fp64) that s + v rounds to v; other masked values (-1e4, fp16 minima) take the explicit path, as do
relu2 scores. Dropout is refused: an exported model runs in inference.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from onnxscript.onnx_opset import opset23 as op

# arguments of fxfuse::attention after q, k, v
ARGS = (
    "bias",
    "mask",
    "q_seg",
    "k_seg",
    "scale",
    "causal",
    "causal_offset",
    "masked_value",
    "score_fn",
    "dropout_p",
    "backend",
)
ADDITIVE_LIMIT = -1e30  # masked values at or below this add like a replacement in fp32/fp64


def attention_plan(
    *,
    has_bias: bool,
    has_keep: bool,
    causal: bool,
    causal_offset: int,
    masked_value: float,
    score_fn: str,
    dropout_p: float,
    dtype: torch.dtype,
) -> tuple[str, str]:
    """("Attention" | "explicit", what the lowering does) for one site; raises ValueError if impossible."""
    if dropout_p > 0.0:
        raise ValueError(f"attention with dropout_p={dropout_p} cannot be exported; call model.eval() first")
    if score_fn != "softmax":
        return (
            "explicit",
            f"{score_fn} scores: MatMul/Relu/Mul/MatMul subgraph (ONNX Attention is softmax only)",
        )
    masks = has_keep or (causal and causal_offset != 0)
    additive = masked_value == -math.inf or (
        masked_value <= ADDITIVE_LIMIT and dtype in (torch.float32, torch.float64)
    )
    if masks and not additive:
        return "explicit", (
            f"masked_value {masked_value:g} replaces scores (not additive in {dtype}): "
            "MatMul/Where/Softmax/MatMul subgraph"
        )
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
        causal=named["causal"],
        causal_offset=named["causal_offset"],
        masked_value=named["masked_value"],
        score_fn=named["score_fn"],
        dropout_p=named["dropout_p"],
        dtype=q.dtype,
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


def _expand_kv(t, hq: int, hkv: int, d: int):
    """[B, Hkv, N, D] -> [B, Hq, N, D]: query head h reads kv head h // (Hq // Hkv)."""
    if hkv == hq:
        return t
    grouped = op.Expand(op.Unsqueeze(t, [2]), op.Constant(value_ints=[1, 1, hq // hkv, 1, 1]))
    return op.Reshape(grouped, op.Constant(value_ints=[0, hq, -1, d]))


def _rows_mask(mask, q, k):
    """Expand a mask to Nq rows and Nk columns (ORT does not broadcast its last two axes)."""
    shape = mask.shape
    if shape is not None and len(shape) >= 2 and shape[-2] == q.shape[2] and shape[-1] == k.shape[2]:
        return mask
    target = op.Concat(
        op.Constant(value_ints=[1, 1]), op.Shape(q, start=2, end=3), op.Shape(k, start=2, end=3), axis=0
    )
    return op.Expand(mask, target)


def _cast(t, like):
    return t if t.dtype is not None and t.dtype == like.dtype else op.CastLike(t, like)


def _ints(value) -> list[int] | None:
    """The integers a constant input holds (an initializer or a Constant node's output), else None."""
    const = value.const_value if value is not None else None
    node = value.producer() if value is not None else None
    if const is None and node is not None and node.op_type == "Constant":
        attr = node.attributes.get("value") or node.attributes.get("value_ints")
        const = attr.value if attr is not None else None
    if const is None:
        return None
    return [int(i) for i in np.asarray(const.numpy() if hasattr(const, "numpy") else const).reshape(-1)]


def _perm(node) -> list[int] | None:
    perm = node.attributes.get("perm") if node is not None and node.op_type == "Transpose" else None
    return None if perm is None else list(perm.value)


def _bnhd_source(t):
    """u [B, N, H, D] with t = Transpose(u, [0, 2, 1, 3]), when the graph already holds u up to a view:
    ORT's Attention reads [B, N, H*D] directly, which saves a copy per input (1.25-1.4x at small sizes).
    Two spellings: heads split off [B, N, C] and transposed (most models); [N, B*H, D] transposed to
    [B*H, N, D] and unsqueezed to a batch of one (sequence-first models, nn.MultiheadAttention style)."""
    node = t.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    if _perm(node) == [0, 2, 1, 3]:
        return node.inputs[0]
    if node.op_type == "Unsqueeze" and _ints(node.inputs[1]) == [0]:
        inner = node.inputs[0].producer()
        if _perm(inner) == [1, 0, 2]:
            return op.Unsqueeze(inner.inputs[0], op.Constant(value_ints=[0]))
    return None


def _mask_rank_if_headless(bias, mask, q_seg, causal: bool) -> int | None:
    """Rank of the combined mask when it has no head axis (so a per-row term fits a [B, N, H*D] output),
    else None. Seg ids give [B, 1, Nq, Nk], a causal mask [Nq, Nk]."""
    ranks = [4] if q_seg is not None else []
    ranks += [2] if causal else []
    for t in (bias, mask):
        if t is None:
            continue
        if t.shape is None:
            return None
        dims = [1] * (4 - len(t.shape)) + list(t.shape)
        if dims[1] != 1:
            return None
        ranks.append(len(t.shape))
    return max(ranks, default=None)


def _row_term_3d(term, rank: int):
    """[B|1, 1, Nq|1, 1] -> [B|1, Nq|1, 1]; lower ranks already broadcast against [B, Nq, H*Dv]."""
    return op.Squeeze(term, op.Constant(value_ints=[1])) if rank == 4 else term


def _mask_and_guard(q, k, bias, keep, masked_value: float, rows_never_empty: bool):
    """attn_mask for ORT, and a per-row term restoring what the model computes where ORT would not.

    ORT zeroes rows whose mask is all False / -inf / lowest. Finite masked values and lowest entries of a
    bias are moved to -2^127 (which ORT treats as a number: a fully masked row then averages v, as the
    model's finfo.min does); rows the model makes all -inf get NaN through `+ 0 * rowmax` (bool masks:
    `/ any(row)`, 0/0). Returns (attn_mask, ("div" | "add", term) | None)."""
    floor = float(np.finfo(q.dtype.numpy()).min) / 2
    if keep is not None and bias is None and masked_value == -math.inf:
        any_kept = op.ReduceMax(op.Cast(keep, to=1), op.Constant(value_ints=[-1]), keepdims=1)
        guard = None if rows_never_empty else ("div", op.CastLike(any_kept, q))
        return keep, guard
    if keep is not None:
        base = _const(0.0, q) if bias is None else _cast(bias, q)
        fill = masked_value if masked_value == -math.inf else max(masked_value, floor)
        attn_mask = op.Where(keep, base, _const(fill, q))
    elif bias is not None:
        attn_mask = _cast(bias, q)
    else:
        return None, None
    if bias is None and masked_value != -math.inf:
        return attn_mask, None  # already above ORT's threshold, no -inf anywhere
    row_max = op.ReduceMax(attn_mask, op.Constant(value_ints=[-1]), keepdims=1)
    guard = ("add", op.Mul(row_max, _const(0.0, q)))
    return op.Max(attn_mask, _const(floor, q)), guard


def _batch_of_one(t):
    """x [N', N, D] when t = Unsqueeze(x, 0) (a 3-D attention lifted to the op's 4-D form), else None."""
    node = t.producer()
    if node is None or node.op_type != "Unsqueeze" or node.domain not in ("", "ai.onnx"):
        return None
    return node.inputs[0] if _ints(node.inputs[1]) == [0] else None


def _explicit(q, k, v, bias, keep, scale: float, masked_value: float, score_fn: str):
    hq = q.shape[1]
    flat = [_batch_of_one(t) for t in (q, k, v)]
    if bias is None and keep is None and k.shape[1] == hq and all(t is not None for t in flat):
        # batched 3-D MatMuls on the tensors the model had, no Unsqueeze in front of every input
        q3, k3, v3 = flat
        s = op.Mul(op.MatMul(q3, op.Transpose(k3, perm=[0, 2, 1])), _const(scale, q))
        return op.Unsqueeze(op.MatMul(_scores_to_probs(s, score_fn), v3), op.Constant(value_ints=[0]))
    k, v = _expand_kv(k, hq, k.shape[1], k.shape[3]), _expand_kv(v, hq, v.shape[1], v.shape[3])
    s = op.Mul(op.MatMul(q, op.Transpose(k, perm=[0, 1, 3, 2])), _const(scale, q))
    if bias is not None:
        s = op.Add(s, _cast(bias, s))
    if keep is not None:
        s = op.Where(keep, s, _const(masked_value, s))
    return op.MatMul(_scores_to_probs(s, score_fn), v)


def _scores_to_probs(s, score_fn: str):
    if score_fn == "softmax":
        return op.Softmax(s, axis=-1)
    r = op.Relu(s)
    return op.Mul(r, r)


def _apply(y, guard):
    if guard is None:
        return y
    kind, term = guard
    return op.Div(y, term) if kind == "div" else op.Add(y, term)


def attention_to_onnx(
    q,
    k,
    v,
    bias,
    mask,
    q_seg,
    k_seg,
    scale: float,
    causal: bool,
    causal_offset: int,
    masked_value: float,
    score_fn: str,
    dropout_p: float,
    backend: str,
):
    """Translation of fxfuse::attention (q [B, Hq, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv])."""
    dtype = {np.float16: torch.float16, np.float64: torch.float64}.get(q.dtype.numpy().type, torch.float32)
    has_keep = mask is not None or q_seg is not None
    kind, _ = attention_plan(
        has_bias=bias is not None,
        has_keep=has_keep,
        causal=causal,
        causal_offset=causal_offset,
        masked_value=masked_value,
        score_fn=score_fn,
        dropout_p=dropout_p,
        dtype=dtype,
    )
    fold_causal = bias is not None or has_keep  # one mask then describes every dropped score
    keep = _keep_mask(q, k, mask, q_seg, k_seg, causal, causal_offset, fold_causal or kind == "explicit")
    if kind == "explicit":
        return _explicit(q, k, v, bias, keep, scale, masked_value, score_fn)
    # no row is ever fully masked when only a causal mask with offset >= 0 (key 0 stays) and segment ids
    # q and k share (the token itself stays) drop scores
    rows_never_empty = (
        mask is None and (q_seg is None or q_seg is k_seg) and (not causal or causal_offset >= 0)
    )
    attn_mask, guard = _mask_and_guard(q, k, bias, keep, masked_value, rows_never_empty)
    is_causal = int(causal and causal_offset == 0 and not fold_causal)
    if attn_mask is not None:
        attn_mask = _rows_mask(attn_mask, q, k)
    hq, hkv, dv = q.shape[1], k.shape[1], v.shape[3]
    sources = [_bnhd_source(t) for t in (q, k, v)]
    heads_static = all(isinstance(d, int) for d in (hq, hkv, dv))
    rank = _mask_rank_if_headless(bias, mask, q_seg, causal and fold_causal)
    if heads_static and all(s is not None for s in sources) and (guard is None or rank is not None):
        q3, k3, v3 = (op.Reshape(s, op.Constant(value_ints=[0, 0, -1])) for s in sources)
        y3, _, _, _ = op.Attention(
            q3, k3, v3, attn_mask, scale=float(scale), is_causal=is_causal, q_num_heads=hq, kv_num_heads=hkv
        )
        y3 = _apply(y3, None if guard is None else (guard[0], _row_term_3d(guard[1], rank)))
        # the caller's merge (transpose back, reshape) cancels this transpose in the optimized graph
        return op.Transpose(op.Reshape(y3, op.Constant(value_ints=[0, 0, hq, dv])), perm=[0, 2, 1, 3])
    y, _, _, _ = op.Attention(q, k, v, attn_mask, scale=float(scale), is_causal=is_causal)
    return _apply(y, guard)
