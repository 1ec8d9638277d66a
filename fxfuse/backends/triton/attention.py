"""Triton forward of `fxfuse::attention`, FlashAttention-2 style (backward in attention_bwd.py).

One program computes a [BLOCK_M] block of query rows of one (batch, query head): it walks the keys in
[BLOCK_N] tiles, keeps a running max and sum of the softmax (online softmax), and writes the output
and the row statistics that the backward uses: the max m and 1 / sum, not the usual log-sum-exp, since
m + log(sum) rounds back to m when masked_value is finfo(float32).min and would lose the 1/N of a
fully-masked (uniform) row. GQA reads kv head h // GROUP directly (no copies);
bias and mask are read through their broadcast strides (0 along broadcast dims).

Shapes: q [B, Hq, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv] -> out [B, Hq, Nq, Dv], stats [2, B, Hq, Nq].
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from fxfuse.backends import triton_interpreting

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def triton_unsupported(dtype: torch.dtype, head_dim: int, v_head_dim: int, dropout_p: float) -> str | None:
    """Why the Triton kernels cannot run this case (None when they can)."""
    if dtype not in TRITON_DTYPES:
        return f"dtype {dtype} is not float16/bfloat16/float32"
    if not (1 <= head_dim <= MAX_HEAD_DIM and 1 <= v_head_dim <= MAX_HEAD_DIM):
        return f"head dims ({head_dim}, {v_head_dim}) are outside 1..{MAX_HEAD_DIM}"
    return None


@triton.jit
def mma(a, b, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """tl.dot with a float32 accumulator; UPCAST_DOT works around the Triton interpreter's bfloat16 dot
    (Triton 3.9 returns garbage for it on CPU), on GPUs bfloat16 goes to the tensor cores as is."""
    if UPCAST_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def dropout_tile(p, offs_m, offs_n, pid_bh, NK, dropout_p, seed):
    """Inverted dropout of a [BLOCK_M, BLOCK_N] tile: p / (1 - dropout_p) where kept, 0 elsewhere. The
    keep mask is Philox(seed + batch*head, row * NK + key): the backward draws the same one."""
    offs = offs_m[:, None].to(tl.int64) * NK + offs_n[None, :]
    keep = tl.rand(seed + pid_bh, offs) >= dropout_p
    return tl.where(keep, p / (1.0 - dropout_p), 0.0)


@triton.jit
def score_tile(
    s, offs_m, offs_n, b, h,
    Bias, Mask, QSeg, KSeg,
    sbb, sbh, sbm, sbn, smb, smh, smm, smn, sqsb, sqsm, sksb, sksn,
    NQ, NK, causal_offset, masked_value,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SEG: tl.constexpr, CAUSAL: tl.constexpr,
):  # fmt: skip
    """Scaled scores [BLOCK_M, BLOCK_N] -> (scores after bias and masking, keep mask).

    Masked positions are replaced by masked_value (as the reference does); keys past NK are not keys
    at all and get -inf, so they never count, not even in a fully-masked row.
    """
    in_m = offs_m[:, None] < NQ
    in_n = offs_n[None, :] < NK
    if HAS_BIAS:
        bias = tl.load(
            Bias + b * sbb + h * sbh + offs_m[:, None] * sbm + offs_n[None, :] * sbn,
            mask=in_m & in_n, other=0.0,
        )  # fmt: skip
        s = s + bias.to(tl.float32)
    keep = (offs_m[:, None] >= 0) & (offs_n[None, :] >= 0)
    if HAS_MASK:
        m = tl.load(
            Mask + b * smb + h * smh + offs_m[:, None] * smm + offs_n[None, :] * smn,
            mask=in_m & in_n, other=1,
        )  # fmt: skip
        keep = keep & (m != 0)
    if CAUSAL:
        keep = keep & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
    if HAS_SEG:
        qs = tl.load(QSeg + b * sqsb + offs_m * sqsm, mask=offs_m < NQ, other=0)
        ks = tl.load(KSeg + b * sksb + offs_n * sksn, mask=offs_n < NK, other=0)
        keep = keep & (qs[:, None] == ks[None, :])
    s = tl.where(keep, s, masked_value)
    s = tl.where(in_n, s, float("-inf"))
    return s, keep


@triton.jit
def _attn_fwd(
    Q, K, V, Bias, Mask, QSeg, KSeg, Out, Stats,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sbb, sbh, sbm, sbn, smb, smh, smm, smn, sqsb, sqsm, sksb, sksn,
    sob, soh, som, sod,
    H, NQ, NK, D, DV, GROUP, scale, causal_offset, masked_value, STATS_SIZE, dropout_p, seed,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SEG: tl.constexpr, CAUSAL: tl.constexpr,
    SOFTMAX: tl.constexpr, SKIP_MASKED: tl.constexpr, STORE_STATS: tl.constexpr, DROPOUT: tl.constexpr,
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
    q = tl.load(
        Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
        mask=(offs_m[:, None] < NQ) & (offs_d[None, :] < D), other=0.0,
    )  # fmt: skip
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    hi = NK
    if CAUSAL and SKIP_MASKED:
        # Keys past the last row's diagonal are masked and, with masked_value -inf, contribute nothing.
        hi = tl.maximum(tl.minimum(NK, (pid_m + 1) * BLOCK_M + causal_offset), 0)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(
            K + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
            mask=(offs_n[:, None] < NK) & (offs_d[None, :] < D), other=0.0,
        )  # fmt: skip
        v = tl.load(
            V + b * svb + hk * svh + offs_n[:, None] * svn + offs_dv[None, :] * svd,
            mask=(offs_n[:, None] < NK) & (offs_dv[None, :] < DV), other=0.0,
        )  # fmt: skip
        s = mma(q, tl.trans(k), DOT_PRECISION, UPCAST_DOT) * scale
        s, keep = score_tile(
            s, offs_m, offs_n, b, h, Bias, Mask, QSeg, KSeg,
            sbb, sbh, sbm, sbn, smb, smh, smm, smn, sqsb, sqsm, sksb, sksn,
            NQ, NK, causal_offset, masked_value, HAS_BIAS, HAS_MASK, HAS_SEG, CAUSAL,
        )  # fmt: skip
        if SOFTMAX:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # While a row has seen only -inf, subtract 0 instead of -inf: exp(-inf - -inf) would be NaN
            # and poison later tiles. A row that stays all -inf ends with l = 0 and 0/0 = NaN, as the
            # reference's softmax gives.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_use)
            p = tl.exp(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            m_i = m_new
        else:
            r = tl.maximum(s, 0.0)
            p = r * r
        if DROPOUT:  # after the row sum: dropout drops probabilities, it does not renormalize them
            p = dropout_tile(p, offs_m, offs_n, pid_bh, NK, dropout_p, seed)
        acc += mma(p.to(v.dtype), v, DOT_PRECISION, UPCAST_DOT)
    if SOFTMAX:
        acc = acc / l_i[:, None]
        if STORE_STATS:
            tl.store(Stats + pid_bh * NQ + offs_m, m_i, mask=offs_m < NQ)
            tl.store(Stats + STATS_SIZE + pid_bh * NQ + offs_m, 1.0 / l_i, mask=offs_m < NQ)
    tl.store(
        Out + b * sob + h * soh + offs_m[:, None] * som + offs_dv[None, :] * sod,
        acc.to(Out.dtype.element_ty),
        mask=(offs_m[:, None] < NQ) & (offs_dv[None, :] < DV),
    )


def broadcast_strides(t: Tensor | None, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Strides of `t` expanded to `shape` (0 along broadcast dims); zeros when t is None."""
    if t is None:
        return (0,) * len(shape)
    return tuple(t.expand(shape).stride())


