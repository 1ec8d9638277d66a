"""A selective-scan loop that stacks the states themselves, read out after the loop (mamba.py's
`selective_scan_seq`): `for t: h = dA[:, t] * h + BX[:, t]; hs.append(h)`, then `hs = stack(hs, 1)` (or
each h unsqueezed and concatenated) and `(hs @ C[..., None]).squeeze(-1)`.

The stacked states are exactly what torch's `associative_scan` of the same decays and inputs returns, so
the loop is handed to that family's analysis (`passes/ssm_assoc.py`): one readout Σ_n hs·C fused into the
op, or, when the states are read some other way, the plain elementwise scan that materializes them.
Matched only when the step is h_t = a[t] * h_{t-1} + b[t] with a, b whole tensors read at step t along
the dim the states are stacked on, in the same layout, from a zero state; anything else is reported.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.fx import Node

from fxfuse.passes.reroll import Loop, per_step_outputs
from fxfuse.passes.site import Rejection, Site
from fxfuse.passes.ssm_labels import NotAScan, shape

aten = torch.ops.aten


def _whole(step_value: Node, time_index: Callable) -> tuple[Node, int]:
    """(tensor, time dim) for a step's `x[..., t, ...]`; NotAScan when the value is computed per step."""
    found = time_index(step_value) if step_value.target is aten.select.int else None
    if found is None:
        raise NotAScan(f"{step_value.name} ({step_value.target}) is computed inside the loop; the stacked-states "
                       "form is fused when the step reads whole decay and input tensors at step t")  # fmt: skip
    return found


def states_stacked(loop: Loop) -> bool:
    """Whether the loop's per-step output is its state: stacked, or unsqueezed and concatenated."""
    out, h = loop.outputs[1], loop.bodies[1][loop.carried]
    if loop.anchor.target is aten.stack.default:
        return out is h
    return out.target is aten.unsqueeze.default and out.args[0] is h


def match_stacked_states(loop: Loop, time_index: Callable, backend: str) -> Site | Rejection:
    """The scan of a loop whose per-step output is its carried state, stacked (see the module docstring)."""
    from fxfuse.passes.ssm_assoc import ReadoutNotFused, _plain_site, _site, analyze
    from fxfuse.passes.ssm_scan import _ZEROS, _state_update

    anchor = loop.anchor
    variant = f"{loop.length} steps, states stacked"
    h, h_prev = loop.bodies[1][loop.carried], loop.bodies[0][loop.carried]
    try:
        if len(shape(h)) != 3:
            raise NotAScan(f"the state has rank {len(shape(h))}; stacked [batch, channel, state] states are fused")
        if loop.init.target not in _ZEROS:
            raise NotAScan("the loop starts from a given state; the stacked-states form is fused from zeros")
        (a, dim_a), (b, dim_b) = (_whole(v, time_index) for v in _state_update(h, h_prev))
        dim = per_step_outputs(anchor)[1] % 4
        if anchor.target is aten.cat.default and loop.outputs[1].args[1] % 4 != dim:
            raise NotAScan("the states are unsqueezed on one dim and concatenated along another")
        if not dim == dim_a == dim_b or not shape(a) == shape(b) == shape(anchor):
            raise NotAScan("the decays and inputs are not laid out as the stacked states (same shape, same time dim)")
        form = "loop, states stacked"
        try:
            site = _site(analyze(anchor, a, b, dim), anchor, loop.length, dim, backend, form)
            site.variant = site.variant.replace("associative_scan → 1 scan", f"{loop.length} steps → 1 scan").replace(
                f", {loop.length} steps, {form}", f", {form}"
            )
            return site
        except ReadoutNotFused as exc:
            plain = _plain_site(anchor, a, b, dim, backend, f"{loop.length} steps → 1 scan, elementwise, exp decay, "
                                f"states materialized (readout not fused: {exc}), time dim {dim}, {form}")  # fmt: skip
            if plain is None:
                raise
            return plain
    except NotAScan as exc:
        return Rejection("ssm_scan", variant, anchor, str(exc))
