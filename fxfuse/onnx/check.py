"""Verification of an exported file: the ONNX checker, then ONNX Runtime against the PyTorch model.

With dynamic shapes the file is also run at a second size: every symbolic size moves to another value its
range allows, and each input is tiled to it (token ids stay valid ids, padding masks stay masks).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import sympy
import torch
from torch.utils import _pytree as pytree

from fxfuse.passes.verify import Comparison, compare

RTOL = 1e-4  # fp32: the export reassociates (pool cascades, fused attention)


class OrtFailure(RuntimeError):
    """ONNX Runtime could not load or run the file (as opposed to running it with different numbers)."""


def tensor_leaves(values: object) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(values) if isinstance(x, torch.Tensor)]


def run_onnx(path: str, inputs: Sequence[object]) -> list[torch.Tensor]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    feeds = tensor_leaves(inputs)
    try:
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        if len(names) != len(feeds):
            raise ValueError(f"the ONNX file takes {len(names)} inputs, the example has {len(feeds)} tensors")
        outs = session.run(None, {n: x.detach().cpu().numpy() for n, x in zip(names, feeds)})
    except Exception as exc:  # onnxruntime's own exception types are not importable by name
        raise OrtFailure(f"{type(exc).__name__}: {exc}") from exc
    return [torch.from_numpy(np.asarray(o)) for o in outs]


def compare_with_torch(path: str, model: torch.nn.Module, inputs: tuple) -> Comparison:
    with torch.no_grad():
        want = tensor_leaves(model(*inputs))
    got = run_onnx(path, inputs)
    return compare(got, want, RTOL)


def check_file(path: str) -> None:
    onnx.checker.check_model(path, full_check=True)


def _resize(x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Tile `x` along every axis whose size changes, then cut it to `sizes`."""
    reps = [-(-new // old) if old else 1 for old, new in zip(x.shape, sizes)]
    tiled = x.repeat(*reps) if x.dim() else x
    return tiled[tuple(slice(0, n) for n in sizes)].clone()


def second_inputs(ep: torch.export.ExportedProgram, inputs: tuple) -> tuple | None:
    """The example inputs at another size of every dynamic dimension, or None when nothing is dynamic."""
    user_kind = torch.export.graph_signature.InputKind.USER_INPUT
    user = [s.arg.name for s in ep.graph_signature.input_specs if s.kind == user_kind]
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    vals = [placeholders[name].meta.get("val") for name in user]
    symbols: dict[sympy.Symbol, int] = {}
    for val, x in zip([v for v in vals if isinstance(v, torch.Tensor)], tensor_leaves(inputs)):
        for dim, size in zip(val.shape, x.shape):
            expr = dim.node.expr if isinstance(dim, torch.SymInt) else None
            if expr is not None and len(expr.free_symbols) == 1:  # s0, or 8*s1 as a Dim multiple gives
                sym = next(iter(expr.free_symbols))
                solved = sympy.solve(sympy.Eq(expr, int(size)), sym)
                if solved and sym not in symbols:
                    symbols[sym] = int(solved[0])
    if not symbols:
        return None
    chosen = {}
    for sym, hint in symbols.items():
        bounds = ep.range_constraints.get(sym)
        lower, upper = (int(bounds.lower), bounds.upper) if bounds is not None else (0, None)
        ok = [
            c for c in (hint * 2, hint + 1, hint - 1) if c >= max(lower, 1) and (upper is None or c <= upper)
        ]
        chosen[sym] = ok[0] if ok else hint
    resized = []
    for val, x in zip([v for v in vals if isinstance(v, torch.Tensor)], tensor_leaves(inputs)):
        sizes = [
            int(d.node.expr.xreplace(chosen)) if isinstance(d, torch.SymInt) else int(d) for d in val.shape
        ]
        resized.append(_resize(x, sizes))
    flat, spec = pytree.tree_flatten(inputs)
    it = iter(resized)
    return pytree.tree_unflatten([next(it) if isinstance(v, torch.Tensor) else v for v in flat], spec)
