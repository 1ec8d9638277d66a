"""Plain-PyTorch spatial pyramid pooling: the test oracle and the fallback of `fxfuse::spp`.

It computes the levels the way the original model did (parallel pools or a chain of pools), so autograd
through it routes gradients at ties exactly as the original graph would.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

MODES = ("same", "adaptive")


def chain_steps(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """(level size, kernel applied to the previous level) for the chain that builds `sizes`, ascending.

    Level s_i = max_pool(level s_{i-1}, s_i - s_{i-1} + 1), level 1 = x: that is how SPPF computes
    mp5, mp9 (= mp5 of mp5), mp13 (= mp5 of mp9).
    """
    steps, previous = [], 1
    for size in sorted(set(sizes) - {1}):
        steps.append((size, size - previous + 1))
        previous = size
    return steps


def _same_levels(x: torch.Tensor, sizes: Sequence[int], chained: bool) -> dict[int, torch.Tensor]:
    levels = {1: x}
    if chained:
        previous = x
        for size, kernel in chain_steps(sizes):
            previous = F.max_pool2d(previous, kernel, stride=1, padding=kernel // 2)
            levels[size] = previous
    else:
        # created in the order of `sizes`, like the original cat's inputs: autograd then accumulates x's
        # gradient in the same order, so even float rounding matches
        for size in [size for size in dict.fromkeys(sizes) if size != 1]:
            levels[size] = F.max_pool2d(x, size, stride=1, padding=size // 2)
    return levels


def spp_reference(
    x: torch.Tensor, sizes: Sequence[int], mode: str = "same", chained: bool = False
) -> torch.Tensor:
    """Spatial pyramid pooling in plain PyTorch.

    mode "same":     x [B, C, H, W] -> [B, C * len(sizes), H, W], the cat over `sizes` (odd) of
                     max_pool2d(x, k, stride=1, padding=k // 2); k = 1 is x itself.
    mode "adaptive": x [B, C, H, W] -> [B, C * sum(n * n for n in sizes)], the cat over `sizes` of
                     adaptive_max_pool2d(x, n).flatten(1) (SPPNet).
    An unbatched x [C, H, W] gives the same without the leading B.
    `chained` (mode "same" only) builds the levels as a chain of pools (SPPF) instead of pooling x directly:
    same values, different gradients at ties.
    """
    if x.dim() == 3:
        return spp_reference(x.unsqueeze(0), sizes, mode, chained).squeeze(0)
    if mode == "same":
        levels = _same_levels(x, sizes, chained)
        return torch.cat([levels[size] for size in sizes], dim=1)
    return torch.cat([F.adaptive_max_pool2d(x, n).flatten(1) for n in sizes], dim=1)
