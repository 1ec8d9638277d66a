"""Attention scores: what happens between the score product q @ k^T and the normalization.

`read_chain` walks from the softmax input down to the product and returns the ops on the way as terms
(scale, bias, mask, cast) — every rule of that walk is in `CHAIN_RULES`. `normalize` then rewrites the
terms, applied inner to outer, into the fused op's fixed order: s = qk * scale + bias, masked positions
replaced by one value. Moves are made only where they are exact up to rounding (a scale after a bias
scales the bias; a -inf fill survives a later bias); anything else is rejected with the reason.
With `specialize`, constant masks are evaluated (a tril/triu/arange mask proven causal becomes
causal=True), boolean conjunctions are split and segment-id equality becomes q_seg/k_seg.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
from torch.fx import Node

from fxfuse.passes.attention_layout import Step, is_number, read_product, val

aten = torch.ops.aten
_CASTS = (aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.clone.default, aten.contiguous.default)
_NOTS = (aten.bitwise_not.default, aten.logical_not.default)
_ANDS = (aten.bitwise_and.Tensor, aten.logical_and.default, aten.__and__.Tensor, aten.mul.Tensor)
_MASK_FLOOR = -1e30  # fills at or below this (finfo.min, -1e38) only ever mean "masked"
_CONST_LIMIT = 1 << 24  # elements: constants larger than this are not evaluated at match time


@dataclass
class Term:
    kind: str  # "scale" | "temperature" | "bias" | "mask" | "zero" | "cast" | "view" | "shift" (the last
    # three change nothing: a cast or view of the scores, a row-max subtraction that softmax makes redundant;
    # "zero" is a mask applied after a pointwise score function that maps a masked score to 0)
    node: Node | None = None
    value: float = 1.0  # scale factor, or a mask's fill value
    keep: bool = True  # mask polarity: True where the node is True on attended positions
    negate: bool = False  # a bias that is subtracted / a temperature that divides
    batch: tuple[int, ...] = ()  # the scores' leading dims where the term applies (views may regroup them)
    const: Node | None = None  # the 0-d constant tensor that held `value`, if not a Python number
    dtype: torch.dtype | None = None  # the scores' dtype where the term applies


def constant_value(node: Node, cache: dict | None = None) -> torch.Tensor | None:
    """The value of a node computed from constants only (arange, full, tril, ...), or None."""
    cache = {} if cache is None else cache
    if node in cache:
        return cache[node]
    out = None
    if node.op == "get_attr":
        obj = node.graph.owning_module
        for part in str(node.target).split("."):
            obj = getattr(obj, part, None)
        out = obj if isinstance(obj, torch.Tensor) and not isinstance(obj, torch.nn.Parameter) else None
    elif node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
        v = val(node)
        seeded = torch.Tag.nondeterministic_seeded in node.target.tags
        small = v is not None and v.numel() <= _CONST_LIMIT
        writes = node.target._schema.is_mutable and node.target is not aten.detach_.default  # detach_ keeps values
        if small and not seeded and not writes and not _written_in_place(node):
            if all(constant_value(n, cache) is not None for n in node.all_input_nodes):
                args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), cache.__getitem__)
                with torch.no_grad():
                    out = node.target(*args, **kwargs)
    cache[node] = out
    return out


def _written_in_place(node: Node, depth: int = 0) -> bool:
    """Whether an op writes into `node` or a view of it (a mask built by `mask[a:b, a:b] = True`): its
    value is then not what the op that made it computed."""
    for u in node.users:
        if u.op != "call_function" or not isinstance(u.target, torch._ops.OpOverload) or depth > 8:
            continue
        for arg, spec in zip(u.args, u.target._schema.arguments):
            if arg is not node or spec.alias_info is None or u.target is aten.detach_.default:
                continue
            if spec.alias_info.is_write or _written_in_place(u, depth + 1):
                return True
    return False


def _reaches_product(node: object, budget: int = 64) -> bool:
    """Whether `node` is computed from a product through score-chain ops only (bounded search)."""
    stack, seen = [node], set()
    while stack and len(seen) < budget:
        n = stack.pop()
        if not isinstance(n, Node) or n in seen:
            continue
        seen.add(n)
        if read_product(n) is not None:
            return True
        if n.op == "call_function" and n.target in CHAIN_OPS:
            stack.extend(n.all_input_nodes)
    return False


def _chain_arg(*candidates: object) -> Node | None:
    hits = [c for c in candidates if _reaches_product(c)]
    return hits[0] if len(hits) == 1 else None


def _fill(x: object) -> float | None:
    """A fill value: a Python number or a constant 0-d tensor."""
    if is_number(x):
        return float(x)
    c = constant_value(x) if isinstance(x, Node) else None
    return float(c) if c is not None and c.numel() == 1 else None


def _node(x: object) -> Node | None:
    return x if isinstance(x, Node) else None


def _rule_scale(n: Node) -> tuple[Node, Term] | None:
    # s * c, c * s, s / c -> scale; s * t, s / t with a tensor t -> temperature (checked later)
    if n.target not in (aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar):
        return None
    x = _chain_arg(*n.args) if n.target in (aten.mul.Tensor, aten.mul.Scalar) else _chain_arg(n.args[0])
    if x is None:
        return None
    other = n.args[1] if n.args[0] is x else n.args[0]
    divides = n.target in (aten.div.Tensor, aten.div.Scalar)
    c = _fill(other)
    if c is not None:
        return x, Term("scale", value=1.0 / c if divides else c, const=_node(other))
    return x, Term("temperature", node=other, negate=divides)


def _row_max_of(m: object, x: Node) -> bool:
    """Whether `m` is x's maximum over the last axis, kept as a size-1 axis (maybe detached)."""
    if isinstance(m, Node) and m.target in (aten.detach.default, aten.alias.default):
        m = m.args[0]
    if not isinstance(m, Node) or val(m) is None or val(x) is None:
        return False
    rank = val(x).dim()
    if m.target is aten.amax.default:
        dims = [d % rank for d in m.args[1]] if len(m.args) > 1 else []
        keep = m.args[2] if len(m.args) > 2 else m.kwargs.get("keepdim", False)
    elif m.target is operator.getitem and m.args[1] == 0 and m.args[0].target is aten.max.dim:
        m = m.args[0]  # x.max(dim, keepdim=True).values
        dims = [m.args[1] % rank]
        keep = m.args[2] if len(m.args) > 2 else m.kwargs.get("keepdim", False)
    else:
        return False
    return m.args[0] is x and dims == [rank - 1] and bool(keep)