def kernel_args(q, k, v, bias, mask, q_seg, k_seg) -> tuple[list, list]:
    """Pointers and strides shared by the forward and backward kernels: (tensors, strides)."""
    b, hq, nq, _ = q.shape
    nk = k.shape[2]
    full = (b, hq, nq, nk)
    # Bool masks are read as bytes; absent tensors are replaced by q and never read (flags are off).
    mask_bytes = mask.view(torch.uint8) if mask is not None else None
    tensors = [
        bias if bias is not None else q,
        mask_bytes if mask_bytes is not None else q,
        q_seg if q_seg is not None else q,
        k_seg if k_seg is not None else q,
    ]
    strides = [
        *broadcast_strides(bias, full),
        *broadcast_strides(mask_bytes, full),
        *(q_seg.stride() if q_seg is not None else (0, 0)),
        *(k_seg.stride() if k_seg is not None else (0, 0)),
    ]
    return tensors, strides


def flags(bias, mask, q_seg, causal: bool, masked_value: float, score_fn: str) -> dict:
    """Constexpr flags of every kernel; SKIP_MASKED says masked keys contribute nothing at all."""
    softmax = score_fn == "softmax"
    skip = masked_value == -math.inf if softmax else masked_value <= 0.0
    return dict(
        HAS_BIAS=bias is not None,
        HAS_MASK=mask is not None,
        HAS_SEG=q_seg is not None,
        CAUSAL=causal,
        SOFTMAX=softmax,
        SKIP_MASKED=skip,
    )


