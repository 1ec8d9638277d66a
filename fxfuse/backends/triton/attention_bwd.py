"""Triton backward of `fxfuse::attention`, FlashAttention-2 style.

The forward hands over its output and row statistics (max and 1 / sum, [2, B, Hq, Nq]); without them
the forward kernel runs again. Then three kernels:
- delta = rowsum(dO * O) per query row (softmax only);
- dk, dv: one program per key block and kv head, looping over the query heads of its GQA group and
  over query blocks, so the group's gradients are summed in registers;
- dq: one program per query block and query head. When bias needs a gradient it also adds each dS
  tile into a float32 buffer of bias's own (broadcast) shape: summed in registers along broadcast query
  or key dims, by atomic adds along broadcast batch or head dims. A [1, H, N, N] or [B, 1, 1, N] bias
  never gets a [B, H, N, N] buffer; the order of the atomic adds makes it non-deterministic in the last
  bits on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fxfuse.backends import triton_interpreting
from fxfuse.backends.triton.attention import (
    attention_triton,
    broadcast_strides,
    dot_args,
    dropout_tile,
    flags,
    head_blocks,
    kernel_args,
    mma,
    score_tile,
)


@triton.jit
def _attn_bwd_delta(
    Out, DO, Delta, sob, soh, som, sod, sdb, sdh, sdm, sdd, H, NQ, DV,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64 offsets: b * stride can pass 2**31 elements
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    inb = (offs_m[:, None] < NQ) & (offs_dv[None, :] < DV)
    o = tl.load(Out + b * sob + h * soh + offs_m[:, None] * som + offs_dv[None, :] * sod, mask=inb, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_dv[None, :] * sdd, mask=inb, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh * NQ + offs_m, delta, mask=offs_m < NQ)


@triton.jit
def _probs_and_ds(
    s, keep, offs_m, offs_n, pid_bh, Stats, Delta, do, v, NQ, NK, STATS_SIZE, dropout_p, seed,
    SOFTMAX: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):  # fmt: skip
    """(p after dropout, dS) of one [BLOCK_M, BLOCK_N] tile; dS is 0 where a position was replaced by
    masked_value. With dropout, delta = rowsum(dO * O) still equals rowsum(p * dP) of the dropped p."""
    in_m = offs_m < NQ
    r = tl.maximum(s, 0.0)  # relu2 only; unused (and dropped by the compiler) for softmax
    if SOFTMAX:
        m = tl.load(Stats + pid_bh * NQ + offs_m, mask=in_m, other=0.0)
        inv_l = tl.load(Stats + STATS_SIZE + pid_bh * NQ + offs_m, mask=in_m, other=0.0)
        # Fully -inf rows: m = -inf and 1/l = inf give NaN, as the reference's p does there.
        p = tl.exp(s - m[:, None]) * inv_l[:, None]
    else:
        p = r * r
    valid = in_m[:, None] & (offs_n[None, :] < NK)
    p = tl.where(valid, p, 0.0)
    dp = mma(do, tl.trans(v), DOT_PRECISION, UPCAST_DOT)
    p_out = p
    if DROPOUT:
        p_out = dropout_tile(p, offs_m, offs_n, pid_bh, NK, dropout_p, seed)
        dp = dropout_tile(dp, offs_m, offs_n, pid_bh, NK, dropout_p, seed)
    if SOFTMAX:
        delta = tl.load(Delta + pid_bh * NQ + offs_m, mask=in_m, other=0.0)
        ds = p * (dp - delta[:, None])
    else:
        ds = dp * 2.0 * r
    ds = tl.where(keep & valid, ds, 0.0)
    return p_out, ds


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, Bias, Mask, QSeg, KSeg, DO, Stats, Delta, DK, DV_,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sbb, sbh, sbm, sbn, smb, smh, smm, smn, sqsb, sqsm, sksb, sksn,
    sdb, sdh, sdm, sdd, sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
    H, HKV, NQ, NK, D, DV, GROUP, scale, causal_offset, masked_value, STATS_SIZE, dropout_p, seed,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SEG: tl.constexpr, CAUSAL: tl.constexpr,
    SOFTMAX: tl.constexpr, SKIP_MASKED: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_bk = tl.program_id(1)
    b = (pid_bk // HKV).to(tl.int64)
    hk = pid_bk % HKV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    in_n = offs_n[:, None] < NK
    k = tl.load(
        K + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
        mask=in_n & (offs_d[None, :] < D), other=0.0,
    )  # fmt: skip
    v = tl.load(
        V + b * svb + hk * svh + offs_n[:, None] * svn + offs_dv[None, :] * svd,
        mask=in_n & (offs_dv[None, :] < DV), other=0.0,
    )  # fmt: skip
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    lo = 0
    if CAUSAL and SKIP_MASKED:
        # Query rows above this key block's diagonal see none of its keys.
        lo = (tl.maximum(pid_n * BLOCK_N - causal_offset, 0) // BLOCK_M) * BLOCK_M
    for g in range(0, GROUP):
        h = hk * GROUP + g
        for start_m in range(lo, NQ, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            in_m = offs_m[:, None] < NQ
            q = tl.load(
                Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=in_m & (offs_d[None, :] < D), other=0.0,
            )  # fmt: skip
            do = tl.load(
                DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_dv[None, :] * sdd,
                mask=in_m & (offs_dv[None, :] < DV), other=0.0,
            )  # fmt: skip
            s = mma(q, tl.trans(k), DOT_PRECISION, UPCAST_DOT) * scale
            s, keep = score_tile(
                s, offs_m, offs_n, b, h, Bias, Mask, QSeg, KSeg,
                sbb, sbh, sbm, sbn, smb, smh, smm, smn, sqsb, sqsm, sksb, sksn,
                NQ, NK, causal_offset, masked_value, HAS_BIAS, HAS_MASK, HAS_SEG, CAUSAL,
            )  # fmt: skip
            p, ds = _probs_and_ds(
                s, keep, offs_m, offs_n, b * H + h, Stats, Delta, do, v, NQ, NK, STATS_SIZE, dropout_p, seed,
                SOFTMAX, DROPOUT, DOT_PRECISION, UPCAST_DOT,
            )  # fmt: skip
            dv += mma(tl.trans(p.to(do.dtype)), do, DOT_PRECISION, UPCAST_DOT)
            dk += mma(tl.trans(ds.to(q.dtype)), q, DOT_PRECISION, UPCAST_DOT)
        if CAUSAL and SKIP_MASKED and SOFTMAX:
            # The rows skipped above see none of these keys, but one masked everywhere (m = -inf, NaN
            # output) has p = NaN at every key in the reference, so dv is NaN there too: match it.
            for start_m in range(0, lo, BLOCK_M):
                offs_m = start_m + tl.arange(0, BLOCK_M)
                m = tl.load(Stats + (b * H + h) * NQ + offs_m, mask=offs_m < lo, other=0.0)
                dead = tl.sum((m == float("-inf")).to(tl.int32), 0)
                dv = tl.where(dead > 0, float("nan"), dv)
    dk = dk * scale
    tl.store(
        DK + b * sdkb + hk * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd,
        dk.to(DK.dtype.element_ty), mask=in_n & (offs_d[None, :] < D),
    )  # fmt: skip
    tl.store(
        DV_ + b * sdvb + hk * sdvh + offs_n[:, None] * sdvn + offs_dv[None, :] * sdvd,
        dv.to(DV_.dtype.element_ty), mask=in_n & (offs_dv[None, :] < DV),
    )  # fmt: skip


@triton.jit
def _attn_bwd_dq(
    Q, K, V, Bias, Mask, QSeg, KSeg, DO, Stats, Delta, DQ, DB,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sbb, sbh, sbm, sbn, smb, smh, smm, smn, sqsb, sqsm, sksb, sksn,
    sdb, sdh, sdm, sdd, sdqb, sdqh, sdqm, sdqd, sdbb, sdbh, sdbm, sdbn,
    H, NQ, NK, D, DV, GROUP, scale, causal_offset, masked_value, STATS_SIZE, dropout_p, seed,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SEG: tl.constexpr, CAUSAL: tl.constexpr,
    SOFTMAX: tl.constexpr, SKIP_MASKED: tl.constexpr, DROPOUT: tl.constexpr,
    BIAS_GRAD: tl.constexpr, DB_SUM_M: tl.constexpr, DB_SUM_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64 offsets: b * stride can pass 2**31 elements
    h = pid_bh % H
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    in_m = offs_m[:, None] < NQ
    q = tl.load(
        Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
        mask=in_m & (offs_d[None, :] < D), other=0.0,
    )  # fmt: skip
    do = tl.load(
        DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_dv[None, :] * sdd,
        mask=in_m & (offs_dv[None, :] < DV), other=0.0,
    )  # fmt: skip
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = NK
    if CAUSAL and SKIP_MASKED:
        hi = tl.maximum(tl.minimum(NK, (pid_m + 1) * BLOCK_M + causal_offset), 0)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_n = offs_n[:, None] < NK
        k = tl.load(
            K + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
            mask=in_n & (offs_d[None, :] < D), other=0.0,
        )  # fmt: skip
        v = tl.load(
            V + b * svb + hk * svh + offs_n[:, None] * svn + offs_dv[None, :] * svd,
            mask=in_n & (offs_dv[None, :] < DV), other=0.0,
        )  # fmt: skip
        s = mma(q, tl.trans(k), DOT_PRECISION, UPCAST_DOT) * scale
        s, keep = score_tile(
            s, offs_m, offs_n, b, h, Bias, Mask, QSeg, KSeg,
            sbb, sbh, sbm, sbn, smb, smh, smm, smn, sqsb, sqsm, sksb, sksn,
            NQ, NK, causal_offset, masked_value, HAS_BIAS, HAS_MASK, HAS_SEG, CAUSAL,
        )  # fmt: skip
        p, ds = _probs_and_ds(
            s, keep, offs_m, offs_n, pid_bh, Stats, Delta, do, v, NQ, NK, STATS_SIZE, dropout_p, seed,
            SOFTMAX, DROPOUT, DOT_PRECISION, UPCAST_DOT,
        )  # fmt: skip
        if BIAS_GRAD:
            # dS summed into bias's shape: strides are 0 along its broadcast dims.
            db = DB + b * sdbb + h * sdbh
            if DB_SUM_M and DB_SUM_N:
                tl.atomic_add(db, tl.sum(tl.sum(ds, 1), 0))
            elif DB_SUM_M:
                tl.atomic_add(db + offs_n * sdbn, tl.sum(ds, 0), mask=offs_n < NK)
            elif DB_SUM_N:
                tl.atomic_add(db + offs_m * sdbm, tl.sum(ds, 1), mask=offs_m < NQ)
            else:
                tl.atomic_add(db + offs_m[:, None] * sdbm + offs_n[None, :] * sdbn, ds,
                              mask=in_m & (offs_n[None, :] < NK))  # fmt: skip
        dq += mma(ds.to(k.dtype), k, DOT_PRECISION, UPCAST_DOT)
    dq = dq * scale
    tl.store(
        DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :] * sdqd,
        dq.to(DQ.dtype.element_ty), mask=in_m & (offs_d[None, :] < D),
    )  # fmt: skip


def attention_triton_backward(
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
    dropout_p: float = 0.0,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """dq [B, Hq, Nq, D], dk [B, Hkv, Nk, D], dv [B, Hkv, Nk, Dv] in the inputs' dtypes, and dbias in
    bias's shape (float32) when `bias_grad`, else None. `out` and `stats` are the forward's (recomputed
    when not given); dropout_p and seed must be the forward's."""
    b, hq, nq, d = q.shape
    hkv, nk, dv_dim = k.shape[1], k.shape[2], v.shape[3]
    args = (q, k, v, bias, mask, q_seg, k_seg, scale, causal, causal_offset, masked_value, score_fn)
    if score_fn == "softmax" and (out is None or stats is None or stats.numel() == 0):
        out, stats = attention_triton(*args, store_stats=True, dropout_p=dropout_p, seed=seed)
    elif score_fn != "softmax":
        stats = None
    block_d, block_dv = head_blocks(q, v)
    if triton_interpreting():
        block_m, block_n = 16, 16
    elif max(block_d, block_dv) <= 128:
        block_m, block_n = 32, 32
    else:
        block_m, block_n = 16, 16
    delta = None
    if stats is not None:
        delta = torch.empty((b, hq, nq), dtype=torch.float32, device=q.device)
        _attn_bwd_delta[(triton.cdiv(nq, block_m), b * hq)](
            out, grad_out, delta, *out.stride(), *grad_out.stride(), hq, nq, dv_dim,
            BLOCK_M=block_m, BLOCK_DV=block_dv,
        )  # fmt: skip
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    stats = stats if stats is not None else dq  # relu2: never read
    delta = delta if delta is not None else dq
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    has_db = bias_grad and bias is not None
    db = dq
    if has_db:
        db = torch.zeros((1,) * (4 - bias.dim()) + tuple(bias.shape), dtype=torch.float32, device=q.device)
    db_strides = broadcast_strides(db if has_db else None, (b, hq, nq, nk))
    tensors, strides = kernel_args(q, k, v, bias, mask, q_seg, k_seg)
    common = dict(
        **flags(bias, mask, q_seg, causal, masked_value, score_fn),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
        **dot_args(q.dtype), DROPOUT=dropout_p > 0.0, num_warps=4, num_stages=1,
    )  # fmt: skip
    scalars = (float(scale), int(causal_offset), float(masked_value), b * hq * nq, float(dropout_p), int(seed))
    _attn_bwd_dkdv[(triton.cdiv(nk, block_n), b * hkv)](
        q, k, v, *tensors, grad_out, stats, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *strides, *grad_out.stride(), *dk.stride(), *dv.stride(),
        hq, hkv, nq, nk, d, dv_dim, hq // hkv, *scalars, **common,
    )  # fmt: skip
    _attn_bwd_dq[(triton.cdiv(nq, block_m), b * hq)](
        q, k, v, *tensors, grad_out, stats, delta, dq, db,
        *q.stride(), *k.stride(), *v.stride(), *strides, *grad_out.stride(), *dq.stride(), *db_strides,
        hq, nq, nk, d, dv_dim, hq // hkv, *scalars, BIAS_GRAD=has_db,
        DB_SUM_M=has_db and db.shape[2] == 1 and nq > 1, DB_SUM_N=has_db and db.shape[3] == 1 and nk > 1,
        **common,
    )  # fmt: skip
    return dq, dk, dv, db.view(bias.shape) if has_db else None
