"""One chunk of a chunk loop (`passes/linear_attention_chunks.py`), read: its intra-chunk quadratic product,
the inter-chunk product with the state it reads, the normaliser, and the update that hands the state on.

A chunk c covers rows s .. s + C of q, k, v, each a slice of one tensor computed before the loop:
    out_c = (q_c k_cᵀ ⊙ D) v_c + (q_c S) ⊙ ξ  [/ ((q_c k_cᵀ ⊙ D).sum(-1) + (q_c z) ⊙ ξ + eps)]
    S <- S ⊙ δ + k_cᵀ (v_c ⊙ ζ)               [z <- z ⊙ δ + Σ_rows k_c ⊙ ζ]
The decay factors ξ, δ, ζ are recorded here (constant node, the node it multiplies, that node's axes as
roles) and proven by the loop's analysis. What a chunk reads is a `Chunk`, or a sentence saying why not.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch.fx import Node

from fxfuse.passes.attention_layout import Operand, peel, read_product, val
from fxfuse.passes.attention_scores import constant_value, read_chain
from fxfuse.passes.buffer_values import buffer_seed, buffers_read
from fxfuse.passes.linear_attention import _roles
from fxfuse.passes.linear_attention_site import Roles, Weights, is_call
from fxfuse.passes.linear_attention_weights import read_weights, row_sum_of

aten = torch.ops.aten
_ZEROS = (aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default)
VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


@dataclass
class Chunk:
    """One chunk's reading: the intra product's roles (q, k, v being slices), weights, where it sits."""

    output: Node
    roles: Roles  # of the intra product, operands peeled to the slices
    weights: Weights
    scale: float  # of the intra product, number scales on its operands included
    span: tuple[int, int, int]  # (the sequence axis of q's source, first row, end row)
    sources: tuple[Node, Node, Node]
    state_in: Node | None  # the state the inter product reads (None: no inter term, a loop's first chunk)
    norm_in: Node | None  # the key-sum state the normaliser reads
    eps: float = 0.0
    state_roles: str = ""  # the state's axes as roles ("bhde")
    # decay factors found: name -> (constant node, the node it multiplies, that node's roles)
    factors: dict[str, tuple[Node, Node, str]] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.span[2] - self.span[1]


def slice_of(node: Node) -> tuple[Node, int, int, int] | None:
    """(source, dim, start, end) when `node` is source[..., start:end, ...] (a slice, a split's item, or
    chunk i of a view that splits the sequence axis into chunks)."""
    if is_call(node, aten.slice.Tensor) and (len(node.args) < 5 or node.args[4] == 1):
        src, dim = node.args[0], node.args[1] % val(node.args[0]).dim()
        start, end = (node.args[2] if len(node.args) > 2 else 0), (node.args[3] if len(node.args) > 3 else None)
        size = val(src).shape[dim]
        if not isinstance(start, int) or not isinstance(end, int | None):
            return None
        end = size if end is None else min(end, size)
        return (src, dim, start, end) if 0 <= start < end else None
    if is_call(node, aten.select.int) and is_call(node.args[0], *VIEWS) and isinstance(node.args[2], int):
        # x.view(..., N // C, C, ...)[..., i, :, ...]: rows i * C .. (i + 1) * C of x
        view, src = node.args[0], node.args[0].args[0]
        have, got = tuple(val(src).shape), tuple(val(view).shape)
        dim = node.args[1] % len(got)
        if len(got) != len(have) + 1 or got[:dim] + got[dim + 2 :] != have[:dim] + have[dim + 1 :]:
            return None
        if got[dim] * got[dim + 1] != have[dim] or not 0 <= node.args[2] < got[dim]:
            return None
        return src, dim, node.args[2] * got[dim + 1], (node.args[2] + 1) * got[dim + 1]
    if is_call(node, operator.getitem) and is_call(node.args[0], aten.split.Tensor):
        split = node.args[0]
        src, size = split.args[0], split.args[1]
        dim = (split.args[2] if len(split.args) > 2 else 0) % val(src).dim()
        start = node.args[1] * size
        return src, dim, start, min(start + size, val(src).shape[dim])
    return None


def known_value(node: Node) -> tuple[torch.Tensor | None, list[Node]]:
    """(the value of a node computed from constants and module buffers, the buffer placeholders it reads):
    MiniMax keeps its decay factors in buffers, sliced per chunk."""
    value = constant_value(node)
    if value is not None:
        return value, []
    seed = buffer_seed(node.graph.owning_module)
    value = constant_value(node, dict(seed)) if seed else None
    return value, ([] if value is None else buffers_read(node, seed))


def strip_factor(node: Node) -> tuple[Node, Node | None]:
    """x * c with c a constant tensor (a decay factor) -> (x, c); anything else -> (node, None)."""
    if is_call(node, aten.mul.Tensor) and all(isinstance(a, Node) for a in node.args):
        for x, c in (node.args, node.args[::-1]):
            if known_value(c)[0] is not None and known_value(x)[0] is None and val(x).shape == val(node).shape:
                return x, c
    return node, None


def _chunk_operand(node: Node, labels: str) -> tuple[Operand, Node | None]:
    """A product operand peeled to its slice (labels follow the axes) and the decay factor on it."""
    inner, factor = strip_factor(node)
    op = peel(Operand(inner, labels), "", allow_repeat=False)
    if factor is None:  # the factor under a transpose: (k_c * ζ).transpose(-1, -2) (MiniMax)
        inner, factor = strip_factor(op.node)
        if factor is not None:
            under = peel(Operand(inner, op.labels), "", allow_repeat=False)
            return Operand(under.node, under.labels, op.scale * under.scale), factor
    return op, factor


def _intra(node: Node) -> tuple[Roles, Weights, Node] | str | None:
    """(roles, weights, scores) when `node` is (q kᵀ [⊙ mask]) @ v, why not when it is a near miss."""
    pv = read_product(node)
    if pv is None or pv.bias is not None or pv.alpha != 1.0:
        return None
    for which, w_node in (("a", pv.a), ("b", pv.b)):
        where, terms = read_chain(w_node)
        ps = read_product(where)
        if ps is None or ps.bias is not None or ps.alpha != 1.0:
            continue
        roles = _roles(ps, pv, which)
        if isinstance(roles, str):
            continue
        weights = read_weights(terms, roles.scores_labels, roles.sizes.get("h", 1))
        if isinstance(weights, str):
            return f"the intra-chunk scores: {weights}"
        if not weights.causal and roles.sizes["n"] == 1 == roles.sizes["m"]:
            weights.causal = True  # a one-row chunk (the last of a ragged loop) is causal, its mask folded away
        if not weights.causal:
            return "the intra-chunk scores are not causally masked: not a causal chunk loop"
        return roles, weights, w_node
    return None


def _role_map(op: Operand, roles: str) -> dict[str, str]:
    """Product letters of a peeled operand -> the roles of its node's axes."""
    return dict(zip(op.labels, roles))


