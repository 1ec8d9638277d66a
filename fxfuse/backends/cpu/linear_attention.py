"""CPU path of `fxfuse::linear_attention`: the reassociated product in ATen matmuls, float32 states.

Non-causal: a (b^T c) — a [D, E] state per head instead of the [N, M] weights: O(N D E) for O(N M D).
Causal (optionally decayed by gamma^(i - j)): the sequence is cut into chunks of C positions. Inside a
chunk the masked C x C product is materialized; across chunks a running state S = sum_j gamma^(...)
b_j c_j^T [D, E] carries everything before the chunk:

    out_chunk = (a_c b_c^T * L) c_c  +  (a_c * gamma^(i + 1)) S_before        L = tril * gamma^(i - j)
    S_after   = gamma^C S_before + (b_c * gamma^(C - 1 - j))^T c_c

All exponents are chunk-local (0 .. C), so no factor overflows or underflows where the quadratic form
does not. Block-exclusive (block = c > 0, no decay): chunks of exactly c positions and no intra part,
out_chunk = a_c S_before. Every chunk's contribution comes from one batched matmul; only the decayed state recurrence
is a loop over chunks (a cumulative sum without decay).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fxfuse.fusion.linear_attention.reference import compute_dtype

CHUNK = 64  # measured at D = E = 32: 64 and 128 are within noise at N = 4096, 32 is ~1.4x slower


def chunked_product(
    a: Tensor, b: Tensor, c: Tensor, scale: float, causal: bool, decay: Tensor | None, reverse: bool = False,
    block: int = 0,
) -> Tensor:  # fmt: skip
    """out_i = scale * sum_j mask[i, j] (a_i . b_j) c_j without the N x M weights.

    a [B, H, N, D], b [B, H, M, D], c [B, H, M, E] -> [B, H, N, E] in the compute dtype; decay [H]
    float64 gammas (causal only); `reverse` runs the causal mask the other way (j >= i); block = c > 0
    makes it block-exclusive (j // c < i // c, reversed j // c > i // c)."""
    acc = compute_dtype(a.dtype)
    a, b, c = a.to(acc), b.to(acc), c.to(acc)
    if not causal:
        return torch.matmul(a, torch.matmul(b.transpose(-1, -2), c)) * scale
    if block > 0 and reverse:
        # pad to whole blocks first: the flipped sequence then has the same block boundaries
        n = a.shape[-2]
        pad = -n % block
        flipped = (F.pad(t, (0, 0, 0, pad)).flip(-2) for t in (a, b, c))
        return chunked_product(*flipped, scale, True, None, False, block).flip(-2)[:, :, :n]
    if reverse:
        return chunked_product(a.flip(-2), b.flip(-2), c.flip(-2), scale, True, decay).flip(-2)
    batch, heads, n, d = a.shape
    e = c.shape[-1]
    size = block if block > 0 else min(CHUNK, n)
    chunks = -(-n // size)
    pad = chunks * size - n
    # zero rows of b and c add nothing to any state; padded rows of a are cut off at the end
    ac, bc, cc = (F.pad(t, (0, 0, 0, pad)).view(batch, heads, chunks, size, t.shape[-1]) for t in (a, b, c))
    i = torch.arange(size, device=a.device, dtype=torch.float64)
    dist = i[:, None] - i[None, :]
    if decay is None:
        within = (dist >= 0).to(acc)
        states = torch.matmul(bc.transpose(-1, -2), cc)  # [B, H, chunks, D, E]
        # the sum of the chunks before each one, shifted rather than cumsum - states: no cancellation
        before = torch.cat([torch.zeros_like(states[:, :, :1]), torch.cumsum(states[:, :, :-1], dim=2)], dim=2)
        inter = torch.matmul(ac, before)
    else:
        g = decay.view(-1, 1, 1, 1)
        within = torch.where(dist >= 0, torch.pow(g.view(-1, 1, 1), dist.clamp(min=0)), 0.0).to(acc).unsqueeze(1)
        into = torch.pow(g, i.view(1, 1, -1, 1) + 1).to(acc)  # gamma^(i + 1): state to row i
        out_of = torch.pow(g, size - 1 - i.view(1, 1, -1, 1)).to(acc)  # gamma^(C - 1 - j): row j to state
        carry = torch.pow(decay, size).to(acc).view(1, -1, 1, 1)
        states = torch.matmul((bc * out_of).transpose(-1, -2), cc)
        before = torch.empty_like(states)
        running = states.new_zeros(batch, heads, d, e)
        for chunk in range(chunks):
            before[:, :, chunk] = running
            running = running * carry + states[:, :, chunk]
        inter = torch.matmul(ac * into, before)
    if block > 0:
        out = inter * scale  # block-exclusive: nothing of the own chunk
    else:
        out = (torch.matmul(torch.matmul(ac, bc.transpose(-1, -2)) * within, cc) + inter) * scale
    return out.view(batch, heads, chunks * size, e)[:, :, :n]
