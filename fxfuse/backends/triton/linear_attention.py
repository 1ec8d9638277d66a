"""Triton kernel of `fxfuse::linear_attention`: the chunked product, forward and backward.

Every product of the op (forward, row sums, the three products of the backward, see the reference) is
`out_i = scale * sum_j mask[i, j] (a_i . b_j) c_j`, so one kernel serves them all. One program owns one
(batch * head, block of E columns) and walks the sequence in chunks of BLOCK_C rows, keeping the
[D, BLOCK_E] state sum_j gamma^(...) b_j c_j^T in float32 registers:

- causal: out_chunk = (a_c b_c^T * L) c_c + (a_c * gamma^(i + 1)) S, then S = gamma^C S +
  (b_c * gamma^(C - 1 - j))^T c_c, L = tril * gamma^(i - j), all exponents chunk-local (0..C);
- non-causal (N and M may differ): a first pass sums S over all of b, c, a second writes a S.
- block-exclusive (block = c, a power of two): BLOCK_C = c and no intra part, out_chunk = a_c S.
The backward's reversed (anti-causal) products run on flipped sequences (padded to whole blocks first).

That walk has B * H * (E / BLOCK_E) programs: at batch 1 and 16 heads, a few dozen on a GPU with over a
hundred SMs. The "parallel" schedule (the default for causal products) splits it in two launches, as
chunked linear-attention kernels usually do: `_chunk_states_kernel` walks the chunks with one small
product each and writes the state before every chunk ([B, H, N / C, D, E] float32), then
`_chunk_output_kernel` runs one program per (batch * head, chunk, E block) for the intra-chunk product
plus a_c S_before. The states take D / C times the memory of c in float32 (at most 2x: D <= 128, C = 64).
Non-causal products are two ATen matmuls there (a (b^T c)), which follow
`torch.backends.cuda.matmul.allow_tf32` as the model's own matmuls do.

Shapes: a [B, H, N, D], b [B, H, M, D], c [B, H, M, E] (as float32, contiguous) -> out [B, H, N, E].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from fxfuse.backends import triton_interpreting

MAX_DIM = 128  # D and E: the [D, BLOCK_E] state and a [C, D] tile stay in registers


BLOCKS = (16, 32, 64, 128)  # block-exclusive block sizes the kernel runs (BLOCK_C = block)
# the op's schedule; the GPU benchmark sets it to "walk" to time the one-launch kernel against it
SCHEDULE = "parallel"


def triton_unsupported(dtype: torch.dtype, head_dim: int, v_head_dim: int, block: int = 0) -> str | None:
    """Why the Triton kernel cannot run this case (None when it can)."""
    if block and block not in BLOCKS:
        return f"block {block} is not one of {', '.join(map(str, BLOCKS))}"
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype} is not float16/bfloat16/float32"
    if not (1 <= head_dim <= MAX_DIM and 1 <= v_head_dim + 1 <= MAX_DIM):
        return f"head dims ({head_dim}, {v_head_dim}) are outside 1..{MAX_DIM - 1}"
    return None


@triton.jit
def _decay(dist, log2_gamma, DECAY: tl.constexpr):
    # gamma^dist for dist >= 0, 0 for dist < 0 (log2 gamma is clamped finite: gamma = 0 gives 0^0 = 1)
    if DECAY:
        w = tl.exp2(tl.maximum(dist, 0).to(tl.float32) * log2_gamma)
    else:
        w = tl.full(dist.shape, 1.0, tl.float32)
    return tl.where(dist >= 0, w, 0.0)


@triton.jit
def _chunked_kernel(
    a_ptr, b_ptr, c_ptr, out_ptr, log2_gamma_ptr,
    N, M, H, D, E, scale,
    CAUSAL: tl.constexpr, DECAY: tl.constexpr, EXCLUSIVE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    offs_c = tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    a_ptr += bh.to(tl.int64) * N * D
    out_ptr += bh.to(tl.int64) * N * E
    b_ptr += bh.to(tl.int64) * M * D
    c_ptr += bh.to(tl.int64) * M * E
    in_d = offs_d[None, :] < D
    in_e = offs_e[None, :] < E
    log2_gamma = tl.load(log2_gamma_ptr + bh % H) if DECAY else 0.0
    state = tl.zeros([BLOCK_D, BLOCK_E], dtype=tl.float32)
    if not CAUSAL:
        for start in range(0, M, BLOCK_C):
            rows = start + offs_c[:, None]
            bt = tl.load(b_ptr + rows * D + offs_d[None, :], mask=(rows < M) & in_d, other=0.0)
            ct = tl.load(c_ptr + rows * E + offs_e[None, :], mask=(rows < M) & in_e, other=0.0)
            state += tl.dot(tl.trans(bt), ct, input_precision=DOT_PRECISION)
    for start in range(0, N, BLOCK_C):
        rows = start + offs_c[:, None]
        at = tl.load(a_ptr + rows * D + offs_d[None, :], mask=(rows < N) & in_d, other=0.0)
        if CAUSAL:
            bt = tl.load(b_ptr + rows * D + offs_d[None, :], mask=(rows < N) & in_d, other=0.0)
            ct = tl.load(c_ptr + rows * E + offs_e[None, :], mask=(rows < N) & in_e, other=0.0)
            if EXCLUSIVE:  # block-exclusive: the chunk is the block, only the state of the blocks before
                out = tl.dot(at, state, input_precision=DOT_PRECISION)
            else:
                s = tl.dot(at, tl.trans(bt), input_precision=DOT_PRECISION)
                s = s * _decay(offs_c[:, None] - offs_c[None, :], log2_gamma, DECAY)
                out = tl.dot(s, ct, input_precision=DOT_PRECISION)
                into = _decay(offs_c[:, None] + 1, log2_gamma, DECAY)  # gamma^(i + 1): state to row i
                out += tl.dot(at * into, state, input_precision=DOT_PRECISION)
            out_of = _decay(BLOCK_C - 1 - offs_c[:, None], log2_gamma, DECAY)  # gamma^(C - 1 - j)
            carry = tl.exp2(BLOCK_C * log2_gamma) if DECAY else 1.0
            state = state * carry + tl.dot(tl.trans(bt * out_of), ct, input_precision=DOT_PRECISION)
        else:
            out = tl.dot(at, state, input_precision=DOT_PRECISION)
        tl.store(out_ptr + rows * E + offs_e[None, :], out * scale, mask=(rows < N) & in_e)


@triton.jit
def _chunk_states_kernel(
    b_ptr, c_ptr, states_ptr, log2_gamma_ptr,
    N, H, D, E, NT,
    DECAY: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    # one program per (batch * head, D block, E block): states[t] = the state before chunk t
    bh = tl.program_id(0)
    offs_c = tl.arange(0, BLOCK_C)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_e = tl.program_id(2) * BLOCK_E + tl.arange(0, BLOCK_E)
    b_ptr += bh.to(tl.int64) * N * D
    c_ptr += bh.to(tl.int64) * N * E
    states_ptr += bh.to(tl.int64) * NT * D * E
    in_d = offs_d[None, :] < D
    in_e = offs_e[None, :] < E
    log2_gamma = tl.load(log2_gamma_ptr + bh % H) if DECAY else 0.0
    out_of = _decay(BLOCK_C - 1 - offs_c[:, None], log2_gamma, DECAY)  # gamma^(C - 1 - j)
    carry = tl.exp2(BLOCK_C * log2_gamma) if DECAY else 1.0
    tile = offs_d[:, None] * E + offs_e[None, :]
    state = tl.zeros([BLOCK_D, BLOCK_E], dtype=tl.float32)
    for t in range(0, NT):
        tl.store(states_ptr + t * D * E + tile, state, mask=(offs_d[:, None] < D) & in_e)
        rows = t * BLOCK_C + offs_c[:, None]
        bt = tl.load(b_ptr + rows * D + offs_d[None, :], mask=(rows < N) & in_d, other=0.0)
        ct = tl.load(c_ptr + rows * E + offs_e[None, :], mask=(rows < N) & in_e, other=0.0)
        state = state * carry + tl.dot(tl.trans(bt * out_of), ct, input_precision=DOT_PRECISION)


@triton.jit
def _chunk_output_kernel(
    a_ptr, b_ptr, c_ptr, states_ptr, out_ptr, log2_gamma_ptr,
    N, H, D, E, NT, scale,
    DECAY: tl.constexpr, EXCLUSIVE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    # one program per (batch * head, chunk, E block): (a_c b_c^T * L) c_c + (a_c * gamma^(i + 1)) S_before
    bh = tl.program_id(0)
    t = tl.program_id(1)
    offs_c = tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.program_id(2) * BLOCK_E + tl.arange(0, BLOCK_E)
    a_ptr += bh.to(tl.int64) * N * D
    b_ptr += bh.to(tl.int64) * N * D
    c_ptr += bh.to(tl.int64) * N * E
    out_ptr += bh.to(tl.int64) * N * E
    states_ptr += (bh.to(tl.int64) * NT + t) * D * E
    in_d = offs_d[None, :] < D
    in_e = offs_e[None, :] < E
    log2_gamma = tl.load(log2_gamma_ptr + bh % H) if DECAY else 0.0
    rows = t * BLOCK_C + offs_c[:, None]
    at = tl.load(a_ptr + rows * D + offs_d[None, :], mask=(rows < N) & in_d, other=0.0)
    st = tl.load(states_ptr + offs_d[:, None] * E + offs_e[None, :], mask=(offs_d[:, None] < D) & in_e, other=0.0)
    if EXCLUSIVE:  # block-exclusive: the chunk is the block, only the state of the blocks before
        out = tl.dot(at, st, input_precision=DOT_PRECISION)
    else:
        bt = tl.load(b_ptr + rows * D + offs_d[None, :], mask=(rows < N) & in_d, other=0.0)
        ct = tl.load(c_ptr + rows * E + offs_e[None, :], mask=(rows < N) & in_e, other=0.0)
        s = tl.dot(at, tl.trans(bt), input_precision=DOT_PRECISION)
        s = s * _decay(offs_c[:, None] - offs_c[None, :], log2_gamma, DECAY)
        out = tl.dot(s, ct, input_precision=DOT_PRECISION)
        into = _decay(offs_c[:, None] + 1, log2_gamma, DECAY)  # gamma^(i + 1): state to row i
        out += tl.dot(at * into, st, input_precision=DOT_PRECISION)
    tl.store(out_ptr + rows * E + offs_e[None, :], out * scale, mask=(rows < N) & in_e)


def _parallel_causal(
    a: Tensor, b: Tensor, c: Tensor, out: Tensor, log2_gamma: Tensor, scale: float, decay: bool, block: int,
    precision: str,
) -> None:  # fmt: skip
    """The causal product in two launches (states, then outputs); a, b, c float32 contiguous."""
    batch, heads, n, d = a.shape
    e = c.shape[3]
    block_c = block if block else 16 if triton_interpreting() else 64
    chunks = triton.cdiv(n, block_c)
    states = torch.empty(batch, heads, chunks, d, e, dtype=torch.float32, device=a.device)
    block_d, block_e = max(16, triton.next_power_of_2(d)), max(16, triton.next_power_of_2(e))
    tile = 16 if triton_interpreting() else 32  # state tiles: B * H * (D / tile) * (E / tile) programs
    state_d, state_e = min(block_d, tile), min(block_e, tile)
    stages = 1 if triton_interpreting() else 2
    _chunk_states_kernel[(batch * heads, triton.cdiv(d, state_d), triton.cdiv(e, state_e))](
        b, c, states, log2_gamma, n, heads, d, e, chunks,
        DECAY=decay, DOT_PRECISION=precision, BLOCK_C=block_c, BLOCK_D=state_d, BLOCK_E=state_e,
        num_warps=4, num_stages=stages,
    )  # fmt: skip
    out_e = min(block_e, 16 if triton_interpreting() else 64)
    _chunk_output_kernel[(batch * heads, chunks, triton.cdiv(e, out_e))](
        a, b, c, states, out, log2_gamma, n, heads, d, e, chunks, float(scale),
        DECAY=decay, EXCLUSIVE=bool(block), DOT_PRECISION=precision,
        BLOCK_C=block_c, BLOCK_D=block_d, BLOCK_E=out_e, num_warps=4, num_stages=stages,
    )  # fmt: skip


def chunked_product_triton(
    a: Tensor, b: Tensor, c: Tensor, scale: float, causal: bool, decay: Tensor | None, reverse: bool = False,
    block: int = 0, precision: str = "ieee", schedule: str | None = None,
) -> Tensor:  # fmt: skip
    """out_i = scale * sum_j mask[i, j] (a_i . b_j) c_j, a [B, H, N, D], b [B, H, M, D], c [B, H, M, E]
    -> [B, H, N, E] float32; decay [H] float64 gammas (causal only, N == M). precision "ieee" keeps
    float32 products exact to rounding; "tf32" (tensor cores) is for inputs that were half precision.
    block = c (one of BLOCKS, causal, no decay): block-exclusive, j // c < i // c (reversed: >).
    schedule "parallel" (states, then outputs: see the module docstring) or "walk" (one program per
    batch * head and E block walks the whole sequence); None takes the module's SCHEDULE."""
    schedule = SCHEDULE if schedule is None else schedule
    if schedule not in ("parallel", "walk"):
        raise ValueError(f"schedule must be 'parallel' or 'walk', got {schedule!r}")
    if reverse and causal and block:
        n = a.shape[2]
        flipped = (F.pad(t, (0, 0, 0, -n % block)).flip(-2) for t in (a, b, c))
        out = chunked_product_triton(*flipped, scale, True, None, block=block, precision=precision, schedule=schedule)
        return out.flip(-2)[:, :, :n]
    if reverse and causal:
        flipped = (a.flip(-2), b.flip(-2), c.flip(-2))
        return chunked_product_triton(*flipped, scale, True, decay, precision=precision, schedule=schedule).flip(-2)
    batch, heads, n, d = a.shape
    m, e = b.shape[2], c.shape[3]
    a, b, c = (t.to(torch.float32).contiguous() for t in (a, b, c))
    if schedule == "parallel" and not causal:  # a (b^T c): two dense matmuls, no walk to split
        return torch.matmul(a, torch.matmul(b.transpose(-1, -2), c)) * scale
    out = torch.empty(batch, heads, n, e, dtype=torch.float32, device=a.device)
    if decay is not None:
        log2_gamma = torch.log2(decay.to(device=a.device, dtype=torch.float64)).clamp(min=-1e4).float().contiguous()
    else:
        log2_gamma = out.new_zeros(1)
    if schedule == "parallel":
        _parallel_causal(a, b, c, out, log2_gamma, scale, decay is not None, block, precision)
        return out
    block_d, block_e = max(16, triton.next_power_of_2(d)), max(16, triton.next_power_of_2(e))
    # one program per (batch * head, E block) walks the whole sequence: narrow E blocks give the GPU more
    # programs (B * H alone can be a fraction of its SMs) at the price of recomputing a_c b_c^T per block
    block_e = min(block_e, 16 if triton_interpreting() else 32)
    block_c = block if block else 16 if triton_interpreting() else 64
    grid = (batch * heads, triton.cdiv(e, block_e))
    _chunked_kernel[grid](
        a, b, c, out, log2_gamma, n, m, heads, d, e, float(scale),
        CAUSAL=causal, DECAY=decay is not None, EXCLUSIVE=bool(block), DOT_PRECISION=precision,
        BLOCK_C=block_c, BLOCK_D=block_d, BLOCK_E=block_e,
        num_warps=4, num_stages=1 if triton_interpreting() else 2,
    )  # fmt: skip
    return out
