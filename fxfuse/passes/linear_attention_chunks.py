"""Causal linear attention written as a Python loop over chunks, unrolled by capture, re-rolled into one op.

Research code spells chunkwise linear attention / retention as (chunk c = rows s .. s + C of q, k, v):
    out_c = (q_c k_cᵀ ⊙ D) v_c + (q_c S) ⊙ ξ          S <- δ S + kᵀ_c (v_c ⊙ ζ)        -> cat(out_c, seq)
and, normalised, out_c = (...) / ((q_c k_cᵀ ⊙ D).sum(-1) + q_c z + eps) with z <- δ z + Σ_rows k_c ⊙ ζ.
D is the constant causal mask (tril, or gamma^(i - j) on and below the diagonal); without decay ξ, δ, ζ
are absent, with decay they are the constants gamma^(r + 1), gamma^C and gamma^(C - 1 - r) that make the
loop equal to causal linear attention with decay gamma over the whole sequence. The rules:
- the anchor concatenates >= 3 per-chunk outputs along the sequence axis;
- every chunk is read on its own: the intra-chunk quadratic product (the linear-attention family's
  score reading: scale, causal mask, decay), the inter-chunk product with the state it reads, the state
  update with its keys and values, the normaliser; each one's q, k, v are consecutive slices of the same
  three tensors, chunk 0 reads a zero state, chunk i the state chunk i - 1 left;
- the full-size chunk bodies are structurally isomorphic up to the chunk index (`passes/reroll.py`'s
  template); the last chunk may be shorter;
- decay factors are proven by evaluating the constants against the intra mask's gammas.
Left alone, with the reason: a state update that is not kᵀv of the chunk, a non-causal intra mask, a state
reset or not carried, bodies that differ, a final state read after the loop, factors that do not match.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
from torch.fx import Graph, GraphModule, Node

from fxfuse.passes.attention_layout import Operand, peel, read_product, val
from fxfuse.passes.attention_scores import constant_value, read_chain
from fxfuse.passes.linear_attention import _roles, _row_sum_of, read_weights
from fxfuse.passes.linear_attention_site import PATTERN, Roles, Weights, build_site, is_call
from fxfuse.passes.reroll import NotALoop, _check_step, _template, per_step_outputs
from fxfuse.passes.site import Rejection, Site

aten = torch.ops.aten
_ZEROS = (aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default)
_RTOL = 1e-5  # decay factors built in float32 differ from gamma^p by rounding only


class NotAChunkLoop(Exception):
    """The candidate is a chunk loop the fused op cannot take; the message says why."""


@dataclass
class Chunk:
    """One chunk's reading: the intra product's roles (q, k, v being slices), weights, where it sits."""

    output: Node
    roles: Roles  # of the intra product, operands peeled to the slices
    weights: Weights
    scale: float  # of the intra product, number scales on its operands included
    span: tuple[Node, int, int]  # (sources' sequence axis position in q, start, end)
    sources: tuple[Node, Node, Node]
    state_in: Node  # the state the inter product reads
    norm_in: Node | None  # the key-sum state the normaliser reads
    eps: float = 0.0
    state_roles: str = ""  # the state's axes as roles ("bhde")
    # decay factors found: name -> (constant node, the node it multiplies, that node's roles)
    factors: dict[str, tuple[Node, Node, str]] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.span[2] - self.span[1]


def _slice_of(node: Node) -> tuple[Node, int, int, int] | None:
    """(source, dim, start, end) when `node` is source[..., start:end, ...] (a slice or a split's item)."""
    if is_call(node, aten.slice.Tensor) and (len(node.args) < 5 or node.args[4] == 1):
        src, dim = node.args[0], node.args[1] % val(node.args[0]).dim()
        start, end = (node.args[2] if len(node.args) > 2 else 0), (node.args[3] if len(node.args) > 3 else None)
        size = val(src).shape[dim]
        if not isinstance(start, int) or not isinstance(end, int | None):
            return None
        end = size if end is None else min(end, size)
        return (src, dim, start, end) if 0 <= start < end else None
    if is_call(node, operator.getitem) and is_call(node.args[0], aten.split.Tensor):
        split = node.args[0]
        src, size = split.args[0], split.args[1]
        dim = (split.args[2] if len(split.args) > 2 else 0) % val(src).dim()
        start = node.args[1] * size
        return src, dim, start, min(start + size, val(src).shape[dim])
    return None


def _strip_factor(node: Node) -> tuple[Node, Node | None]:
    """x * c with c a constant tensor (a decay factor) -> (x, c); anything else -> (node, None)."""
    if is_call(node, aten.mul.Tensor) and all(isinstance(a, Node) for a in node.args):
        for x, c in (node.args, node.args[::-1]):
            if constant_value(c) is not None and constant_value(x) is None and val(x).shape == val(node).shape:
                return x, c
    return node, None


def _chunk_operand(node: Node, labels: str) -> tuple[Operand, Node | None]:
    """A product operand peeled to its slice (labels follow the axes) and the decay factor on it."""
    inner, factor = _strip_factor(node)
    op = peel(Operand(inner, labels), "", allow_repeat=False)
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


def _read_chunk(out: Node) -> Chunk | str | None:
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
        s = _slice_of(p.node)
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
    inter, after = _strip_factor(inter)
    p = read_product(inter)
    if p is None:
        return "the chunk output adds something that is not a product of q with a carried state"
    sides = [(la, a, lb, b) for la, a, lb, b in ((p.a_labels, p.a, p.b_labels, p.b), (p.b_labels, p.b, p.a_labels, p.a))
             if _slice_of(_chunk_operand(a, la)[0].node) == _slice_of(chunk.roles.q.node)]  # fmt: skip
    if not sides:
        return "the inter-chunk product does not read the chunk's q"
    ql, qn, sl, sn = sides[0]
    q, before = _chunk_operand(qn, ql)
    if (after is None) == (before is None) and after is not None:
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
    sums = [(_row_sum_of(rows, scores), inter) for rows, inter in (den.args, den.args[::-1])]
    sums = [(found, inter) for found, inter in sums if isinstance(found, tuple)]
    if not sums:
        return "the normaliser is not the intra row sum plus q times a key-sum state"
    found, inter = sums[0]
    if found[0] != "eps":
        return "the normaliser is clamped, which does not split across chunks"
    inter, after = _strip_factor(inter)
    p = read_product(inter)
    if p is None or chunk.roles.q.node not in (_chunk_operand(p.a, "")[0].node, _chunk_operand(p.b, "")[0].node):
        return "the normaliser's inter-chunk term is not q times a key-sum state"
    zn = p.b if _chunk_operand(p.a, "")[0].node is chunk.roles.q.node else p.a
    if is_call(zn, aten.unsqueeze.default):
        zn = zn.args[0]
    chunk.norm_in, chunk.eps = zn, eps + found[1]
    if after is not None:
        chunk.factors["ξ of the normaliser"] = (after, inter, chunk.roles.out_labels)
    return None


def _expected(gamma: torch.Tensor, node: Node, roles: str, axis: str | None, power) -> torch.Tensor:
    """gamma_h^power(position along `axis`) laid out on `node`'s axes (roles, e.g. "bhnd")."""
    shape = [1] * len(roles)
    if "h" in roles and gamma.numel() > 1:
        shape[roles.index("h")] = gamma.numel()
    g = gamma.view(shape)
    if axis is None:
        return g**power
    n = val(node).shape[roles.index(axis)]
    pos_shape = [1] * len(roles)
    pos_shape[roles.index(axis)] = n
    return g ** power(torch.arange(n, dtype=torch.float64).view(pos_shape), n)


def _factor_holds(factor: Node | None, node: Node, roles: str, want: torch.Tensor | None) -> bool:
    """Whether the constant `factor` multiplying `node` is `want` (None: no factor, or all ones)."""
    if factor is None:
        return want is None or bool(torch.allclose(want, torch.ones(()), rtol=0, atol=0))
    value = constant_value(factor).double()
    target = tuple(val(node).shape)
    try:
        got = torch.broadcast_to(value, target)
        exp = torch.broadcast_to(torch.ones(()) if want is None else want, target)
    except RuntimeError:
        return False
    return bool(torch.isclose(got, exp, rtol=_RTOL, atol=1e-30).all())


def _is_zero_state(node: Node) -> bool:
    if is_call(node, *_ZEROS):
        return True
    value = constant_value(node)
    return value is not None and not bool(value.any())


def _read_update(node: Node, prev: Chunk, key_sum: bool) -> tuple[Node, dict[str, tuple]] | str:
    """node = S [⊙ δ] + kᵀ (v ⊙ ζ) (key_sum: z [⊙ δ] + Σ_rows k ⊙ ζ) of chunk `prev`: (S, factors)."""
    what = "key-sum state" if key_sum else "state"
    want_state = prev.norm_in if key_sum else prev.state_in
    old, delta, added = None, None, node  # no state before `prev`: the state is its contribution alone
    if want_state is not None:
        if not is_call(node, aten.add.Tensor) or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
            return f"the {what} is not updated by adding the chunk's contribution (reset, or another recurrence)"
        carried = [(a, b) for a, b in (node.args, node.args[::-1]) if isinstance(a, Node) and isinstance(b, Node)
                   and _strip_factor(a)[0] is want_state]  # fmt: skip
        if not carried:
            return f"the {what} is not carried from one chunk to the next (reset each chunk?)"
        (old, delta), added = _strip_factor(carried[0][0]), carried[0][1]
    factors = {}
    k_slice, v_slice = (_slice_of(prev.roles.k.node), _slice_of(prev.roles.v.node))
    if key_sum:
        roles = ""
        if is_call(added, aten.unsqueeze.default):
            added, roles = added.args[0], "_"  # z kept as [B, H, D, 1]
        keep = len(added.args) > 2 and added.args[2]
        if not is_call(added, aten.sum.dim_IntList) or keep:
            return "the key-sum state does not add the chunk's keys summed over its rows"
        k, zeta = _chunk_operand(added.args[0], prev.roles.k.labels)
        if _slice_of(k.node) != k_slice or [d % len(k.labels) for d in added.args[1]] != [k.labels.index("m")]:
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
        if _slice_of(k.node) == k_slice and _slice_of(v.node) == v_slice:
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


def _check_decay(chunks: list[Chunk], updates: list[dict], gamma: torch.Tensor | None) -> str | None:
    """Every decay factor is what causal decay gamma over the whole sequence needs, and none is missing:
    ξ = gamma^(r + 1) on the inter rows, δ = gamma^C on the carried state, ζ = gamma^(C - 1 - r) on the
    rows added to it (chunk i's factors and those of the update that adds chunk i)."""
    rows = {"ξ": ("n", lambda r, n: r + 1), "ζ": ("m", lambda r, n: n - 1 - r), "δ": (None, None)}
    normalised = chunks[0].norm_in is not None
    for i, chunk in enumerate(chunks):
        found = dict(chunk.factors) | (updates[i + 1] if i + 1 < len(updates) else {})
        if gamma is None:
            if found:
                return f"chunk {i} multiplies by a decay factor ({next(iter(found))}) but its scores have no decay"
            continue
        needed = {"ξ"} | ({"δ", "ζ"} if i + 1 < len(updates) else set())
        if chunk.state_in is None:  # the first chunk of a loop starting from None: no inter term, nothing carried
            needed -= {"ξ", "δ"}
        if normalised:
            needed |= {f"{n} of the key sum" if n != "ξ" else "ξ of the normaliser" for n in needed}
        missing = needed - set(found)
        if missing:
            return f"chunk {i} has a decay on its scores but no {sorted(missing)[0]} factor"
        for name, (factor, node, roles) in found.items():
            axis, power = rows[name[0]]
            if gamma.numel() > 1 and "h" not in roles:
                return f"chunk {i}'s decay factor {name} does not run along the heads as the decay does"
            want = _expected(gamma, node, roles, axis, power or chunk.length)
            if not _factor_holds(factor, node, roles, want):
                return f"chunk {i}'s decay factor {name} is not what decay {gamma.tolist()} over the sequence needs"
    return None


def _ancestors(roots: list[Node], stop: set[Node]) -> set[Node]:
    seen, stack = set(), list(roots)
    while stack:
        n = stack.pop()
        if n not in seen and n not in stop:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def _bodies(chunks: list[Chunk], final: Node | None) -> list[list[Node]]:
    """Chunk i's nodes: what its output and the states it hands on need that no earlier chunk computed."""
    order = {n: j for j, n in enumerate(chunks[0].output.graph.nodes)}
    seen: set[Node] = set()
    bodies = []
    for i, chunk in enumerate(chunks):
        nxt = chunks[i + 1] if i + 1 < len(chunks) else None
        hands_on = [final] if nxt is None else [nxt.state_in, nxt.norm_in]
        roots = [chunk.output] + [n for n in hands_on if n is not None]
        body = _ancestors(roots, seen)
        seen |= body
        bodies.append(sorted(body, key=order.__getitem__))
    return bodies


def _isomorphic(bodies: list[list[Node]], full: int) -> None:
    """NotALoop unless the full-size chunk bodies 1 .. full - 1 are one template up to the chunk index."""
    same = bodies[1:full]
    if len(same) < 2:  # fewer than two chunks between the first and the last: nothing to compare
        return
    if any(len(b) != len(same[0]) for b in same):
        raise NotALoop("the chunk bodies differ in size")
    slots = _template(bodies)
    for step in range(3, full):
        _check_step(slots, bodies[step], bodies[step - 1], bodies[1], step)


def _covered(outputs: list[Node]) -> set[Node]:
    """The loop's own nodes (as far as its products go): what the chunk outputs need short of what both the
    first and the last need (the model before the loop); two walks whatever the number of chunks."""
    before = _ancestors([outputs[0]], set()) & _ancestors([outputs[-1]], set())
    return _ancestors(outputs, before)


def _signature(c: Chunk) -> tuple:
    """What every chunk must share: sources, scale, decay, normaliser, layouts."""
    labels = tuple(o.labels for o in (c.roles.q, c.roles.k, c.roles.v))
    return c.sources, c.scale, c.weights.decay, c.eps, c.norm_in is None, c.state_roles, labels, c.roles.out_labels


def analyze(anchor: Node, chunks: list[Chunk]) -> tuple[Chunk, Weights, list[list[Node]], Node | None] | str:
    """The causal linear attention the loop computes (as chunk 0's roles over the whole sequence), or why not."""
    first = chunks[0]
    if first.state_in is None:  # no inter term to read the state's layout from: chunk 1's
        first.state_roles = chunks[1].state_roles
    for i, c in enumerate(chunks[1:], 1):
        if c.length == 1 and c.weights.decay is None:
            c.weights.decay = first.weights.decay  # gamma^0: a one-row chunk's decay matrix is [[1]]
        if _signature(c) != _signature(first):
            return f"chunk {i} differs from chunk 0 (sources, scale, decay, normaliser or layout)"
    size = first.length
    n = val(first.sources[0]).shape[first.span[0]]
    spans = [c.span[1:] for c in chunks]
    if spans[0][0] != 0 or spans[-1][1] != n or any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
        return "the chunks do not cover the sequence in order"
    if any(c.length != size for c in chunks[:-1]) or chunks[-1].length > size:
        return "the chunks are not all of one size (but the last)"
    rank = len(first.roles.out_labels)
    dim = per_step_outputs(anchor)[1] % rank
    if anchor.target is not aten.cat.default or first.roles.out_labels[dim] != "n":
        return "the chunk outputs are not concatenated along the sequence axis"
    if any(s is not None and not _is_zero_state(s) for s in (first.state_in, first.norm_in)):
        return "the loop starts from a state that is not zero"
    if any(c.state_in is None for c in chunks[1:]):
        return "a chunk after the first has no inter-chunk term: the chunks are not chained by a state"
    updates = [{}]
    for i in range(1, len(chunks)):
        factors = {}
        for key_sum in (False, True) if first.norm_in is not None else (False,):
            found = _read_update(chunks[i].norm_in if key_sum else chunks[i].state_in, chunks[i - 1], key_sum)
            if isinstance(found, str):
                return f"chunk {i}: {found}"
            factors |= found[1]
        updates.append(factors)
    final = _final_update(chunks[-1])
    if final is not None:
        updates.append(final[1])
        final = final[0]
    gamma = None if first.weights.decay is None else torch.tensor(first.weights.decay, dtype=torch.float64)
    problem = _check_decay(chunks, updates, gamma)
    if problem is not None:
        return problem
    bodies = _bodies(chunks, final)
    try:
        _isomorphic(bodies, len(chunks) - 1)  # the last chunk hands on no state (and may be shorter)
    except NotALoop as exc:
        return str(exc)
    inside = {n for body in bodies for n in body} | {anchor}
    for body in bodies[1:]:
        for node in body:
            outside = [u for u in node.users if u not in inside]
            if outside and node is not final:
                return (f"{outside[0].name} after the loop reads {node.name} (the final state?): "
                        "only the state the loop ends with can be returned")
    w = Weights(scale=first.scale, causal=True, decay=first.weights.decay)
    if first.norm_in is not None:
        w.normalize, w.eps = "eps", first.eps
    inputs = set(first.sources)
    for i, c in enumerate(chunks):
        for node, value in c.weights.constants.items():
            w.constants.setdefault(node, value)
        factor_nodes = [f[0] for f in c.factors.values()] + [f[0] for f in updates[i].values()]
        factor_nodes += [f[0] for f in updates[-1].values()] if final is not None and i + 1 == len(chunks) else []
        # a zero state made from q (q.new_zeros) stays in the region: as an input it would look differentiated
        zeros = [n for n in (c.state_in, c.norm_in) if n is not None and not set(n.all_input_nodes) <= inputs]
        for node in factor_nodes + (zeros if i == 0 else []):
            if node not in inputs:
                value = constant_value(node)
                w.constants.setdefault(node, torch.zeros(val(node).shape, dtype=val(node).dtype)
                                       if value is None else value)  # fmt: skip
    return first, w, bodies, final


def match_chunk_loop(anchor: Node, backend: str) -> Site | Rejection | None:
    # cat([(q_c k_cᵀ ⊙ D) v_c + q_c S ...], seq) with S <- S + k_cᵀ v_c -> linear_attention(q, k, v, causal)
    parsed = per_step_outputs(anchor)
    if parsed is None or anchor.target is not aten.cat.default:
        return None
    chunks = [_read_chunk(o) for o in parsed[0]]
    if all(c is None for c in chunks):
        return None
    n, variant = len(chunks), f"chunk loop ({len(chunks)} chunks)"
    bad = next((i for i, c in enumerate(chunks) if not isinstance(c, Chunk)), None)
    if bad is not None:
        why = chunks[bad] or "its output is not intra-chunk + inter-chunk attention"
        return Rejection(PATTERN, variant, anchor, f"chunk {bad}: {why}")
    found = analyze(anchor, chunks)
    if isinstance(found, str):
        return Rejection(PATTERN, variant, anchor, found)
    first, w, bodies, final = found
    size, last = first.length, chunks[-1].length
    variant = f"chunk loop ({n} chunks of {size}" + (f", last {last})" if last != size else ")") + " → 1 op"
    whole = val(first.sources[0]).shape[first.span[0]]
    sizes = dict(first.roles.sizes, n=whole, m=whole)
    roles = Roles(first.roles.batch, sizes, *(Operand(src, op.labels) for src, op in
                  zip(first.sources, (first.roles.q, first.roles.k, first.roles.v))),
                  first.roles.out_labels, first.roles.scores_labels)  # fmt: skip
    site = build_site(anchor, anchor, roles, w, backend, variant + (", final state" if final is not None else ""))
    if isinstance(site, Site) and final is not None:
        site = _with_final_state(site, first, final, _ancestors([final], set(site.inputs)))
    return Rejection(PATTERN, variant, anchor, site) if isinstance(site, str) else site


def _final_update(last: Chunk) -> tuple[Node, dict] | None:
    """(the state after the last chunk, its update's factors) when the graph computes it (something after
    the loop reads it), else None."""
    if last.state_in is None:
        return None
    near = [u for u in last.state_in.users]
    for node in near + [v for u in near if is_call(u, aten.mul.Tensor) for v in u.users]:
        found = _read_update(node, last, False) if is_call(node, aten.add.Tensor) else None
        if isinstance(found, tuple):
            return node, found[1]
    return None


def _with_final_state(site: Site, first: Chunk, final: Node, own: set[Node]) -> Site | str:
    """`site` that also returns the final state S = Σ_m gamma^(N - 1 - m) k_mᵀ v_m, computed from k and v."""
    ks, vs = first.sources[1:]
    decay = first.weights.decay
    if ks not in site.inputs or vs not in site.inputs:
        return "the final state is read after the loop and k or v reach the fused op re-laid out"
    if decay is not None and min(decay) <= 0:
        return "the final state is read after the loop and a decay factor is 0"
    ik, iv, base = site.inputs.index(ks), site.inputs.index(vs), site.emit
    kl, vl, n = first.roles.k.labels, first.roles.v.labels, val(ks).shape[first.roles.k.labels.index("m")]
    equation, dtype = f"{kl},{vl}->{first.state_roles}", val(final).dtype

    def emit(graph: Graph, nodes: list[Node]) -> list[Node]:
        v = nodes[iv]
        if decay is not None:  # row m of v weighted by gamma_h^(N - 1 - m), as exp((N - 1 - m) log gamma_h)
            device = val(vs).device
            logs = [graph.call_function(aten.full.default, ([1], math.log(g)), {"device": device}) for g in decay]
            log_gamma = logs[0] if len(logs) == 1 else graph.call_function(aten.cat.default, (logs,))
            rows = graph.call_function(aten.arange.start_step, (n - 1, -1, -1), {"dtype": torch.float32,
                                                                                   "device": device})  # fmt: skip
            per_head = [len(decay) if r == "h" and len(decay) > 1 else 1 for r in vl]
            per_row = [n if r == "m" else 1 for r in vl]
            weight = graph.call_function(aten.exp.default, (graph.call_function(aten.mul.Tensor, (
                graph.call_function(aten.view.default, (log_gamma, per_head)),
                graph.call_function(aten.view.default, (rows, per_row)))),))  # fmt: skip
            v = graph.call_function(aten.mul.Tensor, (v, weight))
        state = graph.call_function(aten.einsum.default, (equation, [nodes[ik], v]))
        if dtype != torch.float32:
            state = graph.call_function(aten._to_copy.default, (state,), {"dtype": dtype})
        return [base(graph, nodes), state]

    site.emit, site.extra_outputs = emit, [final]
    site.extra_region = [n for n in own if n.op == "call_function"]
    return site


def with_chunk_loops(gm: GraphModule, backend: str, found: list[Site | Rejection]) -> list[Site | Rejection]:
    """`found` (the per-node rules' sites) with every chunk loop first, as one site or one rejection: the
    per-chunk products inside it are not reported on their own."""
    loops, inside = [], set()
    for node in gm.graph.nodes:
        if node.op != "call_function" or val(node) is None:
            continue
        try:
            hit = match_chunk_loop(node, backend)
        except Exception as exc:  # one odd loop must not cost the model its other sites
            hit = Rejection(PATTERN, "chunk loop", node, f"matcher error ({type(exc).__name__}: {exc})")
        if hit is not None:
            loops.append(hit)
            inside |= _covered(per_step_outputs(node)[0])
    return loops + [r for r in found if r.anchor not in inside]
