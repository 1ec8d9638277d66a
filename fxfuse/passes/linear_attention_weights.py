"""Linear attention: what the score matrix goes through between the two products, read as the fused op's
weights — scale, a causal 0/1 mask or decay gamma_h^(i - j) (constants, evaluated), a row normaliser, a
Taylor expansion of exp — or the reason the op cannot express it."""

from __future__ import annotations

import torch
from torch.fx import Node

from fxfuse.passes.attention_layout import Product, val
from fxfuse.passes.attention_scores import Term, constant_value, read_chain
from fxfuse.passes.buffer_values import buffer_seed, buffers_read
from fxfuse.passes.linear_attention_site import Weights, einsum_sides, is_call

aten = torch.ops.aten
_DECAY_RTOL = 1e-5  # a float32 decay matrix built by pow/exp differs from gamma^(i - j) by rounding only


def peel_eps(den: Node) -> tuple[Node, str, float] | None:
    """`den` as (x, "eps", eps) for x + eps (either order), (x, "clamp", eps) for x.clamp(min=eps), (den, "eps",
    0.0) otherwise; None when the clamp also bounds from above (no row normaliser the op knows)."""
    if is_call(den, aten.add.Tensor) and den.kwargs.get("alpha", 1) == 1 and any(
            isinstance(a, (int, float)) for a in den.args[:2]):  # fmt: skip
        number = 1 if isinstance(den.args[1], (int, float)) else 0
        return den.args[1 - number], "eps", float(den.args[number])
    if is_call(den, aten.clamp.default, aten.clamp_min.default) and len(den.args) > 1 and den.args[1] is not None:
        if len(den.args) > 2 and den.args[2] is not None:
            return None
        return den.args[0], "clamp", float(den.args[1])
    return den, "eps", 0.0


def row_sum_of(den: Node, s: Node) -> tuple[str, float] | str | None:
    """(normalize, eps) when `den` is s.sum(-1, keepdim=True) [+ eps | .clamp(min=eps)], a reason when it
    is a reduction of s that the fused op cannot express, None when it is not a reduction of s."""
    den, added = _strip_last_axis(den, s)
    peeled = peel_eps(den)
    if peeled is None:
        return _abs_sum_reason(den, s) or "the normaliser is clamped from above"
    den, mode, eps = peeled
    if not added:
        den, added = _strip_last_axis(den, s)
    if not is_call(den, aten.sum.dim_IntList):
        return None
    if _abs_sum_reason(den, s):
        return _abs_sum_reason(den, s)
    if den.args[0] is not s:
        return None
    keep = den.args[2] if len(den.args) > 2 else den.kwargs.get("keepdim", False)
    dims = [d % val(s).dim() for d in den.args[1]]
    if dims != [val(s).dim() - 1] or keep == added:  # s.sum(-1, keepdim=True), or s.sum(-1)[..., None]
        return "the normaliser is not a sum over the key axis (row sum)"
    return mode, eps


def _strip_last_axis(den: Node, s: Node) -> tuple[Node, bool]:
    """(x, True) when `den` is x.unsqueeze(-1) putting back the key axis of the scores `s` (z[..., None] of
    z = s.sum(-1)), else (den, False)."""
    if is_call(den, aten.unsqueeze.default) and val(s) is not None and val(den).dim() == val(s).dim():
        if den.args[1] % val(den).dim() == val(den).dim() - 1:
            return den.args[0], True
    return den, False


def _abs_sum_reason(den: Node, s: Node) -> str | None:
    """Why not, when `den` sums |s| (maybe detached, clamped from both sides: torchscale's retention)."""
    peeled = den.args[0] if is_call(den, aten.clamp.default, aten.clamp_min.default) else den
    if not is_call(peeled, aten.sum.dim_IntList):
        return None
    inner = peeled.args[0]
    if not is_call(inner, aten.abs.default):
        return None
    inner = inner.args[0]
    while is_call(inner, aten.detach.default, aten.alias.default):
        inner = inner.args[0]
    return "the normaliser sums |scores| (retention's abs-sum): not linearisable" if inner is s else None


