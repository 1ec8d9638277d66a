"""`fxfuse::spp` -> standard ONNX: a MaxPool cascade + Concat ("same"), fixed-window MaxPools ("adaptive").

"same": max with -inf padding composes (pool5 o pool5 == pool9, borders included, ONNX MaxPool never
lets its pads win), so every level is one small pool of the previous level, whatever the model wrote.
"adaptive": an adaptive pool is fixed-window only for one input size, so the ONNX file is too: windows
are computed from the exported H x W, and an export whose H or W is dynamic is refused.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from onnxscript.onnx_opset import opset23 as op

from fxfuse.fusion.spp.reference import chain_steps


def adaptive_window(size: int, bins: int) -> tuple[int, int] | None:
    """(kernel, stride) of the MaxPool whose windows are exactly adaptive_max_pool's `bins` windows over
    `size`, or None when the adaptive windows are not evenly spaced (e.g. size 7, 3 bins: 3/3/3 wide,
    starting at 0, 2, 4 -> fine; size 10, 4 bins: starts 0, 2, 5, 7 -> None)."""
    windows = [((i * size) // bins, -(-(i + 1) * size // bins)) for i in range(bins)]
    kernel = windows[0][1] - windows[0][0]
    stride = windows[1][0] - windows[0][0] if bins > 1 else kernel
    if all(start == i * stride and end - start == kernel for i, (start, end) in enumerate(windows)):
        return kernel, stride
    return None


def check_spp(node: torch.fx.Node) -> str:
    """How this spp node will be lowered, or raise ValueError saying why it cannot be (the caller adds the
    op name and the source line)."""
    x_val = node.args[0].meta["val"]
    sizes, mode = list(node.args[1]), node.args[2]
    if mode == "same":
        return f"MaxPool cascade ({'/'.join(map(str, sizes))}) + Concat"
    height, width = x_val.shape[-2:]
    if not (isinstance(height, int) and isinstance(width, int)):
        raise ValueError(
            f"adaptive max pooling (bins {sizes}) has fixed ONNX windows only for one input size, but H x W "
            f"is dynamic ({height} x {width}); export with static H and W (leave them out of dynamic_shapes)"
        )
    for n in sizes:
        if n > 1 and (adaptive_window(height, n) is None or adaptive_window(width, n) is None):
            raise ValueError(
                f"adaptive max pooling to {n}x{n} bins over {height}x{width} has unevenly spaced windows, "
                "which no single ONNX MaxPool computes; export at an input size divisible by the bin count"
            )
    return f"MaxPool per level ({'/'.join(map(str, sizes))}) + Flatten + Concat"


def _same_levels(x, sizes: Sequence[int]) -> list:
    levels = {1: x}
    previous = x
    for size, kernel in chain_steps(sizes):
        previous, _ = op.MaxPool(
            previous, kernel_shape=[kernel, kernel], strides=[1, 1], pads=[kernel // 2] * 4
        )
        levels[size] = previous
    return [levels[size] for size in sizes]


def _adaptive_levels(x, sizes: Sequence[int]) -> list:
    height, width = (int(d) for d in x.shape[-2:])
    levels = []
    for n in sizes:
        if n == 1:
            pooled = op.GlobalMaxPool(x)
        else:
            (kh, sh), (kw, sw) = adaptive_window(height, n), adaptive_window(width, n)
            pooled, _ = op.MaxPool(x, kernel_shape=[kh, kw], strides=[sh, sw])
        levels.append(op.Flatten(pooled, axis=1))
    return levels


def spp_to_onnx(x, sizes: Sequence[int], mode: str, chained: bool, backend: str):
    """Translation of fxfuse::spp(x [B, C, H, W] or [C, H, W], sizes, mode, chained, backend)."""
    unbatched = len(x.shape) == 3
    if unbatched:
        x = op.Unsqueeze(x, [0])
    levels = _same_levels(x, sizes) if mode == "same" else _adaptive_levels(x, sizes)
    out = levels[0] if len(levels) == 1 else op.Concat(*levels, axis=1)
    return op.Squeeze(out, [0]) if unbatched else out