def _rule_shift(n: Node) -> tuple[Node, Term] | None:
    # s - s.amax(-1, keepdim=True) (often detached, for stability) -> nothing: the normalization is
    # softmax over the last axis, which subtracts its own row maximum; `match` checks that it is
    if n.target is not aten.sub.Tensor or n.kwargs.get("alpha", 1) != 1 or not isinstance(n.args[0], Node):
        return None
    return (n.args[0], Term("shift")) if _row_max_of(n.args[1], n.args[0]) else None


def _rule_bias(n: Node) -> tuple[Node, Term] | None:
    # s + b, b + s, s - b with a tensor b -> additive bias (a boolean b is a bias of 0/1, never a mask)
    if n.target not in (aten.add.Tensor, aten.sub.Tensor) or n.kwargs.get("alpha", 1) != 1:
        return None
    x = _chain_arg(*n.args) if n.target is aten.add.Tensor else _chain_arg(n.args[0])
    other = n.args[1] if n.args[0] is x else n.args[0]
    if x is not None and is_number(other) and other == 0:
        return x, Term("cast")  # s + 0 (DeBERTa's rel_att = 0 without relative attention) -> nothing, exactly
    if x is None or not isinstance(other, Node) or val(other) is None:
        return None
    if not val(other).is_floating_point() and val(other).dtype != torch.bool:
        return None
    return x, Term("bias", node=other, negate=n.target is aten.sub.Tensor)


def _rule_masked_fill(n: Node) -> tuple[Node, Term] | None:
    # s.masked_fill(m, v) -> mask, True = masked
    if n.target not in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
        return None
    v = _fill(n.args[2])
    return None if v is None else (n.args[0], Term("mask", node=n.args[1], value=v, keep=False, const=_node(n.args[2])))