def divided(node: Node) -> list[tuple[Node, Node]]:
    """(x, den) for each reading of `node` as x / den: x / den, x * reciprocal(den), reciprocal(den) * x,
    x * den ** -1 (`1 / den` reaches the graph as reciprocal(den))."""
    if is_call(node, aten.div.Tensor) and all(isinstance(a, Node) for a in node.args[:2]):
        return [(node.args[0], node.args[1])]
    if not is_call(node, aten.mul.Tensor) or not all(isinstance(a, Node) for a in node.args[:2]):
        return []
    a, b = node.args[:2]
    return [(x, reciprocal_of(r)) for x, r in ((a, b), (b, a)) if reciprocal_of(r) is not None]


def reciprocal_of(node: Node) -> Node | None:
    """x when `node` is 1 / x: reciprocal(x) (also how `1 / x` reaches the graph) or x ** -1."""
    if is_call(node, aten.reciprocal.default):
        return node.args[0]
    if is_call(node, aten.pow.Tensor_Scalar) and node.args[1] == -1:
        return node.args[0]
    return None


def normaliser(w: Node) -> tuple[Node, str, float] | str | None:
    """(scores, normalize, eps) for W = S / rowsum(S)... or S * (1 / rowsum(S)...), (W, "none", 0) for
    anything else."""
    for x, den in divided(w):
        found = row_sum_of(den, x)
        if isinstance(found, str):
            return found
        if found is not None:
            return x, *found
    return w, "none", 0.0


def _decay_of(mask: torch.Tensor, heads: int, rtol: float) -> tuple[list[float] | None] | str:
    """(gammas or None,) when mask [..., N, N] is (j <= i) * gamma_h^(i - j) up to rtol, else why not."""
    n = mask.shape[-1]
    if mask.dim() < 2 or mask.shape[-2] != n:
        return "the mask is not square"
    flat = mask.double().reshape(-1, n, n)
    if flat.shape[0] not in (1, heads):
        return "the mask varies along a batch axis"
    i = torch.arange(n, dtype=torch.float64)
    dist = i[:, None] - i[None, :]
    gamma = flat[:, 1, 0] if n > 1 else torch.ones(flat.shape[0], dtype=torch.float64)
    want = torch.where(dist >= 0, gamma.view(-1, 1, 1) ** dist.clamp(min=0), 0.0)
    if not bool(torch.isclose(flat, want, rtol=rtol, atol=1e-30).all()):
        return "the mask is not causal-structured (a lower-triangular 0/1 mask or a decay gamma^(i - j))"
    if bool((gamma == 1).all()):
        return (None,)
    if bool((gamma < 0).any()):
        return "the decay factors are negative"
    return ([float(g) for g in gamma],)


def read_weights(terms: list, scores_labels: str, heads: int) -> Weights | str:
    """The score terms (from `read_scores`, scores with role labels `scores_labels`, ending in "nm") as
    scale, causal mask and decay, or why they are not."""
    out, mask, rtol = Weights(), None, _DECAY_RTOL
    for t in terms:
        if t.kind == "cast":
            continue
        if t.kind == "scale":
            out.scale *= t.value
            if t.const is not None:
                out.constants[t.const] = constant_value(t.const)
            continue
        if t.kind == "bias":
            return "a bias is added to the scores: not linearisable"
        if t.kind == "mask" and t.value != 0.0:
            return f"masked scores are filled with {t.value:g}, not 0: not linear attention"
        if t.kind == "nested":
            return "the scores are multiplied by a constant inside their expansion ((s D)², 1 + s D + (s D)²/2)"
        if t.kind == "tri":  # tril(s, o) / triu(s, o): a 0/1 mask known from the shape alone
            ones = torch.ones(*(int(x) for x in val(t.node).shape[-2:]), dtype=torch.float64)
            factor = torch.tril(ones, int(t.value)) if t.keep else torch.triu(ones, int(t.value))
        elif t.kind in ("temperature", "mask", "einsum") and not t.negate:
            const_node = t.node.args[1][int(t.value)] if t.kind == "einsum" else t.node
            const = _constant(const_node, out)
            if isinstance(const, str):
                return const
            if const.is_floating_point():  # a half-precision decay matrix is gamma^(i - j) rounded to its dtype
                rtol = max(rtol, 2 * torch.finfo(const.dtype).eps)
            factor = (const.bool() == t.keep).double() if t.kind == "mask" else const.double()
            if t.kind == "einsum":
                factor = _einsum_aligned(t.node, int(t.value), factor)
        else:
            return "the scores go through an op the fused op cannot express"
        if factor.dim() > len(scores_labels):
            return "the mask has more axes than the scores"
        factor = factor.reshape((1,) * (len(scores_labels) - factor.dim()) + tuple(factor.shape))
        for axis, label in enumerate(scores_labels[:-2]):
            if label != "h" and factor.shape[axis] != 1:
                if not bool((factor == factor.narrow(axis, 0, 1)).all()):
                    return "the mask varies along the batch axis"
                factor = factor.narrow(axis, 0, 1)
        mask = factor if mask is None else mask * factor
    if mask is not None:
        decay = _decay_of(mask, heads, rtol)
        if isinstance(decay, str):
            return decay
        out.causal, out.decay = True, decay[0]
    return out


