"""The pattern families, registered in one place: the report, `patterns=`, `Report.count`, the CLI and ONNX
export all read this table, so a family is added here once and everything lists the same set.

Each entry names its layers by import path ("module:attribute") so importing this table costs nothing:
the matcher, the module that registers the fused op, and the ONNX check/translation pair.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class FusedOp:
    """A further fused op of a family (the SSM family's `fxfuse::complex_scan`): the fields as in `Family`."""

    op: str
    fusion: str
    onnx_check: str | None = None
    onnx_translate: str | None = None

    @property
    def op_name(self) -> str:
        return self.op.split("::", 1)[1]


@dataclass(frozen=True)
class Family:
    name: str  # what users pass to `patterns=` and `Report.count`
    title: str  # how the report names it ("linear attention")
    finder: str  # "module:function": find_X(gm, backend) -> list[Site | Rejection]
    op: str  # the fused op's qualified name, "fxfuse::attention"
    fusion: str  # the module whose import registers the op
    onnx_check: str | None = None  # "module:function": check(node) -> how it lowers, or raises ValueError
    onnx_translate: str | None = None  # "module:function": the torch.onnx custom translation
    more_ops: tuple[FusedOp, ...] = ()  # further ops its sites may emit

    @property
    def ops(self) -> tuple[Family | FusedOp, ...]:
        """The family's own op, then its further ones (each with op, op_name, fusion and the ONNX pair)."""
        return (self, *self.more_ops)

    @property
    def op_name(self) -> str:
        """The op's name inside the `fxfuse` namespace ("attention")."""
        return self.op.split("::", 1)[1]


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("spp", "spp", "fxfuse.passes.spp:find_spp", "fxfuse::spp", "fxfuse.fusion.spp",
               "fxfuse.onnx.spp:check_spp", "fxfuse.onnx.spp:spp_to_onnx"),
        Family("attention", "attention", "fxfuse.passes.attention:find_attention", "fxfuse::attention",
               "fxfuse.fusion.attention", "fxfuse.onnx.attention:check_attention",
               "fxfuse.onnx.attention:attention_to_onnx"),
        Family("linear_attention", "linear attention", "fxfuse.passes.linear_attention:find_linear_attention",
               "fxfuse::linear_attention", "fxfuse.fusion.linear_attention",
               "fxfuse.onnx.linear_attention:check_linear_attention",
               "fxfuse.onnx.linear_attention:linear_attention_to_onnx"),
        Family("ssm_scan", "ssm scan", "fxfuse.passes.ssm_scan:find_ssm_scan", "fxfuse::selective_scan",
               "fxfuse.fusion.ssm_scan", "fxfuse.onnx.ssm_scan:check_selective_scan",
               "fxfuse.onnx.ssm_scan:selective_scan_to_onnx",
               (FusedOp("fxfuse::complex_scan", "fxfuse.fusion.complex_scan",
                        "fxfuse.onnx.complex_scan:check_complex_scan",
                        "fxfuse.onnx.complex_scan:complex_scan_to_onnx"),)),
    )
}  # fmt: skip


def names() -> tuple[str, ...]:
    """Every registered family's name, in the order the driver runs them."""
    return tuple(FAMILIES)


def family(name: str) -> Family:
    """The registered family `name`; a ValueError listing the known ones otherwise."""
    if name not in FAMILIES:
        raise ValueError(f"unknown pattern {name!r}; available: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def load(path: str) -> Callable:
    """Import "module:attribute" and return the attribute."""
    module, attr = path.split(":")
    return getattr(importlib.import_module(module), attr)
