"""Paired-ratio timing of `fxfuse::spp` against the eager pyramids it replaces, at a YOLO neck size.

    python benchmarks/spp_op.py [--pairs 9] [--threads 1] [--shape 8 256 20 20]

Each pair times the eager side and the fused side back to back (the order alternates), each over enough
calls to last >= 20 ms, after a warm-up; a ratio above 1.0 means the fused op is faster. The script
prints the median ratio of the pairs with its min/max, after checking that both sides are torch.equal.
`spp_cases()` is what the benchmark harness (fxfuse/bench) imports.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fxfuse.fusion.spp import spp

SHAPE = (8, 256, 20, 20)  # [B, C, H, W] of the YOLOv3/v5 SPP neck at 640 px input, batch 8
QUICK = ["parallel-5-9-13", "sppf-chain", "adaptive-1-2-4"]


def mp(x: torch.Tensor, k: int) -> torch.Tensor:
    return F.max_pool2d(x, k, stride=1, padding=k // 2)


def eager_spp(x: torch.Tensor) -> torch.Tensor:
    """YOLOv3 SPP: [B, C, H, W] -> [B, 4C, H, W]."""
    return torch.cat([x, mp(x, 5), mp(x, 9), mp(x, 13)], dim=1)


def eager_sppf(x: torch.Tensor) -> torch.Tensor:
    """YOLOv5 SPPF, mp5 three times: [B, C, H, W] -> [B, 4C, H, W]."""
    y1 = mp(x, 5)
    y2 = mp(y1, 5)
    return torch.cat([x, y1, y2, mp(y2, 5)], dim=1)


def eager_sppnet(x: torch.Tensor) -> torch.Tensor:
    """SPPNet: [B, C, H, W] -> [B, 21C]."""
    return torch.cat([F.adaptive_max_pool2d(x, n).flatten(1) for n in (1, 2, 4)], dim=1)


def fused_spp(x: torch.Tensor) -> torch.Tensor:
    return spp(x, [1, 5, 9, 13])


def fused_sppf(x: torch.Tensor) -> torch.Tensor:
    return spp(x, [1, 5, 9, 13], chained=True)


def fused_sppnet(x: torch.Tensor) -> torch.Tensor:
    return spp(x, [1, 2, 4], "adaptive")


Case = tuple[str, Callable[..., torch.Tensor], Callable[..., torch.Tensor], list]


def spp_cases(shape: tuple[int, ...] = SHAPE) -> list[Case]:
    """(name, eager_fn, fused_fn, inputs): eager_fn(*inputs) and fused_fn(*inputs) are torch.equal."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    return [
        ("parallel-5-9-13", eager_spp, fused_spp, [x]),
        ("sppf-chain", eager_sppf, fused_sppf, [x]),
        ("adaptive-1-2-4", eager_sppnet, fused_sppnet, [x]),
    ]


def _seconds_per_call(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def paired_ratios(eager_fn: Callable, fused_fn: Callable, inputs: list, pairs: int) -> list[float]:
    """eager time / fused time for `pairs` back-to-back pairs, the order alternating."""
    eager, fused = (lambda: eager_fn(*inputs)), (lambda: fused_fn(*inputs))
    for _ in range(3):
        eager(), fused()
    calls = max(1, int(0.02 / max(_seconds_per_call(fused, 3), 1e-9)))
    ratios = []
    for i in range(pairs):
        if i % 2:
            f, e = _seconds_per_call(fused, calls), _seconds_per_call(eager, calls)
        else:
            e, f = _seconds_per_call(eager, calls), _seconds_per_call(fused, calls)
        ratios.append(e / f)
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=9, help="timed pairs per case (median of them)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: least noisy)")
    parser.add_argument("--shape", type=int, nargs=4, default=SHAPE, metavar=("B", "C", "H", "W"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"shape {list(args.shape)}, {args.threads} thread(s), {args.pairs} pairs; ratio = eager / fused")
    with torch.no_grad():
        for name, eager_fn, fused_fn, inputs in spp_cases(tuple(args.shape)):
            equal = torch.equal(eager_fn(*inputs), fused_fn(*inputs))
            ratios = paired_ratios(eager_fn, fused_fn, inputs, args.pairs)
            print(
                f"{name:18s} median {statistics.median(ratios):6.2f}x  "
                f"min {min(ratios):6.2f}x  max {max(ratios):6.2f}x  torch.equal {equal}"
            )


if __name__ == "__main__":
    main()