def _constant(node: Node, out: Weights) -> torch.Tensor | str:
    """The value of a mask or decay operand (recorded in `out`), or why it has none at match time."""
    const = constant_value(node)
    if const is None:
        # a module buffer (GPT-2's tril `bias`), sliced or not: its value now, guarded per call
        seed = buffer_seed(node.graph.owning_module)
        const = constant_value(node, dict(seed)) if seed else None
        if const is None:
            return "the scores are multiplied by a mask that is not a constant (an input's values may change per call)"
        out.buffers += [b for b in buffers_read(node, seed) if b not in out.buffers]
    out.constants[node] = const
    return const


def _einsum_aligned(node: Node, i: int, value: torch.Tensor) -> torch.Tensor:
    """Operand i of an einsum whose labels all appear in the output, laid out as the output's axes
    (size 1 where it has none): "bhqd,bhkd,hqk->bhqk" turns the [H, Q, K] decay into [1, H, Q, K]."""
    sides, out = einsum_sides(node)
    labels = sides[i]
    value = value.permute([labels.index(c) for c in out if c in labels])
    return value.reshape([value.shape[[c for c in out if c in labels].index(c)] if c in labels else 1 for c in out])


def read_scores(scores: Node) -> tuple[Node, list[Term], tuple[str, float] | None]:
    """Walk from the weights W down to the score product: (where the walk stopped, the terms inner to
    outer, ("taylor" | "square", the scale of s inside) for W = 1 + s + s²/2 or s², else None). Beyond
    `read_chain`: tril/triu of the scores (a 0/1 mask from the shape), those expansions, and a 3-operand einsum
    "q,k,c->scores" with a constant c on the output's axes (fla's naive retention multiplies the decay in
    that way) read as the product q k^T times c."""
    where, terms = read_chain(scores)
    for _ in range(4):
        if not is_call(where, aten.tril.default, aten.triu.default) or not isinstance(where.args[0], Node):
            break
        diag = where.args[1] if len(where.args) > 1 else where.kwargs.get("diagonal", 0)
        tri = Term("tri", node=where, value=float(diag), keep=where.target is aten.tril.default)
        where, inner = read_chain(where.args[0])
        terms = [*inner, tri, *terms]
    expansion = None
    for kind, read in (("taylor", taylor_of), ("square", _square_of)):
        found = read(where, terms)
        if found is not None:
            where, terms, expansion = found[0], found[1], (kind, found[2])
            break
    factor = _einsum_factor(where)
    if factor is not None:
        # inside an expansion the factor multiplies s, not the weights: (s D)² is not s² D
        terms = [Term("nested" if expansion else "einsum", node=where, value=float(factor)), *terms]
    return where, terms, expansion


def _einsum_factor(node: Node) -> int | None:
    """i when `node` is an einsum of three operands whose operand i carries output axes only (scales the
    product of the other two elementwise) and the other two form a product."""
    if not is_call(node, aten.einsum.default) or len(node.args[1]) != 3:
        return None
    spelled = einsum_sides(node)
    if spelled is None or any(len(set(x)) != len(x) for x in (*spelled[0], spelled[1])):
        return None
    sides, out = spelled
    hits = [i for i, sd in enumerate(sides) if all(c in out for c in sd)]
    return hits[0] if len(hits) == 1 else None


