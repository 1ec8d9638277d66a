"""CPU fast path of `fxfuse::spp`: exact pyramid pooling from a few elementwise maxima on shifted views.

Mode "same": pad x once with -inf by the largest radius, then grow one window ("valid" max over w
neighbours) along H and W together: a window of width w + s is max(v_w[i], v_w[i + s]) for any s <= w
(the two windows overlap or touch, and max is idempotent), so 1 -> 2 -> 4 -> 5 -> 9 -> 13 costs five
steps of two `torch.maximum` calls, instead of ATen max_pool2d's 25 + 81 + 169 compares per pixel.
The padded map is handled as one flat contiguous buffer: a shift by s rows is a shift by s * (W + 2r)
elements and a shift by s columns a shift by s elements, so every step is a contiguous elementwise op
(measured ~1.7x faster than strided 4-D slices); the positions that wrap across rows or planes are
garbage, but they lie outside the valid window region and no valid value ever reads them. Every level
is a centre crop of the buffer and lands in its channel slice of a preallocated output, so there is no
cat. torch.maximum propagates NaN like max_pool2d (NaN counts as the max), and -inf padding never wins
over a real element, so the values are torch.equal to the eager pyramid (ties between -0.0 and +0.0 may
pick the other zero: torch.maximum does not promise max_pool2d's first-in-window choice).

Mode "adaptive": when H and W divide by a level's bin count, that level is one reshape + amax (bins are
uniform and disjoint), and coarser levels whose bins nest are reduced from finer ones; other levels use
ATen adaptive_max_pool2d.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def spp_same_cpu(x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """x [B, C, H, W] -> [B, C * len(sizes), H, W]: cat of max_pool2d(x, k, 1, k // 2) over odd `sizes`."""
    x = x.contiguous()
    batch, channels, height, width = x.shape
    out = x.new_empty(batch, channels * len(sizes), height, width)
    radius = max(sizes) // 2
    padded_h, padded_w = height + 2 * radius, width + 2 * radius
    window = F.pad(x, (radius, radius, radius, radius), value=float("-inf")).view(-1)
    spare = torch.empty_like(window)
    covered = 1
    for size in sorted(set(sizes)):
        while covered < size:
            step = min(covered, size - covered)
            rows, cols = window.numel() - step * padded_w, window.numel() - step
            torch.maximum(window[:rows], window[step * padded_w :], out=spare[:rows])
            torch.maximum(spare[:cols], spare[step : step + cols], out=window[:cols])
            covered += step
        # the window of `size` starting at padded (i, j) is the pooled value at (i, j) - radius + size // 2
        crop = radius - size // 2
        padded = window.view(batch, channels, padded_h, padded_w)
        level = padded[..., crop : crop + height, crop : crop + width]
        for i in (i for i, s in enumerate(sizes) if s == size):
            out[:, i * channels : (i + 1) * channels].copy_(x if size == 1 else level)
    return out


_MAX_ROW_STEPS = 16  # beyond this many rows per bin, per-row Python steps cost more than they save


def _uniform_bins(x: torch.Tensor, bins: int) -> torch.Tensor:
    """[B, C, H, W] contiguous, H and W divisible by `bins` -> [B, C, bins, bins] maxima over the bins."""
    batch, channels, height, width = x.shape
    rows = height // bins
    if rows > _MAX_ROW_STEPS:
        # two single-axis reductions (W, then H) measured ~2.5x faster than one amax over both axes
        cols = x.reshape(batch, channels, height, bins, width // bins).amax(dim=-1)
        return cols.reshape(batch, channels, bins, rows, bins).amax(dim=3)
    # The rows of a bin as strided views, folded with elementwise maxima (contiguous along W, so
    # vectorized), then one reduction over the bin's columns on `rows` times less data: measured 3.5x
    # faster than reducing W first ([8, 256, 20, 20], 4 bins: 0.49 vs 1.69 ms, 1 thread).
    band = x.view(batch, channels, bins, rows, width)
    peak = band[:, :, :, 0]
    if rows > 1:
        peak = torch.maximum(peak, band[:, :, :, 1])  # a new tensor: the in-place steps never touch x
        for i in range(2, rows):
            torch.maximum(peak, band[:, :, :, i], out=peak)
    return peak.reshape(batch, channels, bins, bins, width // bins).amax(dim=-1)


def spp_adaptive_cpu(x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """x [B, C, H, W] -> [B, C * sum(n * n)]: cat of adaptive_max_pool2d(x, n).flatten(1) over `sizes`."""
    x = x.contiguous()
    height, width = x.shape[-2:]
    pooled: dict[int, torch.Tensor] = {}
    for n in sorted(set(sizes), reverse=True):
        if height % n or width % n:
            pooled[n] = F.adaptive_max_pool2d(x, n)
            continue
        # a finer uniform level whose bins nest in these ones is smaller to reduce than x
        finer = [m for m in pooled if m % n == 0 and height % m == 0 and width % m == 0]
        source = pooled[min(finer)] if finer else x
        pooled[n] = _uniform_bins(source, n)
    return torch.cat([pooled[n].flatten(1) for n in sizes], dim=1)
