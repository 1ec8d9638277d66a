"""`fxfuse::complex_scan` -> standard ONNX: the recurrence step by step on real and imaginary parts.

ONNX has no scan op for it (and few runtimes take complex tensors): this lowering splits the decay and the
inputs into real and imaginary parts once and writes the L steps of the complex multiply-add as Mul / Sub /
Add nodes, so any runtime runs the file. A static L is needed.
"""

from __future__ import annotations

import torch
from onnxscript import FLOAT
from onnxscript.onnx_opset import opset23 as op


def check_complex_scan(node: torch.fx.Node) -> str:
    """How this complex_scan node will be lowered, or ValueError (dynamic sequence length)."""
    length = node.args[1].meta["val"].shape[0]
    if not isinstance(length, int):
        raise ValueError(
            f"the complex scan unrolls over the sequence length, which is dynamic ({length}); export with a "
            "static sequence length (leave it out of dynamic_shapes)"
        )
    return f"{length} steps of Mul/Sub/Add on real and imaginary parts (ONNX has no scan op for it)"


def complex_scan_to_onnx(a, x, h0, backend: str):
    """Translation of fxfuse::complex_scan(a [C, 2], x [L, C, 2], h0 [C, 2] or None) -> hs [L, C, 2]."""
    length = int(x.shape[0])
    a, x = op.Cast(a, to=FLOAT.dtype), op.Cast(x, to=FLOAT.dtype)
    part = lambda t, j: op.Gather(t, op.Constant(value_int=j), axis=-1)  # noqa: E731
    ar, ai, xr, xi = part(a, 0), part(a, 1), part(x, 0), part(x, 1)  # [C], [C], [L, C], [L, C]
    if h0 is not None:
        h0 = op.Cast(h0, to=FLOAT.dtype)
        hr, hi = part(h0, 0), part(h0, 1)
    else:
        hr = hi = op.Sub(ar, ar)
    res, ims = [], []
    for t in range(length):
        step = op.Constant(value_int=t)
        hr, hi = (op.Add(op.Sub(op.Mul(ar, hr), op.Mul(ai, hi)), op.Gather(xr, step, axis=0)),
                  op.Add(op.Add(op.Mul(ar, hi), op.Mul(ai, hr)), op.Gather(xi, step, axis=0)))  # fmt: skip
        res.append(op.Unsqueeze(hr, [0]))
        ims.append(op.Unsqueeze(hi, [0]))
    return op.Concat(op.Unsqueeze(op.Concat(*res, axis=0), [2]), op.Unsqueeze(op.Concat(*ims, axis=0), [2]), axis=2)