def einsum_product(node: Node) -> Product | None:
    """The product of the two non-constant operands of a 3-operand einsum read by `_einsum_factor`."""
    i = _einsum_factor(node)
    if i is None:
        return None
    sides, out = einsum_sides(node)
    (a, la), (b, lb) = [(t, sd) for j, (t, sd) in enumerate(zip(node.args[1], sides)) if j != i]
    if any(c not in la + lb for c in out):
        return None
    return Product(node, a, b, la, lb, out)


def _square_of(where: Node, terms: list) -> tuple[Node, list, float] | None:
    """(where the walk down from s stopped, the terms, the scale of s) when the chain stopped at s²
    (ReBased squares the scores: (a.b)² = vec(a aᵀ) . vec(b bᵀ))."""
    if not (_squares(where) and isinstance(where.args[0], Node)):
        return None
    inner = _plain_scale(where.args[0])
    return None if inner is None else (inner[0], terms, inner[1])


def _squares(node: Node) -> bool:
    """Whether `node` is x ** 2, square(x) or x * x of x = node.args[0]."""
    if is_call(node, aten.pow.Tensor_Scalar) and node.args[1] == 2 or is_call(node, aten.square.default):
        return True
    return is_call(node, aten.mul.Tensor) and node.args[0] is node.args[1]


def _plain_scale(s: Node) -> tuple[Node, float] | None:
    """(where the walk down from s stopped, the product of its scales) when only scales and casts lie on it."""
    where, terms = read_chain(s)
    if any(t.kind not in ("scale", "cast") for t in terms):
        return None
    inner = 1.0
    for t in terms:
        inner *= t.value if t.kind == "scale" else 1.0
    return where, inner


def _half_square_of(node: Node, s: Node) -> bool:
    """Whether `node` is s²/2: s ** 2 / 2, s * s * 0.5, 0.5 * square(s), ..."""
    if is_call(node, aten.div.Tensor) and node.args[1] == 2:
        sq = node.args[0]
    elif is_call(node, aten.mul.Tensor) and 0.5 in node.args[:2]:
        sq = node.args[1] if node.args[0] == 0.5 else node.args[0]
    else:
        return False
    return _squares(sq) and sq.args[0] is s


def taylor_of(where: Node, terms: list) -> tuple[Node, list, float] | None:
    """(where the walk down from s stopped, the terms outside the expansion then inside it, the scale of
    s inside) when the score chain stopped at 1 + s with s²/2 added just outside: the weights are the
    second-order Taylor expansion of exp(s) (Based)."""
    if not is_call(where, aten.add.Tensor) or where.kwargs.get("alpha", 1) != 1:
        return None  # add(x, y, alpha=a) is x + a * y
    if len(where.args) == 2 and all(isinstance(a, Node) for a in where.args):
        # (1 + s) + s * s * 0.5: the walk stops at the outer add when both sides reach the product
        for one_plus, half in (where.args, where.args[::-1]):
            found = taylor_of(one_plus, [Term("bias", node=half), *terms])
            if found is not None:
                return found
    if not terms or terms[0].kind != "bias" or terms[0].negate:
        return None
    nodes = [a for a in where.args if isinstance(a, Node)]
    if len(nodes) != 1 or [a for a in where.args if not isinstance(a, Node)] != [1] or len(where.args) != 2:
        return None
    s = nodes[0]
    if not _half_square_of(terms[0].node, s):
        return None
    inner = _plain_scale(s)
    return None if inner is None else (inner[0], terms[1:], inner[1])


def dot_product(node: Node) -> tuple[Product, bool] | None:
    """((a * b).sum(-1) as the product a . b over the last axis, keepdim) for a and b of one rank (a label
    names the same axis on both sides; fla's normalize_output spells q . cumsum(k) this way)."""
    if not is_call(node, aten.sum.dim_IntList) or not is_call(node.args[0], aten.mul.Tensor):
        return None
    a, b = node.args[0].args[:2]
    if not isinstance(a, Node) or not isinstance(b, Node) or val(a).dim() != val(b).dim():
        return None
    rank = val(a).dim()
    if [d % rank for d in node.args[1]] != [rank - 1] or val(a).shape != val(b).shape:
        return None
    labels = "ABCDEFGH"[:rank]
    keep = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim", False))
    return Product(node, a, b, labels, labels, labels[:-1]), keep