def dot_args(dtype: torch.dtype) -> dict:
    """tl.dot settings: float32 inputs must match the float32 reference to ~1e-6, so no TF32."""
    upcast = dtype == torch.bfloat16 and triton_interpreting()
    return dict(DOT_PRECISION="ieee" if dtype == torch.float32 or upcast else "tf32", UPCAST_DOT=upcast)


def head_blocks(q: Tensor, v: Tensor) -> tuple[int, int]:
    """Head dims padded to a power of two (>= 16, the smallest tl.dot size); loads mask the padding."""
    return max(16, triton.next_power_of_2(q.shape[3])), max(16, triton.next_power_of_2(v.shape[3]))


def attention_triton(
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
    store_stats: bool = False,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> tuple[Tensor, Tensor | None]:
    """Forward: out [B, Hq, Nq, Dv] in q's dtype; with store_stats (softmax only) also the row max and
    1 / row sum, stats [2, B, Hq, Nq] float32. dropout_p > 0 drops probabilities with a mask drawn from
    `seed` (see dropout_tile)."""
    b, hq, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    out = torch.empty((b, hq, nq, dv), dtype=q.dtype, device=q.device)
    store_stats = store_stats and score_fn == "softmax"
    stats = torch.empty((2, b, hq, nq), dtype=torch.float32, device=q.device) if store_stats else None
    block_d, block_dv = head_blocks(q, v)
    if triton_interpreting():
        block_m, block_n, warps, stages = 16, 16, 4, 1
    elif max(block_d, block_dv) <= 128:
        block_m, block_n, warps, stages = 64, 64 if max(block_d, block_dv) <= 64 else 32, 4, 2
    else:
        block_m, block_n, warps, stages = 32, 32, 4, 1
    tensors, strides = kernel_args(q, k, v, bias, mask, q_seg, k_seg)
    grid = (triton.cdiv(nq, block_m), b * hq)
    _attn_fwd[grid](
        q, k, v, *tensors, out, stats if stats is not None else out,
        *q.stride(), *k.stride(), *v.stride(), *strides, *out.stride(),
        hq, nq, nk, d, dv, hq // hkv, float(scale), int(causal_offset), float(masked_value), b * hq * nq,
        float(dropout_p), int(seed),
        **flags(bias, mask, q_seg, causal, masked_value, score_fn), STORE_STATS=store_stats, DROPOUT=dropout_p > 0.0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
        **dot_args(q.dtype), num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out, stats
