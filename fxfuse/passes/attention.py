"""Softmax attention: one semantic matcher for every spelling, emitting `fxfuse::attention`.

A rule in `ANCHORS` finds a normalization (softmax, a hand-written exp/sum, relu(s)**2); from there the
matcher walks forward to the value product p @ v and backward through the score terms
(`attention_scores`) to the score product q @ k^T, reads both products as labelled contractions
(`attention_layout`), and derives q, k, v in [B, H, N, D], the scale, bias, masks, causality, GQA
groups and segment ids. Each site is tried twice: specialized (constant masks evaluated, causal and
varlen recognized) and, when that cannot be applied, generic (masks passed as tensors).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from fxfuse.passes.attention_emit import build_site
from fxfuse.passes.attention_layout import Operand, Product, _peel_permute, _peel_transpose, read_product, val
from fxfuse.passes.attention_scores import (
    _MASK_FLOOR,
    BATCH_VIEWS,
    CHAIN_OPS,
    Term,
    normalize,
    read_chain,
    same_rows,
    zeroing,
)
from fxfuse.passes.site import Rejection, Site

aten = torch.ops.aten
_PROB_PASSTHROUGH = (aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.clone.default,
                     aten.contiguous.default, aten.dropout.default)  # fmt: skip


@dataclass
class Anchor:
    node: Node  # names the site
    scores: Node  # the normalization's input
    probs: Node  # the normalization's output
    dim: int | None  # normalized axis counted from the end, -1 = last (None: the value product decides)
    score_fn: str  # "softmax" | "relu2"
    problem: str | None = None  # why this normalization cannot be fused, if it is attention


def _dim(x: Node, d: int) -> int:
    rank = val(x).dim()
    return d % rank - rank


def _anchor_softmax(n: Node) -> Anchor | None:
    # softmax(s, dim) / _softmax(s, dim, half_to_float) -> softmax over dim
    if n.target in (aten.softmax.int, aten._softmax.default):
        return Anchor(n, n.args[0], n, _dim(n.args[0], n.args[1]), "softmax")
    if n.target is aten._safe_softmax.default:
        why = "_safe_softmax gives 0, not NaN, on fully masked rows"
        return Anchor(n, n.args[0], n, _dim(n.args[0], n.args[1]), "softmax", why)
    return None


def _anchor_exp_normalized(n: Node) -> Anchor | None:
    # e / e.sum(dim, keepdim=True), e = exp(s - s.amax(dim, keepdim=True)) -> softmax written by hand
    if n.target is not aten.div.Tensor or not all(isinstance(a, Node) for a in n.args):
        return None
    e, total = n.args
    if e.target is not aten.exp.default or total.target is not aten.sum.dim_IntList or total.args[0] is not e:
        return None
    if len(total.args[1] or ()) != 1 or not (total.args[2] if len(total.args) > 2 else total.kwargs.get("keepdim")):
        return None
    dim = _dim(e, total.args[1][0])
    sub = e.args[0]
    # the max must keep its axis: without keepdim it broadcasts against another axis of s (when the sizes
    # happen to line up), and the subtrahend is no longer a per-row constant that softmax cancels
    keep = lambda m: bool(m.args[2] if len(m.args) > 2 else m.kwargs.get("keepdim", False))
    if sub.target is aten.sub.Tensor and isinstance(sub.args[1], Node):
        x, peak = sub.args
        top = peak.args[0] if peak.target is operator.getitem and peak.args[1] == 0 else None  # x.max(dim).values
        if peak.target is aten.amax.default and peak.args[0] is x and [_dim(x, d) for d in peak.args[1]] == [dim]:
            top = peak
        elif top is None or top.target is not aten.max.dim or top.args[0] is not x or _dim(x, top.args[1]) != dim:
            top = None
        if top is not None:
            why = None if keep(top) else "the row max is taken without keepdim: it is subtracted along another axis"
            return Anchor(n, x, n, dim, "softmax", why)
    why = "exp(s) / sum without subtracting the row max overflows where softmax does not"
    return Anchor(n, sub, n, dim, "softmax", why)


def _anchor_relu2(n: Node) -> Anchor | None:
    # relu(s) ** 2, relu(s) * relu(s) -> squared-relu attention (gated attention units)
    if n.target is aten.pow.Tensor_Scalar and n.args[1] == 2:
        r = n.args[0]
    elif n.target is aten.mul.Tensor and n.args[0] is n.args[1]:
        r = n.args[0]
    elif n.target is aten.square.default:
        r = n.args[0]
    else:
        return None
    if not isinstance(r, Node) or r.target is not aten.relu.default:
        return None
    return Anchor(n, r.args[0], n, None, "relu2")


ANCHORS = (_anchor_softmax, _anchor_exp_normalized, _anchor_relu2)


def _value_product(anchor: Anchor) -> tuple[Product, float, list[Term]] | str | None:
    """(p @ v product, dropout_p, zeroings) after the normalization, a reason, or None when nothing
    attention-like follows (a classifier's softmax). Casts and dropout may sit in between, and after a
    pointwise score function (relu²) masks that zero probabilities (causal relu² attention)."""
    p, dropout, zeros = anchor.probs, 0.0, []
    while len(p.users) == 1:
        nxt = next(iter(p.users))
        zero = zeroing(nxt, p) if anchor.score_fn == "relu2" and not dropout else None
        if zero is not None:
            zero.batch = tuple(int(d) for d in val(nxt).shape[:-2])
            zeros.append(zero)
            p = nxt
            continue
        if nxt.target not in _PROB_PASSTHROUGH and not (nxt.target in BATCH_VIEWS and same_rows(nxt, p)):
            break
        if nxt.target is aten.dropout.default:
            train = nxt.args[2] if len(nxt.args) > 2 else nxt.kwargs.get("train", True)
            dropout = float(nxt.args[1]) if train else dropout
        p = nxt
    users = list(p.users)
    products = [pr for u in users if (pr := _probs_product(p, u)) is not None]
    if products and len(users) > 1:
        other = next(u for u in users if u is not products[0].node and u not in products[0].node.args)
        return f"the attention probabilities are also used by {other.name} (returned, stored or reduced)"
    if products:
        return products[0], dropout, zeros
    near = [w for u in users for w in u.users if read_product(w) is not None]
    if near:
        why = "a mask, weight or transpose after the softmax"
        return f"the probabilities go through {users[0].target} before the value product ({why})"
    return None


def _probs_product(p: Node, user: Node) -> Product | None:
    """`user` as the value product with the probabilities `p` as its first operand, or None. `p` may be
    either operand of a matmul/einsum and reach it through one transpose or permute (Ultralytics' PSA
    computes v @ p.transpose(-2, -1)): an einsum does not care about operand order, and a transpose only
    relabels p's axes. Whether the result really is p @ v over the key axis is `_roles`' question."""
    hop = None
    if user.target in (aten.transpose.int, aten.permute.default) and len(user.users) == 1:
        hop, user = user, next(iter(user.users))
    pr = read_product(user)
    if pr is None or pr.bias is not None or pr.alpha != 1.0:
        return None
    operand = hop or p
    if (pr.a is operand) == (pr.b is operand):
        return None  # p is not an operand, or both (p @ p)
    a_labels, b, b_labels = (pr.a_labels, pr.b, pr.b_labels) if pr.a is operand else (pr.b_labels, pr.a, pr.a_labels)
    if hop is not None:
        unpeel = _peel_transpose if hop.target is aten.transpose.int else _peel_permute
        a_labels = unpeel(Operand(hop, a_labels), "").labels
    return Product(user, p, b, a_labels, b_labels, pr.out_labels)


def match(anchor: Anchor, backend: str) -> Site | Rejection | None:
    """The attention site at `anchor`, a Rejection that says why not, or None if it is not attention."""
    found = _value_product(anchor)
    if found is None:
        return None
    reject = lambda why: Rejection("attention", anchor.score_fn, anchor.node, why)
    if isinstance(found, str):
        return reject(found)
    pv, dropout_p, zeros = found
    if anchor.problem:
        return reject(anchor.problem)
    where, terms = read_chain(anchor.scores)
    terms += zeros
    why = _shift_problem(anchor, terms)
    if why:
        return reject(why)
    ps = read_product(where)
    if ps is None:
        return reject(_blocker(where))
    roles = _roles(anchor, ps, pv)
    if isinstance(roles, str):
        return reject(_mixed_scores(ps) or roles)
    first = None
    # causal and segment-id reading take a constant mask's last two axes as [N, M]: scores laid out
    # otherwise (k @ q^T with a softmax over dim=-2) fuse with their masks as tensors only
    for specialize in (True, False) if roles.scores_labels.endswith("nm") else (False,):
        scores = normalize(terms, specialize, roles.bh)
        if isinstance(scores, str):
            first = first or scores
            continue
        site = build_site(anchor.node, pv.node, roles, scores, anchor.score_fn, dropout_p, backend)
        why = site if isinstance(site, str) else _escapes(site)
        if why is None:
            return site
        first = first or why
    return reject(first)


def _shift_problem(anchor: Anchor, terms: list) -> str | None:
    """Why a row-max subtraction among the score terms is not a no-op, or None. Softmax over the same
    axis cancels any per-row constant; scales, biases and -inf / finfo.min masks applied after it keep it
    a per-row constant, but a mask filling a moderate value (0, -1e4) sets masked scores relative to the
    shifted row, so dropping the shift would change them."""
    shifts = [i for i, t in enumerate(terms) if t.kind == "shift"]
    if not shifts:
        return None
    if anchor.score_fn != "softmax" or anchor.dim != -1:
        return "the scores subtract their row maximum before a normalization that is not a softmax over it"
    later = terms[shifts[0] + 1 :]
    if any(t.kind == "mask" and t.value > _MASK_FLOOR for t in later):
        return "a mask with a moderate fill value follows the row-max subtraction; dropping it would change the scores"
    return None


def _mixed_scores(ps: Product) -> str | None:
    """Why the product next to the softmax is not q @ k^T when an operand of it is itself a score matrix from
    a product (talking heads: the scores mixed across heads by an [H, H] weight), or None."""
    if any(same_rows(x, ps.node) and read_product(read_chain(x)[0]) is not None for x in (ps.a, ps.b)):
        return "the scores are mixed by a second product before the softmax (talking heads); heads stay apart in the op"
    return None


def _blocker(where: Node) -> str:
    """Why the walk from the softmax down to q @ k^T stopped at `where`: the first op on the way to a
    product that no score rule reads (soft-capping's tanh, a gather, ...)."""
    if where.op != "call_function":
        return f"the scores come from {where.name}, not from a q @ k^T product"
    if sum(read_product(a) is not None for a in where.all_input_nodes) > 1:
        return f"the scores combine two products through {where.target}: ambiguous which one is q @ k^T"
    parent, queue = {where: None}, [where]
    while queue and len(parent) < 64:
        node = queue.pop(0)
        if read_product(node) is not None:
            path = []
            while node is not None:
                path.append(node)
                node = parent[node]
            odd = [n for n in reversed(path[1:]) if n.target not in CHAIN_OPS]
            culprit = odd[0].target if odd else where.target
            return f"the scores go through {culprit} on the way to q @ k^T; the fused op cannot express that"
        for a in node.all_input_nodes:
            if a not in parent and a.op == "call_function":
                parent[a], queue = node, [*queue, a]
    return f"the scores come from {where.target}, not from a q @ k^T product"


@dataclass
class Roles:
    """Every axis named: batch (order of the scores), n, m, d, e; operands before their layout steps."""

    batch: str
    sizes: dict[str, int]
    q: Operand
    k: Operand
    v: Operand
    out_labels: str  # the value product's output axes, as roles
    scores_labels: str  # the score product's output axes, as roles

    @property
    def bh(self) -> tuple[int, ...]:
        return tuple(self.sizes[b] for b in self.batch)


def _roles(anchor: Anchor, ps: Product, pv: Product) -> Roles | str:
    contracted = [c for c in pv.a_labels if c in pv.b_labels and c not in pv.out_labels]
    if len(contracted) != 1:
        return "the value product is not p @ v over one key axis"
    if val(pv.a).shape != val(ps.node).shape:
        return "the probabilities reach p @ v in another layout than the scores had"
    key_axis = pv.a_labels.index(contracted[0]) - len(pv.a_labels)
    if anchor.dim is not None and anchor.dim != key_axis:
        return f"the softmax runs over axis {anchor.dim}, but p @ v contracts axis {key_axis} (not the key axis)"
    m = ps.out_labels[key_axis]
    dims = [c for c in ps.a_labels if c in ps.b_labels and c not in ps.out_labels]
    if len(dims) != 1 or (m in ps.a_labels) == (m in ps.b_labels):
        return "the score product is not q @ k^T over one head dim"
    (ql, qn), (kl, kn) = ((ps.a_labels, ps.a), (ps.b_labels, ps.b))[:: 1 if m in ps.b_labels else -1]
    ns = [c for c in ps.out_labels if c in ql and c not in kl and c != m]
    if len(ns) != 1:
        return "the score product has no single query axis"
    batch = "".join(c for c in ps.out_labels if c not in (m, ns[0]))
    if len(batch) > 2 or any(c not in ql for c in batch) or set(ql) - set(batch + ns[0] + dims[0]):
        return "the query operand does not fit [batch, heads, N, D]"
    if set(kl) - set(batch + m + dims[0]):
        return "the key operand does not fit [batch, heads, N, D]"
    canon = dict(zip(batch, "bh"[2 - len(batch) :]), **{ns[0]: "n", m: "m", dims[0]: "d"})
    to_role = {pv.a_labels[i]: canon[c] for i, c in enumerate(ps.out_labels)}
    extra = [c for c in pv.b_labels if c not in to_role]
    if len(extra) != 1 or any(c not in pv.b_labels for c in pv.out_labels if c not in to_role):
        return "the value operand does not fit [batch, heads, N, Dv]"
    to_role[extra[0]] = "e"
    out_labels = "".join(to_role.get(c, "?") for c in pv.out_labels)
    batch_roles = "".join(canon[c] for c in batch)
    if sorted(out_labels) != sorted(batch_roles + "ne") or "m" not in (vl := "".join(to_role[c] for c in pv.b_labels)):
        return "the value product's output is not [batch, heads, N, Dv]"
    sizes = {canon[c]: int(s) for c, s in zip(ps.out_labels, val(ps.node).shape)}
    sizes["d"] = int(val(qn).shape[ql.index(dims[0])])
    sizes["e"] = int(val(pv.b).shape[pv.b_labels.index(extra[0])])
    q = Operand(qn, "".join(canon[c] for c in ql))
    k = Operand(kn, "".join(canon[c] for c in kl))
    return Roles(batch_roles, sizes, q, k, Operand(pv.b, vl), out_labels, "".join(canon[c] for c in ps.out_labels))


def _escapes(site: Site) -> str | None:
    """Why the driver would refuse the site's region (an intermediate used outside it), or None."""
    from fxfuse.passes.rewrite import region_of

    region = region_of(site)
    return region if isinstance(region, str) else None


def find_attention(gm: GraphModule, backend: str = "auto") -> list[Site | Rejection]:
    """Every softmax/relu² attention in `gm` (canonicalized ATen graph): a Site, or why it was left alone."""
    results: list[Site | Rejection] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or val(node) is None:
            continue
        for rule in ANCHORS:
            anchor = rule(node)
            if anchor is not None:
                try:
                    hit = match(anchor, backend)
                except Exception as exc:  # one odd site must not cost the model its other sites
                    hit = Rejection("attention", anchor.score_fn, node, f"matcher error ({type(exc).__name__}: {exc})")
                if hit is not None:
                    results.append(hit)
                break
    return results
