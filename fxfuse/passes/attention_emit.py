"""Attention sites: from the matcher's understanding (roles, scores) to a `Site` whose `emit` builds
`fxfuse::attention` with the layout ops around it, plus the inputs verification feeds it."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.fx import Graph, Node

from fxfuse.passes.attention_layout import Step, apply_steps, layout_steps, peel_qkv, shape, val
from fxfuse.passes.attention_scores import Mask, Scores, _unsqueezed
from fxfuse.passes.site import Site

aten = torch.ops.aten


def _broadcast_steps(rank: int, scores_labels: str, canon: str) -> list[Step]:
    """A tensor broadcastable to the scores (axes `scores_labels`) -> broadcastable to [.., N, M]."""
    if scores_labels == canon:
        return []  # right-aligned broadcasting already lines it up with [B, H, N, M]
    steps: list[Step] = [(aten.unsqueeze.default, (0,))] * (len(scores_labels) - rank)
    return steps + [(aten.permute.default, ([scores_labels.index(c) for c in canon],))]


def _regroup(shape: tuple[int, ...], local: tuple[int, ...], product: tuple[int, ...]) -> list[Step]:
    """A term added where views had regrouped the scores' leading dims (`local`) -> the product's leading
    dims: expanded over them, then reshaped (views keep the row-major order of the [N, M] matrices)."""
    if local == product:
        return []
    rows = [shape[-2] if len(shape) >= 2 else 1, shape[-1] if shape else 1]
    return [(aten.expand.default, (list(local) + rows,)), (aten.reshape.default, (list(product) + rows,))]


def _backend(backend: str, device: torch.device, **params) -> str:
    try:
        from fxfuse.fusion.attention import attention_backend
    except ImportError:
        from fxfuse.backends import resolve

        return resolve(backend, device)
    return attention_backend(backend, device, **params)[0]


def _gen(kinds: dict[int, object]) -> Callable:
    """Verification inputs: real values for constants, realistic masks (with fully-masked rows) and
    sorted segment ids; None leaves the rest to the driver's generator."""

    def gen(i: int, meta: torch.Tensor, case: str, seed: int) -> torch.Tensor | None:
        kind = kinds.get(i)
        if kind is None:
            return None
        if isinstance(kind, torch.Tensor):
            return kind.clone()
        g = torch.Generator().manual_seed(1000 * seed + i)
        size = tuple(meta.shape)
        if kind == "seg":
            ids = torch.randint(0, 3, size, generator=g).sort(dim=-1).values
            return ids.to(meta.dtype).to(meta.device)
        # one fully-masked row (NaN or uniform, as in the original), unless that would be every row
        first_row = (0,) * (len(size) - 1) if math.prod(size[:-1]) > 1 else None
        if kind in ("keep", "masked"):
            masked = torch.rand(size, generator=g) < 0.3
            if first_row is not None:
                masked[first_row] = True
            return (masked if kind == "masked" else ~masked).to(meta.device)
        if meta.dtype == torch.bool:  # a boolean bias (0 or 1)
            return (torch.rand(size, generator=g) < 0.5).to(meta.device)
        x = torch.randn(size, generator=g, dtype=torch.float64) * (100.0 if case == "large" else 1.0)
        x[torch.rand(size, generator=g) < 0.1] = torch.finfo(meta.dtype).min
        if first_row is not None:
            x[first_row] = float("-inf")
        return x.to(meta.dtype).to(meta.device)

    return gen


