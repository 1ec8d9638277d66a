"""Triton kernels of `fxfuse::spp`: every pyramid level from one pass over the feature map.

Mode "same": one program per (plane b * C + c, tile of rows, tile of columns). For each row offset dy of
the widest window it grows a row maximum outward (dx = 0, ±1, ±2, ...) with masked loads (-inf outside
the map, exactly max_pool2d's padding); when the row maximum spans a level's width and dy is inside that
level's window, the level's accumulator takes it. All decisions are on constexpr radii, so the loops
unroll into straight-line loads and maxima; the neighbouring loads hit L1/L2, the map is read from DRAM
once and each level written once, with no cat.
Mode "adaptive": one program per plane loads the whole plane and reduces each bin
[floor(i * H / n), ceil((i + 1) * H / n)) x [...] with a masked max, as ATen's adaptive_max_pool2d.

NaN: an explicit NaN test in every maximum and reduction makes NaN win, as in ATen's pooling kernels, on
every float dtype and Triton 3.x version (compiled, and interpreted under TRITON_INTERPRET=1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from fxfuse.backends import triton_interpreting

MAX_LEVELS_PER_LAUNCH = 4  # the kernel has four constexpr level slots; more distinct sizes take more launches
MAX_ADAPTIVE_PLANE = 16384  # [H, W] padded to powers of two must fit one program's registers


@triton.jit
def _nan_max(a, b):
    # ATen's pooling rule (b wins if b > a or b is NaN) spelled out, so it holds for every float dtype;
    # tl.maximum(propagate_nan=ALL) needs a NaN-propagating max instruction, unchecked here for float64
    return tl.where((b > a) | (b != b), b, a)


@triton.jit
def _take_row(acc, line, radius: tl.constexpr, dx: tl.constexpr, dy: tl.constexpr):
    # `line` spans [-dx, dx]; it belongs to the level of this radius once dx reaches it and dy is inside
    if (radius == dx) & (dy <= radius) & (-dy <= radius):
        acc = _nan_max(acc, line)
    return acc


@triton.jit
def _store_level(out_ptr, acc, batch, channel, position, levels, C, H, W, rows, cols, radius: tl.constexpr):
    if radius >= 0:
        plane = (batch * levels + position) * C + channel
        inside = (rows < H) & (cols < W)
        tl.store(out_ptr + plane.to(tl.int64) * H * W + rows * W + cols, acc, mask=inside)


@triton.jit
def _spp_same_kernel(
    x_ptr,
    out_ptr,
    C,
    H,
    W,
    levels,  # len(sizes): the output has levels * C channels
    POS0,  # where each slot's level sits among the output's levels
    POS1,
    POS2,
    POS3,
    R0: tl.constexpr,  # radius (k // 2) of each slot's level; -1 leaves the slot unused
    R1: tl.constexpr,
    R2: tl.constexpr,
    R3: tl.constexpr,
    RMAX: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    plane = tl.program_id(0)
    batch, channel = plane // C, plane % C
    rows = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    cols = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]
    src = x_ptr + plane.to(tl.int64) * H * W
    acc0 = tl.full([BLOCK_H, BLOCK_W], float("-inf"), x_ptr.dtype.element_ty)
    acc1, acc2, acc3 = acc0, acc0, acc0
    for i in tl.static_range(2 * RMAX + 1):
        dy = i - RMAX
        row = rows + dy
        row_ok = (row >= 0) & (row < H)
        line = tl.load(src + row * W + cols, mask=row_ok & (cols < W), other=float("-inf"))
        acc0 = _take_row(acc0, line, R0, 0, dy)
        acc1 = _take_row(acc1, line, R1, 0, dy)
        acc2 = _take_row(acc2, line, R2, 0, dy)
        acc3 = _take_row(acc3, line, R3, 0, dy)
        for dx in tl.static_range(1, RMAX + 1):
            left_ok = row_ok & (cols >= dx) & (cols - dx < W)
            right_ok = row_ok & (cols + dx < W)
            left = tl.load(src + row * W + cols - dx, mask=left_ok, other=float("-inf"))
            right = tl.load(src + row * W + cols + dx, mask=right_ok, other=float("-inf"))
            line = _nan_max(line, left)
            line = _nan_max(line, right)
            acc0 = _take_row(acc0, line, R0, dx, dy)
            acc1 = _take_row(acc1, line, R1, dx, dy)
            acc2 = _take_row(acc2, line, R2, dx, dy)
            acc3 = _take_row(acc3, line, R3, dx, dy)
    _store_level(out_ptr, acc0, batch, channel, POS0, levels, C, H, W, rows, cols, R0)
    _store_level(out_ptr, acc1, batch, channel, POS1, levels, C, H, W, rows, cols, R1)
    _store_level(out_ptr, acc2, batch, channel, POS2, levels, C, H, W, rows, cols, R2)
    _store_level(out_ptr, acc3, batch, channel, POS3, levels, C, H, W, rows, cols, R3)


@triton.jit
def _spp_adaptive_kernel(
    x_ptr,
    out_ptr,
    C,
    H,
    W,
    features,  # C * sum(n * n): the output row length
    offset,  # where this level starts in an output row
    N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    plane = tl.program_id(0)
    batch, channel = plane // C, plane % C
    rows = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_W)[None, :]
    inside = (rows < H) & (cols < W)
    values = tl.load(x_ptr + plane.to(tl.int64) * H * W + rows * W + cols, mask=inside, other=float("-inf"))
    is_nan = values != values
    dst = out_ptr + batch.to(tl.int64) * features + offset + channel * N * N
    for i in tl.static_range(N):
        in_rows = (rows >= (i * H) // N) & (rows < ((i + 1) * H + N - 1) // N)
        for j in tl.static_range(N):
            in_bin = in_rows & (cols >= (j * W) // N) & (cols < ((j + 1) * W + N - 1) // N)
            best = tl.max(tl.max(tl.where(in_bin, values, float("-inf")), axis=1), axis=0)
            nans = tl.sum(tl.sum(tl.where(in_bin & is_nan, 1, 0), axis=1), axis=0)
            best = tl.where(nans > 0, float("nan"), best)
            tl.store(dst + i * N + j, best)


def _launch_same(x: torch.Tensor, out: torch.Tensor, sizes: list[int]) -> None:
    batch, channels, height, width = x.shape
    block_h = min(triton.next_power_of_2(height), 16)
    block_w = min(triton.next_power_of_2(width), 32)
    grid = (batch * channels, triton.cdiv(height, block_h), triton.cdiv(width, block_w))
    distinct = sorted(set(sizes))
    for start in range(0, len(distinct), MAX_LEVELS_PER_LAUNCH):
        chunk = distinct[start : start + MAX_LEVELS_PER_LAUNCH]
        unused = MAX_LEVELS_PER_LAUNCH - len(chunk)
        radii = [size // 2 for size in chunk] + [-1] * unused
        positions = [sizes.index(size) for size in chunk] + [0] * unused
        _spp_same_kernel[grid](
            x, out, channels, height, width, len(sizes), *positions, *radii, max(chunk) // 2, block_h, block_w
        )
    for i, size in enumerate(sizes):
        first = sizes.index(size)
        if first != i:  # a repeated size is computed once and copied
            out[:, i * channels : (i + 1) * channels].copy_(out[:, first * channels : (first + 1) * channels])


def _launch_adaptive(x: torch.Tensor, out: torch.Tensor, sizes: list[int]) -> None:
    batch, channels, height, width = x.shape
    block_h, block_w = triton.next_power_of_2(height), triton.next_power_of_2(width)
    offset = 0
    for n in sizes:
        _spp_adaptive_kernel[(batch * channels,)](
            x, out, channels, height, width, out.shape[1], offset, n, block_h, block_w
        )
        offset += channels * n * n


def spp_triton(x: torch.Tensor, sizes: Sequence[int], mode: str) -> torch.Tensor | None:
    """x [B, C, H, W] -> [B, C * len(sizes), H, W] ("same") or [B, C * sum(n * n)] ("adaptive").

    Returns None for inputs these kernels do not take (the caller then runs the reference): an adaptive
    plane too large for one program.
    """
    sizes = list(sizes)
    if x.dtype == torch.bfloat16 and triton_interpreting():
        # the interpreter runs kernels on numpy, which has no bfloat16 (its loads came back as garbage);
        # max only selects elements, so pooling the exact float32 copy and rounding back is exact
        out = spp_triton(x.float(), sizes, mode)
        return None if out is None else out.to(torch.bfloat16)
    batch, channels, height, width = x.shape
    if mode == "adaptive":
        if triton.next_power_of_2(height) * triton.next_power_of_2(width) > MAX_ADAPTIVE_PLANE:
            return None
        out = x.new_empty(batch, channels * sum(n * n for n in sizes))
        _launch_adaptive(x.contiguous(), out, sizes)
        return out
    out = x.new_empty(batch, channels * len(sizes), height, width)
    _launch_same(x.contiguous(), out, sizes)
    return out
