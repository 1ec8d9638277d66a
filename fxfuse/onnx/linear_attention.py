"""`fxfuse::linear_attention` -> standard ONNX in the reassociated order, computed in float32.

Semantics (fxfuse/fusion/linear_attention/reference.py): w[i, j] = scale * (q_i . k_j) [* causal mask
* gamma_h^(i - j)], out_i = sum_j w[i, j] v_j [/ (sum_j w[i, j] + eps) or / max(sum_j w[i, j], eps)].
- non-causal: q @ (k^T @ v) and q @ sum_j k_j, two MatMuls per product (O(N D E));
- causal: CumSum over the sequence of the outer products k_j v_j^T ([B, H, N, D, E], O(N D E) memory
  instead of the N x N weights) and of k_j, then one batched MatMul per row;
- block-exclusive (block = c): the sequence zero-padded to whole blocks (Pad from the runtime length),
  per block k^T v (MatMul) and sum_j k_j (ReduceSum), CumSum(exclusive=1) over the blocks, one MatMul
  per block of queries, the padding sliced off: exactly j // c < i // c, O(N D E);
- causal with decay: no standard op carries a decayed running state, so the weights are formed with a
  Pow(gamma, i - j) mask from the runtime length (quadratic, as the original model was).
"""

from __future__ import annotations

import torch
from onnxscript.onnx_opset import opset23 as op

FLOAT = 1  # onnx TensorProto.FLOAT


def check_linear_attention(node: torch.fx.Node) -> str:
    """How this node will be lowered, or raise ValueError saying why it cannot be."""
    q, k = node.args[0].meta["val"], node.args[1].meta["val"]
    causal, decay = node.args[4], node.args[5]
    block = node.args[9] if len(node.args) > 9 else node.kwargs.get("block", 0)
    if q.shape[1] != k.shape[1] and not all(isinstance(d, int) for d in (q.shape[1], k.shape[1], k.shape[3])):
        raise ValueError("grouped kv heads need static head counts and head size to export")
    if block:
        return f"block-exclusive (blocks of {block}): per-block MatMul(k^T, v), CumSum exclusive over blocks, MatMul"
    if decay is not None:
        return "causal with decay: MatMul with a Pow(gamma, i - j) mask (quadratic), MatMul"
    if causal:
        return "causal: CumSum of k v^T outer products and of k, MatMul per row"
    return "MatMul(q, MatMul(k^T, v)) and MatMul(q, ReduceSum(k))"


