"""Near misses of the SSM family that no rule fuses, each given a report row that says why it is left alone.

- `associative_scan(..., reverse=True)`: on CPU torch flips the scanned dim before its log-depth sweep and
  flips the result back; the fused scan runs forward in time only.
- Mamba-2's SSD in its chunked form (mamba_ssm's `ssd_minimal_discrete`, Hugging Face's `Mamba2Mixer`
  torch path): exp of a masked segment sum of log-decays, contracted with einsums or broadcast sums.
  There is no chunked state-space-dual op; its contractions already run as batched matmuls.
- Loops with a running maximum that rescales the state (RWKV's max-stabilised wkv): exp(x - max) makes
  the recurrence nonlinear in what it carries, so it is not a linear scan.
"""

from __future__ import annotations

import math

import torch
from torch.fx import GraphModule, Node

from fxfuse.passes.reroll import _bodies, chained
from fxfuse.passes.site import Rejection

aten = torch.ops.aten
_FIRST_LEVEL = {(0, 0, -1, 2), (0, 1, None, 2)}  # the sweep's first slices: even and odd positions


def _sweep_front(node: Node) -> bool:
    """Whether `node` is the flipped scanned tensor of a reversed sweep (dim 0 flipped, sliced by 2)."""
    if node.op != "call_function" or node.target is not aten.flip.default or list(node.args[1]) not in ([0], [-0]):
        return False
    slices = {tuple(u.args[1:]) for u in node.users if u.target is aten.slice.Tensor}
    return _FIRST_LEVEL <= slices


def reversed_scan_rejections(gm: GraphModule) -> list[Rejection]:
    """One row per reversed associative-scan sweep over two tensors (decays and inputs)."""
    fronts = [n for n in gm.graph.nodes if _sweep_front(n)]
    near = {f: {w for u in f.users for w in u.users} for f in fronts}
    found, used = [], set()
    for fa in fronts:
        partners = [fb for fb in fronts if fb is not fa and fb not in used and near[fa] & near[fb]]
        if fa in used or not partners:
            continue
        used.update([fa, *partners])
        length = fa.meta["val"].shape[0]
        found.append(Rejection("ssm_scan", f"associative_scan, reverse=True, {length} steps", fa,
                               "a reversed associative_scan (time flipped before the sweep) is left as written: "
                               "the fused scan runs forward in time only"))  # fmt: skip
    return found


def _is_segsum(node: Node) -> bool:
    """masked_fill(cs[..., :, None] - cs[..., None, :], ~tril, -inf) with cs a cumsum: a segment sum."""
    if node.target not in (aten.masked_fill.Scalar, aten.where.ScalarOther) or len(node.args) < 3:
        return False
    value = node.args[2]
    if not (isinstance(value, float) and math.isinf(value) and value < 0):
        return False
    summed = node.args[0]
    if isinstance(summed, Node) and summed.target is aten.cumsum.default:  # Hugging Face: a cumsum of a masked
        return True  # expand, Σ_{j<k<=i} a_k directly
    if not isinstance(summed, Node) or summed.target is not aten.sub.Tensor:
        return False
    sources = [a.args[0] if isinstance(a, Node) and a.target is aten.unsqueeze.default else None for a in summed.args]
    return all(isinstance(s, Node) and s.target is aten.cumsum.default for s in sources)


def ssd_rejections(gm: GraphModule) -> list[Rejection]:
    """One row per exp of a masked segment sum (Mamba-2's chunked SSD)."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not aten.exp.default or not isinstance(node.args[0], Node):
            continue
        if _is_segsum(node.args[0]):
            found.append(Rejection("ssm_scan", "Mamba-2 SSD, chunked", node,
                                   "exp of a masked segment sum of log-decays (the chunked state-space dual form) "
                                   "is left as written: no fused op computes it, and its contractions already run "
                                   "as batched matmuls"))  # fmt: skip
    return found


def loop_reason(outputs: list[Node], reason: str) -> str | None:
    """The report's reason for an unrolled loop the re-roll rejected: named when it is a max-stabilised
    recurrence (a running maximum in the step) or runs backwards over the stacked order, else `reason`;
    None when the stacked outputs are no recurrence at all (no row)."""
    if not chained(outputs):
        if not chained(outputs[::-1]):
            return None
        return ("the per-step outputs are stacked in reverse time order (a loop run backwards, or slots written "
                "from the end): the fused scan runs forward in time only")  # fmt: skip
    steps = _bodies(outputs[:3])
    if any(n.target in (aten.maximum.default, aten.max.other, aten.clamp_min.Tensor) for n in steps[2]):
        return ("the step keeps a running maximum that rescales the state (a max-stabilised exp, as RWKV's "
                f"wkv): a nonlinear recurrence, not a linear scan ({reason})")  # fmt: skip
    return reason


def near_miss_rejections(gm: GraphModule) -> list[Rejection]:
    """The rows of this module's near misses found in `gm`."""
    from fxfuse.passes.ssm_prealloc import step_write_rejections

    return reversed_scan_rejections(gm) + ssd_rejections(gm) + step_write_rejections(gm)