def _rule_where(n: Node) -> tuple[Node, Term] | None:
    # where(c, s, v) -> mask with c True = kept; where(c, v, s) -> mask with c True = masked
    if n.target not in (aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf):
        return None
    cond, a, b = n.args
    x = _chain_arg(a, b)
    other = b if x is a else a
    v = _fill(other)
    return None if x is None or v is None else (x, Term("mask", node=cond, value=v, keep=x is a, const=_node(other)))


def zeroing(n: Node, p: Node) -> Term | None:
    """`n` zeroing some of the probabilities `p` (p.masked_fill(m, 0), where(keep, p, 0)) as a "zero" term.
    After a pointwise score function that is 0 at masked scores (relu², not softmax) this is the same as
    masking the scores before it: every zeroed entry is 0 either way, NaN and inf scores included."""
    if n.target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor) and n.args[0] is p and _fill(n.args[2]) == 0:
        return Term("zero", node=n.args[1], keep=False, const=_node(n.args[2]))
    if n.target in (aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf) and p in n.args[1:]:
        other = n.args[2] if n.args[1] is p else n.args[1]
        if _fill(other) == 0 and n.args[1] is not n.args[2]:
            return Term("zero", node=n.args[0], keep=n.args[1] is p, const=_node(other))
    return None


def _rule_cast(n: Node) -> tuple[Node, Term] | None:
    # s.float(), s.to(f16), clones -> nothing to do: the fused op computes in float32
    if n.target not in _CASTS or not isinstance(n.args[0], Node):
        return None
    return n.args[0], Term("cast")


def _rule_batch_view(n: Node) -> tuple[Node, Term] | None:
    # s.view(B, H, N, M) of s [B*H, N, M] (BLOOM) -> nothing: only the leading dims are regrouped
    if n.target not in BATCH_VIEWS or not isinstance(n.args[0], Node) or not same_rows(n, n.args[0]):
        return None
    return n.args[0], Term("view")


CHAIN_RULES = (_rule_scale, _rule_shift, _rule_bias, _rule_masked_fill, _rule_where, _rule_cast, _rule_batch_view)
BATCH_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def same_rows(a: Node, b: Node) -> bool:
    """Whether a and b have the same last two dims (and rank >= 2): a view between them only regroups
    the leading (batch) dims, keeping every [N, M] score matrix intact."""
    va, vb = val(a), val(b)
    return va is not None and vb is not None and va.dim() >= 2 and vb.dim() >= 2 and va.shape[-2:] == vb.shape[-2:]


CHAIN_OPS = {
    aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar, aten.add.Tensor, aten.sub.Tensor,
    aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.self, aten.where.ScalarOther,
    aten.where.ScalarSelf, *_CASTS, *BATCH_VIEWS,
}  # fmt: skip


def read_chain(scores: Node) -> tuple[Node, list[Term]]:
    """Walk from the normalization's input to the score product: (where the walk stopped, terms inner
    to outer). The walk stops at a product, or at the first op no rule reads."""
    terms, node = [], scores
    while read_product(node) is None and node.op == "call_function":
        for rule in CHAIN_RULES:
            hit = rule(node)
            if hit is not None:
                term = hit[1]
                term.batch, term.dtype = tuple(int(d) for d in val(node).shape[:-2]), val(node).dtype
                node = hit[0]
                terms.append(term)
                break
        else:
            break
    product = read_product(node)
    if product is not None and (product.bias is not None or product.alpha != 1.0):
        # baddbmm(bias, q, k^T, alpha=a): a * (q @ k^T) + bias (no bias when beta=0)
        batch = tuple(int(d) for d in val(node).shape[:-2])
        terms += [Term("bias", node=product.bias, batch=batch)] if product.bias is not None else []
        terms += [Term("scale", value=product.alpha, batch=batch, dtype=val(node).dtype)]
    return node, terms[::-1]


@dataclass
class Mask:
    """A boolean input: `node` after `steps`, True on attended positions (negated first if not keep)."""

    node: Node
    keep: bool
    steps: list[Step] = field(default_factory=list)
    batch: tuple[int, ...] = ()  # the scores' leading dims where it applies


