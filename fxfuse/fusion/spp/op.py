"""The `fxfuse::spp` custom op: argument checks, backend dispatch, fake impl and an exact backward.

Schema: fxfuse::spp(Tensor x, int[] sizes, str mode, bool chained, str backend) -> Tensor

The forward values do not depend on `chained` (max with -inf padding composes: mp5(mp5(x)) == mp9(x)),
so every backend computes them the fastest way it knows. The backward recomputes the pools of the
original formulation with ATen's *_with_indices ops and sends gradients back through ATen's own pooling
backward: ties go to the element the original model's autograd would pick (first max in each window,
window by window along the chain when `chained`), and the backward graph stays traceable ATen.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fxfuse.backends import check_backend, count_call, resolve

from .reference import MODES, chain_steps, spp_reference

SCHEMA = "(Tensor x, int[] sizes, str mode, bool chained, str backend) -> Tensor"
# dtypes the cpu and triton paths take; anything else (ints, complex) runs the reference
FAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_spp_args(x: torch.Tensor, sizes: Sequence[int], mode: str, chained: bool, backend: str) -> None:
    """Raise ValueError, with what to change, for arguments no input could make valid."""
    if mode not in MODES:
        raise ValueError(f"spp mode={mode!r} is not one of {', '.join(MODES)}.")
    if len(sizes) == 0:
        raise ValueError("spp needs at least one pyramid level; pass a non-empty `sizes`.")
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes):
        raise ValueError(f"spp sizes must be positive ints, got {list(sizes)}.")
    if mode == "same" and any(n % 2 == 0 for n in sizes):
        raise ValueError(
            f"spp mode='same' needs odd kernel sizes (padding k // 2 keeps H x W only for odd k), "
            f"got {list(sizes)}."
        )
    if mode == "adaptive" and chained:
        raise ValueError("spp chained=True describes chained max pools of mode='same'; pass chained=False.")
    if x.dim() not in (3, 4):
        raise ValueError(f"spp expects x of shape [B, C, H, W] or [C, H, W], got {list(x.shape)}.")
    check_backend(backend)


def spp_output_shape(shape: Sequence[int], sizes: Sequence[int], mode: str) -> list[int]:
    """[B, C, H, W] -> [B, C * len(sizes), H, W] ("same") or [B, C * sum(n * n)] ("adaptive")."""
    *batch, channels, height, width = shape
    if mode == "same":
        return [*batch, channels * len(sizes), height, width]
    return [*batch, channels * sum(n * n for n in sizes)]


def _fast_forward(x: torch.Tensor, sizes: list[int], mode: str, backend: str) -> torch.Tensor | None:
    """The cpu or triton result, or None where that path does not take this input."""
    which = resolve(backend, x.device)
    if which == "reference" or x.dim() != 4 or x.dtype not in FAST_DTYPES or x.numel() == 0:
        return None
    if which == "triton":
        from fxfuse.backends.triton.spp import spp_triton

        return spp_triton(x, sizes, mode)
    from fxfuse.backends.cpu.spp import spp_adaptive_cpu, spp_same_cpu

    return spp_same_cpu(x, sizes) if mode == "same" else spp_adaptive_cpu(x, sizes)


@torch.library.custom_op("fxfuse::spp", mutates_args=(), schema=SCHEMA)
def spp_op(x: torch.Tensor, sizes: Sequence[int], mode: str, chained: bool, backend: str) -> torch.Tensor:
    check_spp_args(x, sizes, mode, chained, backend)
    out = _fast_forward(x, list(sizes), mode, backend)
    count_call("spp", "reference" if out is None else resolve(backend, x.device))
    if out is None:
        out = spp_reference(x, sizes, mode, chained)
    # the fake impl promises a fresh contiguous tensor whatever the input layout
    return out.contiguous()


@spp_op.register_fake
def _spp_fake(x: torch.Tensor, sizes: Sequence[int], mode: str, chained: bool, backend: str) -> torch.Tensor:
    check_spp_args(x, sizes, mode, chained, backend)
    return x.new_empty(spp_output_shape(x.shape, sizes, mode))


def _pool_with_indices(source: torch.Tensor, kernel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """max_pool2d(source, kernel, 1, kernel // 2) and the argmax ATen's autograd would save for it."""
    return torch.ops.aten.max_pool2d_with_indices(
        source, [kernel] * 2, [1, 1], [kernel // 2] * 2, [1, 1], False
    )


def _pool_backward(
    grad: torch.Tensor, source: torch.Tensor, kernel: int, indices: torch.Tensor
) -> torch.Tensor:
    """Gradient of max_pool2d(source, kernel, 1, kernel // 2) w.r.t. source, routed through `indices`."""
    return torch.ops.aten.max_pool2d_with_indices_backward(
        grad, source, [kernel] * 2, [1, 1], [kernel // 2] * 2, [1, 1], False, indices
    )


def _level_grads(grad: torch.Tensor, sizes: Sequence[int], widths: Sequence[int]) -> dict[int, torch.Tensor]:
    """Split the output gradient into its levels (`widths` along dim 1), summing repeated sizes."""
    grads: dict[int, torch.Tensor] = {}
    for size, part in zip(sizes, grad.split(list(widths), dim=1), strict=True):
        grads[size] = grads[size] + part if size in grads else part
    return grads


def _sum_in_order(parts: list[torch.Tensor]) -> torch.Tensor:
    total = parts[0].clone()
    for part in parts[1:]:
        total = total + part
    return total


def spp_backward(
    grad: torch.Tensor, x: torch.Tensor, sizes: Sequence[int], mode: str, chained: bool
) -> torch.Tensor:
    """grad [B, C * len(sizes), H, W] or [B, C * sum(n * n)], x [B, C, H, W] -> grad of x [B, C, H, W]."""
    if x.dim() == 3:
        return spp_backward(grad.unsqueeze(0), x.unsqueeze(0), sizes, mode, chained).squeeze(0)
    channels = x.shape[1]
    if mode == "adaptive":
        grads = _level_grads(grad, sizes, [channels * n * n for n in sizes])
        parts = []  # latest-created pool first, as autograd accumulates the original cat's inputs
        for n, part in reversed(grads.items()):
            _, indices = torch.ops.aten.adaptive_max_pool2d(x, [n, n])
            level_grad = part.reshape(x.shape[0], channels, n, n)
            parts.append(torch.ops.aten.adaptive_max_pool2d_backward(level_grad, x, indices))
        return _sum_in_order(parts)
    grads = _level_grads(grad, sizes, [channels] * len(sizes))
    if not chained:
        # autograd adds the cat's own slice first, then the pools' gradients, latest-created pool first
        pools = [
            _pool_backward(grads[size], x, size, _pool_with_indices(x, size)[1])
            for size in reversed(grads)
            if size != 1
        ]
        return _sum_in_order(([grads[1]] if 1 in grads else []) + pools)
    # recompute the chain, then walk it from the widest level down: each level's gradient is its own
    # slice plus what flows back from the next level, summed in that order as the original's autograd does
    chain, source = [], x
    for size, kernel in chain_steps(sizes):
        pooled, indices = _pool_with_indices(source, kernel)
        chain.append((size, kernel, source, indices))
        source = pooled
    flowing = None
    for size, kernel, source, indices in reversed(chain):
        level_grad = grads[size] if flowing is None else grads[size] + flowing
        flowing = _pool_backward(level_grad, source, kernel, indices)
    parts = [grads[1]] if 1 in grads else []
    return _sum_in_order(parts if flowing is None else [*parts, flowing])


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
    x, sizes, mode, chained, _ = inputs
    ctx.save_for_backward(x)
    ctx.spp_args = (list(sizes), mode, chained)


def _backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple:
    (x,) = ctx.saved_tensors
    sizes, mode, chained = ctx.spp_args
    return spp_backward(grad, x, sizes, mode, chained), None, None, None, None


spp_op.register_autograd(_backward, setup_context=_setup_context)
