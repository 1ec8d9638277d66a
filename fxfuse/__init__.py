"""fxfuse: finds the patterns registered in `fxfuse.families` (attention, linear attention, SSM scans,
spatial pyramid pooling) in PyTorch models, proves each rewrite on random inputs and replaces it with a
fused op.

    opt = fxfuse.optimize(model, example_inputs)
    print(fxfuse.report(opt))          # what was fused, where, with what error; what was left alone, why
    fxfuse.report(opt).count("attention")

    compiled = torch.compile(model, backend="fxfuse")
    compiled(*example_inputs)
    print(fxfuse.report(compiled))     # each compiled model has its own; fxfuse.last_report(): the latest

    result = fxfuse.export_onnx(model, example_inputs, "model.onnx")
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

__version__ = "0.1.0"

from fxfuse.api import OptimizedModule, last_report, optimize, report  # noqa: E402
from fxfuse.report import Report, Rewrite  # noqa: E402

if TYPE_CHECKING:
    import torch

    from fxfuse.onnx import OnnxExport


def export_onnx(
    model: torch.nn.Module,
    example_inputs: Sequence[object] | dict[str, object] | torch.Tensor,
    path: str | os.PathLike,
    *,
    opset: int = 23,
    dynamic_shapes: dict | tuple | list | None = None,
    verify: bool = True,
    fused_nodes: bool = False,
    patterns: Sequence[str] | None = None,
    backend: str = "auto",
) -> OnnxExport:
    """Optimize `model` (or take an `fxfuse.optimize`d one) and write it to `path` as standard ONNX, every
    fused op lowered to standard ops; returns an `OnnxExport` (print it: nodes by op type, what each fused
    site became, ONNX Runtime's error against PyTorch, the optimize report).

    example_inputs: a tuple of positional inputs or a dict of keyword inputs (which then name the ONNX
        inputs). opset: 23 or newer (ONNX `Attention`). dynamic_shapes: `torch.export`'s argument.
    verify: rewrites verified as in `optimize`, the file checked with `onnx.checker` and run in ONNX
        Runtime against PyTorch (within 1e-4 relative); a mismatch raises `fxfuse.onnx.ExportError`.
    fused_nodes: keep each fused op as one node of the `fxfuse` domain whose body is standard ONNX.
    patterns, backend: as in `optimize`.

    Needs the `onnx` extra (`pip install -e '.[onnx]'` in a checkout). More: `fxfuse.onnx.export_onnx`.
    """
    from fxfuse.api import check_patterns
    from fxfuse.backends import check_backend
    from fxfuse.onnx import export_onnx as _export  # onnx and onnxruntime load only when exporting

    check_patterns(patterns)  # before a minute of export work, and never a silent plain export
    check_backend(backend)

    return _export(
        model, example_inputs, path, opset=opset, dynamic_shapes=dynamic_shapes, verify=verify,
        fused_nodes=fused_nodes, patterns=patterns, backend=backend,
    )  # fmt: skip


def _register_dynamo_backend() -> None:
    import torch._dynamo

    from fxfuse.dynamo_backend import fxfuse_backend

    if "fxfuse" not in torch._dynamo.list_backends(exclude_tags=()):
        torch._dynamo.register_backend(fxfuse_backend, name="fxfuse")


_register_dynamo_backend()

__all__ = ["OptimizedModule", "Report", "Rewrite", "export_onnx", "last_report", "optimize", "report"]
