"""ONNX export of optimized models: fused ops lowered to standard ONNX, verified in ONNX Runtime.

result = fxfuse.export_onnx(model, example_inputs, "model.onnx")
print(result)   # nodes by op type, fused ops lowered, ORT-vs-PyTorch error, the fxfuse report
"""

from fxfuse.onnx.export import OnnxExport, export_onnx
from fxfuse.onnx.lowering import ExportError, LoweredSite

__all__ = ["ExportError", "LoweredSite", "OnnxExport", "export_onnx"]