def read_chunk(out: Node) -> Chunk | str | None:
    """One chunk's output as intra + inter [/ normaliser], None when it has no intra product at all."""
    num, den = out, None
    if is_call(out, aten.div.Tensor) and isinstance(out.args[1], Node):
        num, den = out.args
    found, inter = None, None
    if is_call(num, aten.add.Tensor) and len(num.args) == 2 and num.kwargs.get("alpha", 1) == 1:
        for intra, other in (num.args, num.args[::-1]):
            found = _intra(intra) if isinstance(intra, Node) else None
            if found is not None:
                inter = other
                break
    if found is None:
        found = _intra(num)  # no inter-chunk term: the first chunk of a loop whose state starts as None
        if found is None:
            return None
    if isinstance(found, str):
        return found
    roles, weights, scores = found
    peeled, slices = [], []
    for op in (roles.q, roles.k, roles.v):
        p = peel(op, "h" if "h" in roles.batch else "", allow_repeat=False)
        s = slice_of(p.node)
        if s is None:
            return "the chunk's q, k or v is not a slice of a tensor computed before the loop"
        peeled.append(p)
        slices.append(s)
    seq = [p.labels.index(r) for p, r in zip(peeled, "nmm")]
    if any(s[1] != d for s, d in zip(slices, seq)) or len({s[2:] for s in slices}) != 1:
        return "q, k and v are not sliced along their sequence axis at the same rows"
    if any(val(s[0]).shape[s[1]] != val(slices[0][0]).shape[slices[0][1]] for s in slices):
        return "q, k and v have different sequence lengths"
    scale = weights.scale * peeled[0].scale * peeled[1].scale * peeled[2].scale
    roles = Roles(roles.batch, roles.sizes, *peeled, roles.out_labels, roles.scores_labels)
    chunk = Chunk(out, roles, weights, scale, (seq[0], *slices[0][2:]), tuple(s[0] for s in slices), None, None)
    problem = None if inter is None else _read_inter(chunk, inter)
    if problem is None and den is not None:
        problem = _read_normaliser(chunk, den, scores)
    return problem or chunk


