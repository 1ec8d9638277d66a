"""Peak memory of linear attention at N = 1k..8k: the eager quadratic form (its N x N weights) against
`fxfuse::linear_attention` (a D x E state per head), on the CPU.

Usage: python benchmarks/linear_attention_memory.py
"""

from __future__ import annotations

from functools import partial

import torch

from fxfuse.bench.cases import eager_linear_attention
from fxfuse.bench.memory import peak_memory_bytes
from fxfuse.fusion.linear_attention import linear_attention

HEADS, HEAD_DIM = 4, 32


def main() -> None:
    torch.set_num_threads(1)
    print(f"B=1, H={HEADS}, d={HEAD_DIM}; MiB added at the peak of one call (one N x N fp32 per head: N^2 H 4 B)")
    print(f"{'N':>6} {'variant':>8} {'N x N MiB':>10} {'eager MiB':>10} {'fxfuse MiB':>11}")
    for n in (1024, 2048, 4096, 8192):
        q, k, v = torch.rand(1, HEADS, n, HEAD_DIM), torch.rand(1, HEADS, n, HEAD_DIM), torch.randn(1, HEADS, n, 32)
        for causal in (False, True):
            with torch.no_grad():
                eager = peak_memory_bytes(partial(eager_linear_attention, q, k, v, causal))
                fused = peak_memory_bytes(partial(linear_attention, q, k, v, causal=causal, normalize="eps", eps=1e-6))
            square = n * n * HEADS * 4
            variant = "causal" if causal else "full"
            print(f"{n:>6} {variant:>8} {square / 2**20:>10.0f} {eager / 2**20:>10.1f} {fused / 2**20:>11.1f}")


if __name__ == "__main__":
    main()
