"""`fxfuse::selective_scan` -> standard ONNX: the discretization once, then the recurrence step by step.

ONNX has no selective-scan op; this lowering writes the factors exp(dt ⊗ A) and x ⊗ B as [B, D, L, N]
tensors and the L steps as Gather / Mul / Add / ReduceSum nodes (the same nodes a plain export of the
loop has), so the file computes what the fused op computes and any runtime runs it. A static L is needed.
"""

from __future__ import annotations

import torch
from onnxscript import FLOAT
from onnxscript.onnx_opset import opset23 as op


def check_selective_scan(node: torch.fx.Node) -> str:
    """How this selective_scan node will be lowered, or ValueError (dynamic sequence length)."""
    length = node.args[0].meta["val"].shape[2]
    if not isinstance(length, int):
        raise ValueError(
            f"the selective scan unrolls over the sequence length, which is dynamic ({length}); export with a "
            "static sequence length (leave it out of dynamic_shapes)"
        )
    return f"{length} steps of Mul/Add/ReduceSum (ONNX has no scan op for it)"


def selective_scan_to_onnx(dt, A, x, B, C, h0, backend: str, D=None, z=None, u=None):
    """Translation of fxfuse::selective_scan(dt [Bt, D, L], A [D, N], x [Bt, D, L], B, C [Bt, L, N], h0, D [D],
    z, u [Bt, D, L]): the D skip and silu(z) gate follow the steps."""
    length = int(dt.shape[2])
    dt, A, x, B, C = (op.Cast(t, to=FLOAT.dtype) for t in (dt, A, x, B, C))
    decay = op.Exp(op.Mul(op.Unsqueeze(dt, [3]), op.Unsqueeze(A, [0, 2])))  # [Bt, D, L, N]
    inputs = op.Mul(op.Unsqueeze(x, [3]), op.Unsqueeze(B, [1]))  # [Bt, D, L, N]
    readout = op.Unsqueeze(C, [1])  # [Bt, 1, L, N]
    first = op.Gather(inputs, op.Constant(value_int=0), axis=2)
    h = op.Cast(h0, to=FLOAT.dtype) if h0 is not None else op.Sub(first, first)
    ys = []
    for t in range(length):
        step = op.Constant(value_int=t)
        h = op.Add(op.Mul(op.Gather(decay, step, axis=2), h), op.Gather(inputs, step, axis=2))
        ys.append(op.ReduceSum(op.Mul(h, op.Gather(readout, step, axis=2)), [-1], keepdims=1))
    y = op.Concat(*ys, axis=2)
    if D is not None:
        skip = x if u is None else op.Cast(u, to=FLOAT.dtype)
        y = op.Add(y, op.Mul(skip, op.Unsqueeze(op.Cast(D, to=FLOAT.dtype), [0, 2])))
    if z is not None:
        z = op.Cast(z, to=FLOAT.dtype)
        y = op.Mul(y, op.Mul(z, op.Sigmoid(z)))
    return y, h
