"""Which fused ops lower to ONNX, how, and the check that names the user's line when one cannot.

One entry per fused op: a check on the FX node (it has FakeTensor shapes and the source line) that says
how the op will be lowered or raises, and the translation the torch.onnx exporter calls with ONNX values.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fxfuse import families
from fxfuse.passes.capture import location


class ExportError(ValueError):
    """A model (or one of its fused ops) that cannot become an ONNX file computing the same thing."""


@dataclass(frozen=True)
class Lowering:
    name: str  # the op's name in the fxfuse ONNX domain (fused_nodes=True)
    check: Callable[[torch.fx.Node], str]
    translate: Callable


def _lowerings() -> dict[str, Lowering]:
    """Fused op name -> its lowering, for every registered family that has one."""
    table = {}
    for fused in (op for fam in families.FAMILIES.values() for op in fam.ops):
        if fused.onnx_check is None or fused.onnx_translate is None:
            continue
        importlib.import_module(fused.fusion)  # registers torch.ops.fxfuse.<op>
        table[fused.op] = Lowering(fused.op_name, families.load(fused.onnx_check),
                                   families.load(fused.onnx_translate))  # fmt: skip
    return table


@dataclass
class LoweredSite:
    """One fused op of the exported graph and what it became in ONNX."""

    op: str  # "spp" | "attention"
    node: str  # the FX node's name in the rewritten graph
    location: str
    lowered_as: str


def fused_op_name(node: torch.fx.Node) -> str | None:
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return None
    name = target._schema.name
    return name if name.startswith("fxfuse::") else None


def plan_lowerings(gm: torch.fx.GraphModule) -> list[LoweredSite]:
    """Check every fused op of `gm` before anything is written; raise ExportError naming the op and line."""
    table = _lowerings()
    sites = []
    for node in gm.graph.nodes:
        name = fused_op_name(node)
        if name is None:
            continue
        if name not in table:
            raise ExportError(
                f"{name} at {location(node)} has no ONNX lowering; export without that pattern "
                f"(patterns=[...] leaving it out)"
            )
        try:
            how = table[name].check(node)
        except ValueError as exc:
            raise ExportError(f"cannot export {name} at {location(node)}: {exc}") from exc
        sites.append(LoweredSite(table[name].name, node.name, location(node), how))
    return sites


def translation_table() -> dict[torch._ops.OpOverload, Callable]:
    """custom_translation_table for torch.onnx.export: each fused op's standard-ONNX translation."""
    return {getattr(torch.ops.fxfuse, low.name).default: low.translate for low in _lowerings().values()}