def _read_inter(chunk: Chunk, inter: Node) -> str | None:
    """inter = (q_c S) [⊙ ξ] or (q_c ⊙ ξ) S: records the state S read and ξ."""
    inter, after = strip_factor(inter) if isinstance(inter, Node) else (inter, None)
    p = read_product(inter) if isinstance(inter, Node) else None
    if p is None:
        return "the chunk output adds something that is not a product of q with a carried state"
    sides = [(la, a, lb, b) for la, a, lb, b in ((p.a_labels, p.a, p.b_labels, p.b), (p.b_labels, p.b, p.a_labels, p.a))
             if slice_of(_chunk_operand(a, la)[0].node) == slice_of(chunk.roles.q.node)]  # fmt: skip
    if not sides:
        return "the inter-chunk product does not read the chunk's q"
    ql, qn, sl, sn = sides[0]
    q, before = _chunk_operand(qn, ql)
    if after is not None and before is not None:
        return "the inter-chunk product is scaled twice"
    role = _role_map(q, chunk.roles.q.labels)
    contracted = [c for c in ql if c in sl and c not in p.out_labels]
    if [role.get(c) for c in contracted] != ["d"]:
        return "the inter-chunk product does not contract q's feature axis with the state"
    extra = [c for c in sl if c not in role]
    if len(extra) != 1 or "".join(role.get(c, "e") for c in p.out_labels) != chunk.roles.out_labels:
        return "the inter-chunk product q S is not laid out as the intra-chunk output"
    state = peel(Operand(sn, sl), "", allow_repeat=False)
    chunk.state_in = state.node
    if after is not None:
        chunk.factors["ξ"] = (after, inter, chunk.roles.out_labels)
    elif before is not None:
        chunk.factors["ξ"] = (before, q.node, chunk.roles.q.labels)
    chunk.state_roles = "".join(role.get(c, "e") for c in state.labels)
    if q.scale != 1.0 or state.scale != 1.0:
        return "the inter-chunk product is scaled by a number (not matched)"
    return None


def _read_normaliser(chunk: Chunk, den: Node, scores: Node) -> str | None:
    """den = rowsum(intra scores) + (q_c z)[ ⊙ ξ] [+ eps]: records the key-sum state z read."""
    eps = 0.0
    if is_call(den, aten.add.Tensor) and isinstance(den.args[1], int | float):
        den, eps = den.args[0], float(den.args[1])
    if not is_call(den, aten.add.Tensor) or not all(isinstance(a, Node) for a in den.args):
        return "the normaliser is not the intra row sum plus q times a key-sum state"
    sums = [(row_sum_of(rows, scores), inter) for rows, inter in (den.args, den.args[::-1])]
    sums = [(found, inter) for found, inter in sums if isinstance(found, tuple)]
    if not sums:
        return "the normaliser is not the intra row sum plus q times a key-sum state"
    found, inter = sums[0]
    if found[0] != "eps":
        return "the normaliser is clamped, which does not split across chunks"
    inter, after = strip_factor(inter)
    p = read_product(inter)
    sides = [] if p is None else [(la, a, b) for la, a, b in ((p.a_labels, p.a, p.b), (p.b_labels, p.b, p.a))
                                  if slice_of(_chunk_operand(a, la)[0].node) == slice_of(chunk.roles.q.node)]
    if not sides:
        return "the normaliser's inter-chunk term is not q times a key-sum state"
    ql, qn, zn = sides[0]
    q, before = _chunk_operand(qn, ql)
    if after is not None and before is not None or q.scale != 1.0:
        return "the normaliser's inter-chunk term is scaled twice"
    if is_call(zn, aten.unsqueeze.default):
        zn = zn.args[0]
    chunk.norm_in, chunk.eps = zn, eps + found[1]
    if after is not None:
        chunk.factors["ξ of the normaliser"] = (after, inter, chunk.roles.out_labels)
    elif before is not None:
        chunk.factors["ξ of the normaliser"] = (before, q.node, chunk.roles.q.labels)
    return None


def is_zero_state(node: Node) -> bool:
    if is_call(node, *_ZEROS):
        return True
    value = constant_value(node)
    return value is not None and not bool(value.any())


