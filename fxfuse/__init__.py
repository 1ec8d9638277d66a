"""fxfuse: finds the patterns registered in `fxfuse.families` (attention, spatial pyramid pooling, ...) in
PyTorch models, proves each rewrite on random inputs and replaces it with a fused op.

    opt = fxfuse.optimize(model, example_inputs)
    print(fxfuse.report(opt))

    compiled = torch.compile(model, backend="fxfuse")
    compiled(*example_inputs)
    print(fxfuse.report(compiled))     # each compiled model has its own; fxfuse.last_report(): the latest
"""

__version__ = "0.1.0"

from fxfuse.api import OptimizedModule, last_report, optimize, report  # noqa: E402
from fxfuse.report import Report, Rewrite  # noqa: E402


def export_onnx(*args, **kwargs):
    """Export a model (optimized or not) to ONNX with every fused op lowered to standard ONNX.

    See `fxfuse.onnx.export_onnx`."""
    from fxfuse.onnx import export_onnx as _export

    return _export(*args, **kwargs)


def _register_dynamo_backend() -> None:
    import torch._dynamo

    from fxfuse.dynamo_backend import fxfuse_backend

    if "fxfuse" not in torch._dynamo.list_backends(exclude_tags=()):
        torch._dynamo.register_backend(fxfuse_backend, name="fxfuse")


_register_dynamo_backend()

__all__ = ["OptimizedModule", "Report", "Rewrite", "export_onnx", "last_report", "optimize", "report"]
