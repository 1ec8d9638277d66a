"""`fxfuse::spp`: spatial pyramid pooling (YOLO SPP / SPPF, SPPNet) as one fused op.

Importing this package registers the op; `spp` below is its Python entry point.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .op import check_spp_args, spp_backward, spp_op, spp_output_shape
from .reference import spp_reference

__all__ = ["spp", "spp_backward", "spp_op", "spp_output_shape", "spp_reference"]


def spp(
    x: torch.Tensor, sizes: Sequence[int], mode: str = "same", chained: bool = False, backend: str = "auto"
) -> torch.Tensor:
    """Spatial pyramid pooling through `torch.ops.fxfuse.spp`.

    mode "same":     x [B, C, H, W] -> [B, C * len(sizes), H, W]; level k (odd) is
                     max_pool2d(x, k, stride=1, padding=k // 2), k = 1 is x, levels concatenated on C in
                     the order of `sizes` (YOLO SPP: sizes=[1, 5, 9, 13]).
    mode "adaptive": x [B, C, H, W] -> [B, C * sum(n * n for n in sizes)]; level n is
                     adaptive_max_pool2d(x, n).flatten(1) (SPPNet: sizes=[1, 2, 4]).
    x [C, H, W] (unbatched) gives the same shapes without B.
    chained=True says the original model built the levels as a chain of pools (SPPF: mp5 three times);
    the values are the same, only the gradient at ties follows the chain.
    backend: "auto", "triton", "cpu" or "reference"; inputs a fast path does not take run the reference.
    """
    sizes = list(sizes)
    check_spp_args(x, sizes, mode, chained, backend)
    return torch.ops.fxfuse.spp(x, sizes, mode, chained, backend)
