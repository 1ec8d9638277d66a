"""What a matcher returns: a `Site` to rewrite, or a `Rejection` that says why a near match was left alone.

A matcher (one per pattern family, e.g. `passes/spp.py`) is a function `find_X(gm, backend) -> list[Site |
Rejection]`. It never mutates the graph: the driver (`passes/rewrite.py`) computes the region between
`inputs` and `output`, checks nothing inside it escapes, verifies the site on random inputs and only then
calls `emit` to splice the fused op in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.fx import Graph, Node

# emit(graph, input_nodes) -> node that replaces `output` (inserted by the driver just before `output`), or
# [output's replacement, *extra_outputs' replacements] for a site with `extra_outputs`.
Emit = Callable[[Graph, list[Node]], "Node | list[Node]"]
# input_gen(index, meta_val, case, seed) -> tensor for that input, or None for the default generator.
# `case` is one of verify.CASES ("normal", "large", "negative", ...); `meta_val` a FakeTensor.
InputGen = Callable[[int, torch.Tensor, str, int], "torch.Tensor | None"]


@dataclass
class Site:
    """A candidate rewrite: replace everything between `inputs` and `output` by what `emit` builds."""

    pattern: str  # "attention" | "linear_attention" | "ssm_scan" | "spp"
    variant: str  # what was understood, for people: "causal, gqa 8:2, scale 0.125, mask additive"
    anchor: Node  # the node that names the site's location (softmax, cat, ...)
    output: Node  # its uses are redirected to the fused result
    inputs: list[Node]  # the tensors the fused op reads; the region is everything between them and output
    emit: Emit
    backend: str = ""  # the backend that will run it ("triton", "cpu", "reference"), for the report
    tolerance: float | None = None  # relative tolerance override (reassociated ops: 1e-4)
    input_gen: InputGen | None = None
    extra_region: list[Node] = field(default_factory=list)  # nodes to drop with the region (e.g. dead indices)
    # region nodes that code outside the region reads besides `output` (a scan's final state); their uses are
    # redirected to emit's further results, and verification compares them too
    extra_outputs: list[Node] = field(default_factory=list)
    # buffer placeholders whose value at capture the fused op relies on (a causal mask proven causal):
    # the compiled graph is guarded on them (see `passes/buffer_values.py`)
    reads_buffers: list[Node] = field(default_factory=list)


@dataclass
class Rejection:
    """A near match that is left alone, with the reason shown in the report."""

    pattern: str
    variant: str
    anchor: Node
    reason: str