def build_site(
    anchor: Node, output: Node, roles, scores: Scores, score_fn: str, dropout_p: float, backend: str
) -> Site | str:
    """The Site for one understood attention (inputs, emit, variant, input generators), or why not."""
    batch, sizes = roles.batch, roles.sizes
    key_from_end = len(roles.scores_labels) - roles.scores_labels.index("m")
    for t in scores.temperatures:
        tv = val(t.node)
        if tv is None or (tv.dim() >= key_from_end and tv.shape[-key_from_end] != 1):
            return "the scores are multiplied by a tensor that varies along the key axis"
    product = tuple(sizes[c] for c in roles.scores_labels[:-2])  # the score product's leading dims
    regrouped = [t.batch for t in scores.temperatures] + [b[2] for b in scores.biases] + [m.batch for m in scores.masks]
    if any(g != product for g in regrouped) and not roles.scores_labels.endswith("nm"):
        return "views regroup the scores of a product whose last axes are not [N, M]"
    q, k, v, kv_heads = peel_qkv(roles.q, roles.k, roles.v, batch, sizes)
    fold = kv_heads is not None
    hkv = kv_heads if fold else sizes.get("h", 1)
    lead = 2 - len(batch)
    canon = batch + "nm"

    inputs: list[Node] = []
    kinds: dict[int, object] = {}

    def slot(node: Node, kind: object = None) -> int:
        if node not in inputs:
            inputs.append(node)
        i = inputs.index(node)
        if isinstance(scores.constants.get(node), torch.Tensor):
            kind = scores.constants[node]
        if kind is not None:
            kinds.setdefault(i, kind)
        return i

    keep = "h" if fold else ""
    plan_q = (slot(q.node), layout_steps(q, batch + "nd", sizes, lead))
    plan_k = (slot(k.node), layout_steps(k, batch + "md", sizes, lead, keep))
    plan_v = (slot(v.node), layout_steps(v, batch + "me", sizes, lead, keep))
    temps = []
    for t in scores.temperatures:
        steps = _regroup(shape(t.node), t.batch, product)
        rank = len(product) + 2 if steps else val(t.node).dim()
        temps.append((slot(t.node), steps + _broadcast_steps(rank, roles.scores_labels, canon), t.negate))
    biases = []
    for b, mult, local in scores.biases:
        # a boolean bias is promoted by the addition: 0 and 1, exact in any float dtype
        steps = [] if val(b).is_floating_point() else [(aten.to.dtype, (val(q.node).dtype,))]
        steps += _regroup(shape(b), local, product)
        rank = len(product) + 2 if steps else val(b).dim()
        biases.append((slot(b, "bias"), steps + _broadcast_steps(rank, roles.scores_labels, canon), mult))
    masks = [_mask_plan(m, slot, roles.scores_labels, canon, product) for m in scores.masks]
    mask_biases = [(_mask_plan(m, slot, roles.scores_labels, canon, product), f) for m, f in scores.mask_biases]
    segs = [slot(s, "seg") for s in scores.seg] if scores.seg else []
    for node in scores.constants:
        slot(node)  # folded constants (a causal mask, a zero bias) still bound the region
    scale = scores.scale * q.scale * k.scale
    causal = scores.causal is not None
    masked_value = scores.masked_value if scores.masked_value is not None else float("-inf")
    out_dtype, q_dtype = val(output).dtype, val(q.node).dtype
    out_steps: list[Step] = []
    if lead:
        out_steps.append((aten.squeeze.dims, (list(range(lead)),)))  # no sizes: dynamic shapes stay dynamic
    if roles.out_labels != batch + "ne":
        out_steps.append((aten.permute.default, ([(batch + "ne").index(c) for c in roles.out_labels],)))
        if val(output).is_contiguous():
            out_steps.append((aten.contiguous.default, ()))  # a later .view() may rely on it
    params = (scale, causal, scores.causal or 0, masked_value, score_fn, dropout_p, backend)

    def emit(graph: Graph, nodes: list[Node]) -> Node:
        import fxfuse.fusion.attention  # noqa: F401  (registers torch.ops.fxfuse.attention)

        get = lambda plan: apply_steps(graph, nodes[plan[0]], plan[1])
        qq = get(plan_q)
        for i, steps, divide in temps:
            qq = graph.call_function(aten.div.Tensor if divide else aten.mul.Tensor, (qq, get((i, steps))))
        bias = None
        keep = lambda plan: apply_steps(graph, graph.call_function(aten.bitwise_not.default, (nodes[plan[0]],))
                                         if plan[1] else nodes[plan[0]], plan[2])  # fmt: skip
        added = [(get((i, steps)), mult) for i, steps, mult in biases]
        added += [(graph.call_function(aten.where.Scalar, (keep(plan), 0.0, fill)), 1.0) for plan, fill in mask_biases]
        for b, mult in added:
            b = b if mult == 1.0 else graph.call_function(aten.mul.Tensor, (b, mult))
            bias = b if bias is None else graph.call_function(aten.add.Tensor, (bias, b))
        mask = None
        for plan in masks:
            m = keep(plan)
            mask = m if mask is None else graph.call_function(aten.bitwise_and.Tensor, (mask, m))
        qs, ks = (nodes[segs[0]], nodes[segs[1]]) if segs else (None, None)
        out = graph.call_function(
            torch.ops.fxfuse.attention.default, (qq, get(plan_k), get(plan_v), bias, mask, qs, ks, *params)
        )
        if v.scale != 1.0:  # a scale peeled off v passes through the weighted sum
            out = graph.call_function(aten.mul.Tensor, (out, v.scale))
        out = apply_steps(graph, out, out_steps)
        if out_dtype != q_dtype:
            out = graph.call_function(aten._to_copy.default, (out,), {"dtype": out_dtype})
        return out

    variant = _variant(roles, scores, score_fn, dropout_p, scale, hkv, fold)
    device = val(q.node).device
    name = _backend(backend, device, dtype=q_dtype, head_dim=sizes["d"], v_head_dim=sizes["e"], score_fn=score_fn,
                    masked_value=masked_value, dropout_p=dropout_p)  # fmt: skip
    return Site("attention", variant, anchor, output, inputs, emit, backend=name, input_gen=_gen(kinds))


def _mask_plan(
    mask: Mask, slot: Callable, scores_labels: str, canon: str, product: tuple[int, ...]
) -> tuple[int, bool, list[Step]]:
    i = slot(mask.node, "keep" if mask.keep else "masked")
    applied = _unsqueezed(shape(mask.node), mask.steps)
    steps = mask.steps + _regroup(applied, mask.batch, product)
    rank = len(product) + 2 if len(steps) > len(mask.steps) else len(applied)
    return i, not mask.keep, steps + _broadcast_steps(rank, scores_labels, canon)


def _variant(roles, scores: Scores, score_fn: str, dropout_p: float, scale: float, hkv: int, fold: bool) -> str:
    sizes, parts = roles.sizes, []
    if scores.causal is not None:
        parts.append("causal" if scores.causal == 0 else f"causal offset {scores.causal}")
    if scores.seg:
        parts.append("varlen")
    h = sizes.get("h", 1)
    if fold and hkv != h:
        parts.append(f"{'mqa' if hkv == 1 else 'gqa'} {h}:{hkv}")
    if sizes["n"] != sizes["m"]:
        parts.append(f"cross {sizes['n']}x{sizes['m']}")
    if scale != 1.0:
        parts.append(f"scale {scale:.4g}")
    if scores.temperatures:
        parts.append("per-head temperature")
    if scores.biases or scores.mask_biases:
        parts.append("mask additive")
    if scores.masks:
        parts.append("mask bool")
    if score_fn != "softmax":
        parts.append(score_fn)
    if dropout_p:
        parts.append(f"dropout {dropout_p:g}")
    if len(roles.batch) < 2:
        parts.append(f"{len(roles.batch) + 2}-D")
    return ", ".join(parts) or "plain"