@dataclass
class Scores:
    """The score terms in the fused op's order."""

    scale: float = 1.0
    temperatures: list[Term] = field(default_factory=list)
    biases: list[tuple[Node, float, tuple[int, ...]]] = field(default_factory=list)  # (bias, multiplier, batch)
    masks: list[Mask] = field(default_factory=list)
    mask_biases: list[tuple[Mask, float]] = field(default_factory=list)  # added as where(keep, 0, fill)
    masked_value: float | None = None
    causal: int | None = None  # causal_offset when proven causal
    seg: tuple[Node, Node] | None = None
    constants: dict[Node, torch.Tensor] = field(default_factory=dict)  # inputs whose value is known


def causal_offset(keep: torch.Tensor) -> int | None:
    """o such that keep == (j <= i + o) on every [N, M] slice, or None."""
    if keep.dim() < 2 or keep.shape[-2] < 1 or keep.shape[-1] < 1:
        return None
    n, m = keep.shape[-2:]
    flat = keep.reshape(-1, n, m)
    if not bool((flat == flat[:1]).all()):
        return None
    tri = flat[0]
    i, j = torch.arange(n)[:, None], torch.arange(m)[None, :]
    for o in {int(tri[0].sum()) - 1, int(tri[-1].sum()) - n}:
        if bool((tri == (j <= i + o)).all()):
            return o
    return None


def _strip_unsqueeze(node: Node) -> tuple[Node, list[Step]]:
    steps: list[Step] = []
    while node.target is aten.unsqueeze.default and len(node.users) == 1:
        steps.insert(0, (aten.unsqueeze.default, (node.args[1],)))
        node = node.args[0]
    return node, steps


def _unsqueezed(shape: tuple[int, ...], steps: list[Step]) -> tuple[int, ...]:
    out = list(shape)
    for _op, (dim,) in steps:
        out.insert(dim % (len(out) + 1), 1)
    return tuple(out)


def _segments(node: Node, steps: list[Step], bh: tuple[int, ...]) -> tuple[Node, Node] | None:
    """q_seg [B, Nq], k_seg [B, Nk] when `node` is `q_seg[:, :, None] == k_seg[:, None, :]` applied as
    [B, 1, Nq, Nk]."""
    if node.target is not aten.eq.Tensor or len(bh) != 2 or len(node.users) != 1 or val(node).dim() != 3:
        return None
    a, b = node.args
    if a.target is not aten.unsqueeze.default or b.target is not aten.unsqueeze.default:
        return None
    qs, ks = a.args[0], b.args[0]
    if val(qs).dim() != 2 or val(ks).dim() != 2 or val(qs).is_floating_point() or val(ks).is_floating_point():
        return None
    n, m = val(node).shape[-2:]
    if a.args[1] % 3 != 2 or b.args[1] % 3 != 1 or tuple(val(qs).shape) != (bh[0], n):
        return None
    if tuple(val(ks).shape) != (bh[0], m) or _unsqueezed(tuple(val(node).shape), steps) != (bh[0], 1, n, m):
        return None
    return qs, ks


def _add_mask(out: Scores, mask: Mask, specialize: bool, bh: tuple[int, ...]) -> None:
    """Classify one boolean mask: constant (maybe causal), a conjunction, segment ids, or opaque."""
    node = mask.node
    if specialize and not mask.keep and node.target in _NOTS and len(node.users) == 1:
        mask = Mask(node.args[0], True, mask.steps, mask.batch)
        node = mask.node
    const = constant_value(node) if specialize else None
    if const is not None:
        keep = const.bool() if mask.keep else ~const.bool()
        off = causal_offset(keep)
        if off is not None and (out.causal is None or out.causal == off):
            out.causal, out.constants[node] = off, const
            return
        out.constants[node] = const
    elif specialize and mask.keep:
        inner, steps = _strip_unsqueeze(node)
        if inner.target in _ANDS and val(inner).dtype == torch.bool and len(inner.users) == 1:
            for part in inner.args:
                lift = [(aten.unsqueeze.default, (0,))] * (val(inner).dim() - val(part).dim())
                _add_mask(out, Mask(part, True, lift + steps + mask.steps, mask.batch), specialize, bh)
            return
        seg = _segments(inner, steps + mask.steps, bh) if mask.batch == bh else None
        if seg is not None and out.seg is None:
            out.seg = seg
            return
    out.masks.append(mask)


