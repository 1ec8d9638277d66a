"""`fxfuse::selective_scan` -> one standard ONNX `Scan` whose body is one step of the recurrence.

ONNX has no selective-scan op, but its `Scan` runs a body graph once per time step, carrying a state. The
body discretizes its step and reads out (per batch b, channel d, state n; fxfuse/fusion/ssm_scan):

    h = exp(dt_t ⊗ A) * h + x_t ⊗ B_t        y_t = sum_n h * C_t

so the file holds the step once, whatever the sequence length: Scan takes the trip count from the time
axis of its inputs at run time (a dynamic length exports as it is), slices dt, x [Bt, D, L] on axis 2 and
B, C [Bt, L, N] on axis 1, and stacks y_t on axis 2 of y [Bt, D, L]. The state is float32 (float64 when an
input is float64), as the op keeps it. Anything applied to y after the scan (a skip or gate) belongs after
the Scan node, outside the body.
"""

from __future__ import annotations

import itertools

import onnx_ir as ir
import torch
from onnxscript.onnx_opset import opset23 as op

# body value names must not repeat a name of the enclosing graph (the exporter names those val_0, val_1,
# ... and, without its optimizer, would give the body's unnamed values the same names)
_BODIES = itertools.count()


def check_selective_scan(node: torch.fx.Node) -> str:
    """How this selective_scan node will be lowered (any sequence length, static or dynamic)."""
    length = node.args[0].meta["val"].shape[2]
    steps = f"{length} steps" if isinstance(length, int) else f"a dynamic number of steps (L = {length})"
    return f"one ONNX Scan over {steps}, body: Exp/Mul/Add/ReduceSum of one step"


def _state_dtype(*values) -> ir.DataType:
    wide = any(v is not None and v.dtype == ir.DataType.DOUBLE for v in values)
    return ir.DataType.DOUBLE if wide else ir.DataType.FLOAT


def _step_input(name: str, like: ir.Value, dtype: ir.DataType, time_axis: int) -> ir.Value:
    """The body's view of one scan input: `like` without its time axis."""
    dims = None if like.shape is None else [d for i, d in enumerate(like.shape) if i != time_axis]
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=None if dims is None else ir.Shape(dims))


def _step_body(A: ir.Value, dt: ir.Value, x: ir.Value, B: ir.Value, C: ir.Value, dtype: ir.DataType) -> ir.Graph:
    """Scan body (h [Bt, D, N]; dt_t, x_t [Bt, D]; B_t, C_t [Bt, N]) -> (h', y_t [Bt, D]); A [D, N] is read
    from the enclosing graph."""
    prefix = f"selective_scan_step{next(_BODIES)}"
    tape = ir.tape.Tape()
    state_shape = None if dt.shape is None or A.shape is None else ir.Shape([dt.shape[0], dt.shape[1], A.shape[1]])
    h = ir.Value(name=f"{prefix}_h", type=ir.TensorType(dtype), shape=state_shape)
    dt_t = _step_input(f"{prefix}_dt", dt, dtype, 2)
    x_t = _step_input(f"{prefix}_x", x, dtype, 2)
    B_t = _step_input(f"{prefix}_B", B, dtype, 1)
    C_t = _step_input(f"{prefix}_C", C, dtype, 1)

    def axes(*ints: int) -> ir.Value:
        return tape.op("Constant", [], {"value_ints": list(ints)})

    last, channel = axes(2), axes(1)
    decay = tape.op("Exp", [tape.op("Mul", [tape.op("Unsqueeze", [dt_t, last]), A])])  # exp(dt_t ⊗ A)
    drive = tape.op("Mul", [tape.op("Unsqueeze", [x_t, last]), tape.op("Unsqueeze", [B_t, channel])])
    h_next = tape.op("Add", [tape.op("Mul", [decay, h]), drive])
    y_t = tape.op("ReduceSum", [tape.op("Mul", [h_next, tape.op("Unsqueeze", [C_t, channel])]), last],
                  {"keepdims": 0})  # fmt: skip
    for i, node in enumerate(tape.nodes):
        node.name = f"{prefix}_n{i}"
        node.outputs[0].name = f"{prefix}_v{i}"
    h_next.name, y_t.name = f"{prefix}_h_next", f"{prefix}_y"
    return ir.Graph([h, dt_t, x_t, B_t, C_t], [h_next, y_t], nodes=tape.nodes, name=prefix)


def _emit(op_type: str, inputs: list, num_outputs: int, **attributes) -> tuple[ir.Value, ...]:
    """One node with several outputs in the graph the exporter is recording. onnxscript's op calls give a
    variadic op (Scan) a single output, so the node is appended to the exporter's recorder directly."""
    from torch.onnx._internal.exporter import _core

    tracer = _core.current_tracer
    if tracer is None:
        raise RuntimeError("selective_scan_to_onnx runs only inside torch.onnx.export (dynamo=True)")
    node = ir.Node("", op_type, inputs, attributes=ir.convenience.convert_attributes(attributes),
                   num_outputs=num_outputs, version=tracer.opset.version)  # fmt: skip
    tracer.nodes.append(node)
    return tuple(node.outputs)


def selective_scan_to_onnx(dt, A, x, B, C, h0, backend: str, D=None, z=None, u=None):
    """Translation of fxfuse::selective_scan(dt, x [Bt, D, L], A [D, N], B, C [Bt, L, N], h0 [Bt, D, N] or
    None, D [D], z, u [Bt, D, L]) -> (y [Bt, D, L], h_last [Bt, D, N]) in the state dtype; the D skip and
    silu(z) gate follow the Scan."""
    dtype = _state_dtype(dt, A, x, B, C, h0)
    dt, A, x, B, C = (op.Cast(t, to=dtype) for t in (dt, A, x, B, C))
    if h0 is None:
        shape = op.Concat(op.Shape(x, start=0, end=2), op.Shape(A, start=1, end=2), axis=0)
        h0 = op.Expand(op.Cast(op.Constant(value_float=0.0), to=dtype), shape)
    else:
        h0 = op.Cast(h0, to=dtype)
    body = _step_body(A, dt, x, B, C, dtype)
    h_last, y = _emit("Scan", [h0, dt, x, B, C], 2, body=body, num_scan_inputs=4,
                      scan_input_axes=[2, 2, 1, 1], scan_output_axes=[2])  # fmt: skip
    if D is not None:
        skip = x if u is None else op.Cast(u, to=dtype)
        y = op.Add(y, op.Mul(skip, op.Unsqueeze(op.Cast(D, to=dtype), [0, 2])))
    if z is not None:
        z = op.Cast(z, to=dtype)
        y = op.Mul(y, op.Mul(z, op.Sigmoid(z)))
    return y, h_last