def _expand_kv(t, hq: int, hkv: int, d: int):
    """[B, Hkv, N, D] -> [B, Hq, N, D]: query head h reads kv head h // (Hq // Hkv)."""
    if hkv == hq:
        return t
    grouped = op.Expand(op.Unsqueeze(t, [2]), op.Constant(value_ints=[1, 1, hq // hkv, 1, 1]))
    return op.Reshape(grouped, op.Constant(value_ints=[0, hq, -1, d]))


def _decay_weights(q, k, decay: list[float]):
    """w [B, H, N, N] = (q k^T) * gamma_h^(i - j) on and below the diagonal, 0 above."""
    n = op.Squeeze(op.Shape(q, start=2, end=3), [0])
    zero, one = op.Constant(value_int=0), op.Constant(value_int=1)
    steps = op.Cast(op.Range(zero, n, one), to=FLOAT)
    dist = op.Sub(op.Unsqueeze(steps, [1]), op.Unsqueeze(steps, [0]))  # i - j
    gamma = op.Constant(value_floats=list(decay))
    gamma = op.Reshape(gamma, op.Constant(value_ints=[-1, 1, 1]))
    powers = op.Pow(gamma, op.Max(dist, op.Constant(value_float=0.0)))
    mask = op.Where(op.GreaterOrEqual(dist, op.Constant(value_float=0.0)), powers, op.Constant(value_float=0.0))
    return op.Mul(op.MatMul(q, op.Transpose(k, perm=[0, 1, 3, 2])), mask)


def _block_exclusive(q, k, v, block: int):
    """(num [B, H, N, E], rowsum [B, H, N, 1]) over the keys of the earlier blocks, j // c < i // c."""
    n = op.Shape(q, start=2, end=3)
    pad = op.Mod(op.Sub(op.Constant(value_ints=[block]), op.Mod(n, op.Constant(value_ints=[block]))),
                 op.Constant(value_ints=[block]))  # fmt: skip
    zeros6 = op.Constant(value_ints=[0, 0, 0, 0, 0, 0])
    pads = op.Concat(zeros6, pad, op.Constant(value_ints=[0]), axis=0)  # zero rows after the last one

    def blocks(t):  # [B, H, N, X] -> [B, H, G, c, X]
        shape = op.Concat(
            op.Shape(t, start=0, end=2), op.Constant(value_ints=[-1, block]), op.Shape(t, start=3), axis=0
        )
        return op.Reshape(op.Pad(t, pads), shape)

    qb, kb, vb = blocks(q), blocks(k), blocks(v)
    axis = op.Constant(value_int=2)
    states = op.CumSum(op.MatMul(op.Transpose(kb, perm=[0, 1, 2, 4, 3]), vb), axis, exclusive=1)  # [B, H, G, D, E]
    ksum = op.CumSum(op.ReduceSum(kb, op.Constant(value_ints=[3]), keepdims=1), axis, exclusive=1)  # [B, H, G, 1, D]
    zero, two = op.Constant(value_ints=[0]), op.Constant(value_ints=[2])

    def rows(t):  # [B, H, G, c, X] -> [B, H, N, X]
        shape = op.Concat(op.Shape(t, start=0, end=2), op.Constant(value_ints=[-1]), op.Shape(t, start=4), axis=0)
        return op.Slice(op.Reshape(t, shape), zero, n, two)

    num = rows(op.MatMul(qb, states))
    rowsum = rows(op.MatMul(qb, op.Transpose(ksum, perm=[0, 1, 2, 4, 3])))
    return num, rowsum


def linear_attention_to_onnx(
    q, k, v, scale: float, causal: bool, decay, normalize: str, eps: float, backend: str, block: int = 0
):
    """Translation of fxfuse::linear_attention (q [B, Hq, N, D], k [B, Hkv, M, D], v [B, Hkv, M, E])."""
    hq, hkv, d, e = q.shape[1], k.shape[1], k.shape[3], v.shape[3]
    qf, kf, vf = (op.Cast(t, to=FLOAT) for t in (q, k, v))
    kf, vf = _expand_kv(kf, hq, hkv, d), _expand_kv(vf, hq, hkv, e)
    if block:
        num, rowsum = _block_exclusive(qf, kf, vf, int(block))
    elif decay is not None:
        w = _decay_weights(qf, kf, decay)
        num = op.MatMul(w, vf)
        rowsum = op.ReduceSum(w, op.Constant(value_ints=[-1]), keepdims=1)
    elif causal:
        outer = op.Mul(op.Unsqueeze(kf, [4]), op.Unsqueeze(vf, [3]))  # [B, H, N, D, E]
        state = op.CumSum(outer, op.Constant(value_int=2))
        num = op.Squeeze(op.MatMul(op.Unsqueeze(qf, [3]), state), [3])  # [B, H, N, 1, D] @ [B, H, N, D, E]
        ksum = op.CumSum(kf, op.Constant(value_int=2))
        rowsum = op.ReduceSum(op.Mul(qf, ksum), op.Constant(value_ints=[-1]), keepdims=1)
    else:
        num = op.MatMul(qf, op.MatMul(op.Transpose(kf, perm=[0, 1, 3, 2]), vf))
        ksum = op.ReduceSum(kf, op.Constant(value_ints=[2]), keepdims=1)  # [B, H, 1, D]
        rowsum = op.MatMul(qf, op.Transpose(ksum, perm=[0, 1, 3, 2]))
    scale_c = op.Constant(value_float=float(scale))
    out = op.Mul(num, scale_c)
    if normalize != "none":
        rowsum = op.Mul(rowsum, scale_c)
        eps_c = op.Constant(value_float=float(eps))
        den = op.Add(rowsum, eps_c) if normalize == "eps" else op.Max(rowsum, eps_c)
        out = op.Div(out, den)
    return op.CastLike(out, q)