def _decayed(node: Node, state: Node) -> tuple[Node, Node | None] | None:
    """(state, δ) when `node` is the state itself (δ None) or state * δ with δ a constant (the state may be a
    constant itself: the zeros a loop starts from, as MiniMax's lightning attention does)."""
    if node is state:
        return state, None
    if is_call(node, aten.mul.Tensor) and len(node.args) == 2 and state in node.args:
        delta = node.args[1] if node.args[0] is state else node.args[0]
        if isinstance(delta, Node) and known_value(delta)[0] is not None and val(node).shape == val(state).shape:
            return state, delta
    return None


def read_update(node: Node, prev: Chunk, key_sum: bool) -> tuple[Node, dict[str, tuple]] | str:
    """node = S [⊙ δ] + kᵀ (v ⊙ ζ) (key_sum: z [⊙ δ] + Σ_rows k ⊙ ζ) of chunk `prev`: (S, factors)."""
    what = "key-sum state" if key_sum else "state"
    want_state = prev.norm_in if key_sum else prev.state_in
    old, delta, added = None, None, node  # no state before `prev`: the state is its contribution alone
    if want_state is not None:
        if not is_call(node, aten.add.Tensor) or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
            return f"the {what} is not updated by adding the chunk's contribution (reset, or another recurrence)"
        carried = [(a, b) for a, b in (node.args, node.args[::-1]) if isinstance(a, Node) and isinstance(b, Node)
                   and _decayed(a, want_state) is not None]  # fmt: skip
        if not carried:
            return f"the {what} is not carried from one chunk to the next (reset each chunk?)"
        (old, delta), added = _decayed(carried[0][0], want_state), carried[0][1]
    factors = {}
    k_slice, v_slice = (slice_of(prev.roles.k.node), slice_of(prev.roles.v.node))
    if key_sum:
        roles = ""
        if is_call(added, aten.unsqueeze.default):
            added, roles = added.args[0], "_"  # z kept as [B, H, D, 1]
        keep = len(added.args) > 2 and added.args[2]
        if not is_call(added, aten.sum.dim_IntList) or keep:
            return "the key-sum state does not add the chunk's keys summed over its rows"
        k, zeta = _chunk_operand(added.args[0], prev.roles.k.labels)
        if slice_of(k.node) != k_slice or [d % len(k.labels) for d in added.args[1]] != [k.labels.index("m")]:
            return "the key-sum state does not add the chunk's keys summed over its rows"
        if zeta is not None:
            factors["ζ of the key sum"] = (zeta, k.node, k.labels)
        if delta is not None:
            factors["δ of the key sum"] = (delta, old, k.labels.replace("m", "") + roles)
        return old, factors
    p = read_product(added)
    if p is None:
        return "the state update adds something that is not a product kᵀv"
    for (kl, kn), (vl, vn) in (((p.a_labels, p.a), (p.b_labels, p.b)), ((p.b_labels, p.b), (p.a_labels, p.a))):
        k, zk = _chunk_operand(kn, kl)
        v, zv = _chunk_operand(vn, vl)
        if slice_of(k.node) == k_slice and slice_of(v.node) == v_slice:
            break
    else:
        return "the state update is not kᵀv of the chunk's keys and values"
    role = _role_map(k, prev.roles.k.labels) | _role_map(v, prev.roles.v.labels)
    contracted = [c for c in kl if c in vl and c not in p.out_labels]
    layout = "".join(role.get(c, "?") for c in p.out_labels)
    if [role.get(c) for c in contracted] != ["m"] or layout != prev.state_roles:
        return "the state update kᵀv does not sum over the chunk's rows into the state's layout"
    if k.scale * v.scale != 1.0:
        return "the state update is scaled by a number (not matched)"
    if zk is not None and zv is not None:
        return "the state update multiplies both k and v by a factor"
    if delta is not None:
        factors["δ"] = (delta, old, prev.state_roles)
    if zk is not None or zv is not None:
        factors["ζ"] = (zk, k.node, prev.roles.k.labels) if zk is not None else (zv, v.node, prev.roles.v.labels)
    return old, factors


def final_update(last: Chunk) -> tuple[Node, dict] | None:
    """(the state after the last chunk, its update's factors) when the graph computes it (something after
    the loop reads it), else None."""
    if last.state_in is None:
        return None
    near = list(last.state_in.users)
    for node in near + [v for u in near if is_call(u, aten.mul.Tensor) for v in u.users]:
        found = read_update(node, last, False) if is_call(node, aten.add.Tensor) else None
        if isinstance(found, tuple):
            return node, found[1]
    return None