def normalize(terms: list[Term], specialize: bool, bh: tuple[int, ...]) -> Scores | str:
    """Fold the terms (inner to outer) into the fused op's order, or say why that is not exact."""
    out = Scores()
    for t in terms:
        if t.const is not None:
            out.constants[t.const] = constant_value(t.const)  # read at match time: an input, not region
        if t.kind in ("scale", "cast"):  # fills round as the scores do: -1e4 * 10, finfo32.min are -inf in f16
            dt = t.dtype if t.dtype is not None and t.dtype.is_floating_point else torch.float64
            out.mask_biases = [(m, float(torch.tensor(fill, dtype=dt) * t.value)) for m, fill in out.mask_biases]
            out.masked_value = None if (mv := out.masked_value) is None else float(torch.tensor(mv, dtype=dt) * t.value)
        if t.kind == "scale":
            out.scale *= t.value
            out.biases = [(b, m * t.value, batch) for b, m, batch in out.biases]
        elif t.kind == "temperature":
            if out.biases or out.masked_value is not None or out.causal is not None:
                return "a tensor scale is applied after a bias or mask; the fused op cannot express that"
            out.temperatures.append(t)
        elif t.kind == "bias":
            const = constant_value(t.node) if specialize else None
            if const is not None and not bool(const.any()):
                out.constants[t.node] = const  # an all-zero bias (T5's cross attention): nothing to add
                continue
            fill = _bias_as_mask(const)
            # s + finfo.min == finfo.min only while s is finite and small: not after another bias, and a
            # position masked before gets min + min = -inf here (replacing would give it min)
            alone = not out.biases and out.masked_value is None
            exact = fill is not None and not t.negate and (fill == -math.inf or alone)
            off = causal_offset(const == 0) if exact else None
            if off is not None and out.causal in (None, off):
                # 0 on and below a diagonal, -inf/finfo.min above: the same as causal masking
                err = _merge_fill(out, fill)
                if err:
                    return err
                out.causal, out.constants[t.node] = off, const
                continue
            if out.masked_value is not None and out.masked_value != -math.inf:
                if specialize or out.masked_value > _MASK_FLOOR:
                    fill = f"{out.masked_value:g}"
                    return f"a bias is added after a mask filled with {fill}; only -inf survives that exactly"
                # s + finfo.min is finfo.min: the earlier masks become additive, and compound with this bias
                # (min + min = -inf) as in the original
                out.mask_biases += [(m, out.masked_value) for m in out.masks]
                out.masks, out.masked_value = [], None
            out.biases.append((t.node, -1.0 if t.negate else 1.0, t.batch))
            if const is not None:
                out.constants[t.node] = const
        elif t.kind in ("mask", "zero"):
            # a zeroing is a mask with any fill that the score function maps to 0: the others' if they have
            # one (relu² of any non-positive fill is 0), else -inf
            fill = t.value if t.kind == "mask" else out.masked_value if out.masked_value is not None else -math.inf
            if t.kind == "zero" and fill > 0:
                return f"zeroing after the score function, but the other masks fill {fill:g}"
            err = _merge_fill(out, fill)
            if err:
                return err
            _add_mask(out, Mask(t.node, t.keep, batch=t.batch), specialize, bh)
    return out


def _bias_as_mask(const: torch.Tensor | None) -> float | None:
    """The fill when a constant bias is 0 where attended and one huge negative value elsewhere."""
    if const is None or not const.is_floating_point():
        return None
    low = const[const != 0]
    if low.numel() == 0 or not bool((low == low.flatten()[0]).all()) or float(low.flatten()[0]) > _MASK_FLOOR:
        return None
    return float(low.flatten()[0])


def _merge_fill(out: Scores, value: float) -> str | None:
    if out.masked_value is None or out.masked_value == value:
        out.masked_value = value
        return None
    # not even two finfo.min-like fills: a fully masked row weighs only the positions with the larger one
    return f"masks fill different values ({out.masked_value:g} and {value:g})"
